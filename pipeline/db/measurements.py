"""The batch write path for samples (:class:`~pipeline.protocol.Sample`, as received) into
``measurements``: one transaction per batch, idempotent per sample."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db.bulk import insert_ignoring_duplicates
from pipeline.db.lookups import NameLookup
from pipeline.db.schema import measurements, resources, tasks
from pipeline.errors import DatabaseError
from pipeline.protocol import Sample

logger = logging.getLogger(__name__)

_COLUMNS = ("order_id", "task_id", "resource_id", "value", "ts", "position", "attempt")


class MeasurementWriter:
    """Writes batches of samples; writing the same sample twice stores it once.

    Names are encoded through the lookup tables, then the batch goes in as one transaction
    (:func:`pipeline.db.bulk.insert_ignoring_duplicates`: ``COPY`` on PostgreSQL), never a
    commit per row.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tasks = NameLookup(tasks)
        self.resources = NameLookup(resources)

    def write(self, batch: Sequence[Sample]) -> int:
        """Store ``batch``; returns how many rows were new (duplicates are skipped)."""
        if not batch:
            return 0
        try:
            rows = self._encode(batch)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"encoding {len(batch)} measurements failed: {exc}") from exc
        return insert_ignoring_duplicates(self.engine, measurements, _COLUMNS, rows)

    def _encode(self, batch: Sequence[Sample]) -> list[tuple]:
        # New names get their ids in a short transaction of their own, so the lookup rows'
        # locks are not held for the whole batch.
        with self.engine.begin() as conn:
            return [
                (s.order_id, self.tasks.id_of(conn, s.task_name), self.resources.id_of(conn, s.resource),
                 s.value, datetime.fromtimestamp(s.timestamp_ms / 1000, tz=timezone.utc), s.index, s.attempt)
                for s in batch
            ]
