"""Engines and idempotent schema creation, for PostgreSQL (TimescaleDB when present) and SQLite."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.pool import NullPool
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db.schema import database_identity, metadata
from pipeline.errors import DatabaseError
from pipeline.settings import mask_url

logger = logging.getLogger(__name__)

# Serialises schema creation when several processes start at once on one PostgreSQL.
_SCHEMA_LOCK_ID = 0x1A6E_0001
IDENTITY_ROW = "database"  # the one row of database_identity (pipeline/db/identity.py)


def connect(database_url: str, pooled: bool = True) -> Engine:
    """An engine for ``database_url``; for SQLite the folder is created and WAL enabled.
    ``pooled=False``: every use opens a fresh connection (a probe of what the URL leads to)."""
    url = make_url(database_url)
    if url.drivername == "postgresql":
        # The driver installed; SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://.
        url = url.set(drivername="postgresql+psycopg2")
    pool = {} if pooled else {"poolclass": NullPool}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the orchestrator read while a monitor-consumer writes; foreign keys are off by
    # default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_schema(engine: Engine) -> None:
    """Create every table that is missing; safe to call from several processes at once."""
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
            metadata.create_all(conn)
            _add_missing_columns(conn)
            _write_identity(conn)
            if engine.dialect.name == "postgresql" and _timescaledb_available(conn):
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
                conn.execute(text(
                    "SELECT create_hypertable('measurements', 'ts', if_not_exists => TRUE, "
                    "migrate_data => TRUE)"
                ))
                logger.info("measurements is a TimescaleDB hypertable")
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot create the schema in {mask_url(str(engine.url))}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc


def _write_identity(conn) -> None:
    """Give the database its identity unless it has one; several processes creating the
    schema at once agree on the first one written."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(database_identity)
                 .values(name=IDENTITY_ROW, id=str(uuid.uuid4()), created_at=datetime.now(timezone.utc))
                 .on_conflict_do_nothing(index_elements=["name"]))


def _add_missing_columns(conn) -> None:
    """Columns added to a table after it first existed (create_all only adds whole tables)."""
    existing_tables = inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in existing_tables.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                logger.info("added column %s.%s", table.name, column.name)


def uses_timescaledb(engine: Engine) -> bool:
    """Whether ``measurements`` is a TimescaleDB hypertable on this database."""
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        )).scalar())


def _timescaledb_available(conn) -> bool:
    return bool(conn.execute(text(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )).scalar())
