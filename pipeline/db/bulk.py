"""Idempotent bulk inserts: one transaction per batch, rows already stored are skipped.

On PostgreSQL the rows are streamed with ``COPY`` into a temporary table and moved with one
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (row-by-row executemany is several times
slower); on SQLite they go in with one ``INSERT OR IGNORE`` executemany.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

import psycopg2
from sqlalchemy import Engine, Table, insert
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import DatabaseError


def insert_ignoring_duplicates(engine: Engine, table: Table, columns: Sequence[str],
                               rows: Sequence[tuple]) -> int:
    """Insert ``rows`` (tuples in ``columns`` order); returns how many were new."""
    if not rows:
        return 0
    try:
        if engine.dialect.name == "postgresql":
            return _copy_then_insert(engine, table, columns, rows)
        with engine.begin() as conn:
            result = conn.execute(insert(table).prefix_with("OR IGNORE"),
                                  [dict(zip(columns, row)) for row in rows])
            return max(result.rowcount, 0)
    except (SQLAlchemyError, psycopg2.Error) as exc:
        raise DatabaseError(f"writing {len(rows)} rows to {table.name} failed: {exc}") from exc


def _copy_then_insert(engine: Engine, table: Table, columns: Sequence[str], rows: Sequence[tuple]) -> int:
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join(_copy_text(value) for value in row) + "\n")
    buffer.seek(0)
    names = ", ".join(f'"{c}"' for c in columns)
    staging = f"{table.name}_incoming"
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {staging} "
                           f"(LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            cursor.copy_expert(f"COPY {staging} ({names}) FROM STDIN", buffer)
            cursor.execute(f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {staging} "
                           "ON CONFLICT DO NOTHING")
            inserted = cursor.rowcount
        raw.commit()
        return inserted
    except Exception:
        raw.rollback()
        raise
    finally:
        raw.close()


def _copy_text(value: object) -> str:
    """A value in COPY's text format (numbers exact, times with their zone, NULL as \\N)."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
