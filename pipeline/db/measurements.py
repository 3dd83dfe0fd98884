"""The batch write path for measurements: one transaction per batch, idempotent per sample."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg2
from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db.lookups import NameLookup
from pipeline.db.schema import measurements, resources, tasks
from pipeline.errors import DatabaseError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """One sample, with names; the writer encodes the names through the lookup tables."""

    order_id: int
    task: str
    resource: str
    value: float
    timestamp_ms: int

    @property
    def ts(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=timezone.utc)


class MeasurementWriter:
    """Writes batches of measurements; writing the same sample twice stores it once.

    On PostgreSQL a batch is streamed with ``COPY`` into a temporary table and moved with one
    ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``; on SQLite it is one ``INSERT OR IGNORE``
    executemany. Either way a batch is one transaction, never a commit per row.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tasks = NameLookup(tasks)
        self.resources = NameLookup(resources)

    def write(self, batch: Sequence[Measurement]) -> int:
        """Store ``batch``; returns how many rows were new (duplicates are skipped)."""
        if not batch:
            return 0
        try:
            rows = self._encode(batch)
            if self.engine.dialect.name == "postgresql":
                return self._write_postgres(rows)
            return self._write_generic(rows)
        except (SQLAlchemyError, psycopg2.Error) as exc:
            raise DatabaseError(f"writing {len(batch)} measurements failed: {exc}") from exc

    def _encode(self, batch: Sequence[Measurement]) -> list[tuple[int, int, int, float, datetime]]:
        # New names get their ids in a short transaction of their own, so the lookup rows'
        # locks are not held for the whole batch.
        with self.engine.begin() as conn:
            return [
                (m.order_id, self.tasks.id_of(conn, m.task), self.resources.id_of(conn, m.resource),
                 m.value, m.ts)
                for m in batch
            ]

    def _write_generic(self, rows) -> int:
        statement = insert(measurements).prefix_with("OR IGNORE")
        keys = ("order_id", "task_id", "resource_id", "value", "ts")
        with self.engine.begin() as conn:
            result = conn.execute(statement, [dict(zip(keys, row)) for row in rows])
            return max(result.rowcount, 0)

    def _write_postgres(self, rows) -> int:
        buffer = io.StringIO()
        for order_id, task_id, resource_id, value, ts in rows:
            buffer.write(f"{order_id}\t{task_id}\t{resource_id}\t{value!r}\t{ts.isoformat()}\n")
        buffer.seek(0)
        raw = self.engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                cursor.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS measurements_incoming "
                    "(LIKE measurements INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                cursor.copy_expert(
                    "COPY measurements_incoming (order_id, task_id, resource_id, value, ts) "
                    "FROM STDIN", buffer,
                )
                cursor.execute(
                    "INSERT INTO measurements (order_id, task_id, resource_id, value, ts) "
                    "SELECT order_id, task_id, resource_id, value, ts FROM measurements_incoming "
                    "ON CONFLICT (order_id, task_id, resource_id, ts) DO NOTHING"
                )
                inserted = cursor.rowcount
            raw.commit()
            return inserted
        except Exception:
            raw.rollback()
            raise
        finally:
            raw.close()
