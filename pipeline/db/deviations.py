"""The ``deviations`` table: each scored sample (:class:`~pipeline.protocol.Deviation`) with
its expectation, band, score and verdict, per model version."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import Engine, delete, select

from pipeline.db.bulk import insert_ignoring_duplicates
from pipeline.db.lookups import NameLookup
from pipeline.db.schema import deviations, resources, tasks
from pipeline.protocol import Deviation


class DeviationStore:
    """Writes and reads ``deviations``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tasks = NameLookup(tasks)
        self.resources = NameLookup(resources)

    def write(self, rows: Sequence[Deviation]) -> None:
        """Store ``rows``; a row already stored for that sample and version is kept as is."""
        if not rows:
            return
        with self.engine.begin() as conn:
            values = [self._values(conn, row) for row in rows]
        columns = tuple(values[0])
        insert_ignoring_duplicates(self.engine, deviations, columns,
                                   [tuple(v[c] for c in columns) for v in values])

    def replace(self, order_id: int, rows: Sequence[Deviation], model_version: str) -> None:
        """Recompute: drop the order's rows of ``model_version`` and store ``rows`` (scored
        by that version) instead."""
        with self.engine.begin() as conn:
            conn.execute(delete(deviations).where(deviations.c.order_id == order_id,
                                                  deviations.c.model_version == model_version))
            if rows:
                conn.execute(deviations.insert(), [self._values(conn, r) for r in rows])

    def versions(self, order_id: int) -> list[str]:
        """Model versions that scored the order."""
        with self.engine.connect() as conn:
            return sorted(conn.execute(select(deviations.c.model_version).distinct()
                                       .where(deviations.c.order_id == order_id)).scalars())

    def read(self, order_id: int, model_version: str) -> list[Deviation]:
        """The order's rows scored by ``model_version``, in time order."""
        query = (
            select(deviations, tasks.c.name.label("task"), resources.c.name.label("resource"))
            .join(tasks, tasks.c.id == deviations.c.task_id)
            .join(resources, resources.c.id == deviations.c.resource_id)
            .where(deviations.c.order_id == order_id, deviations.c.model_version == model_version)
            .order_by(deviations.c.ts)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            Deviation(r["order_id"], r["task"], r["position"], r["resource"], to_ms(r["ts"]), r["value"],
                      r["expected"], r["lower"], r["upper"], r["score"], r["model_version"], r["anomaly"])
            for r in rows
        ]

    def _values(self, conn, row: Deviation) -> dict:
        return {
            "order_id": row.order_id, "task_id": self.tasks.id_of(conn, row.task),
            "resource_id": self.resources.id_of(conn, row.resource),
            "ts": datetime.fromtimestamp(row.timestamp_ms / 1000, tz=timezone.utc),
            "model_version": row.model_version, "position": row.index, "value": row.value,
            "expected": row.expected, "lower": row.lower, "upper": row.upper, "score": row.score,
            "anomaly": bool(row.anomaly),
        }


def to_ms(ts: datetime) -> int:
    """Milliseconds since the epoch of a stored time (SQLite hands back naive UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return round(ts.timestamp() * 1000)
