"""What a sample's scoring needs to know beyond the sample: which run of its task it belongs
to (position, attempt, start time), the task before it, and the size of the image the run
reads. :meth:`OrderContext.raw` gives a sample as models.rows.model_rows reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import Engine, select

import pandas as pd

from models.rows import NO_PARAMS, RAW_COLUMNS, model_rows, previous_task
from pipeline.db.deviations import to_ms
from pipeline.db.schema import orders, task_runs, tasks
from analysis.scoring import SampleContext, contexts


@dataclass(frozen=True)
class _Run:
    position: int
    attempt: int
    task: str
    started_ms: int
    finished_ms: int | None
    input_pixels: int | None
    input_channels: int | None
    input_bytes: int | None
    output_bytes: int | None
    operation_ns: int | None
    params: str


class OrderContext:
    """Matches samples to task runs of one order, reading ``task_runs`` as runs appear."""

    def __init__(self, engine: Engine, order_id: int) -> None:
        self.engine = engine
        self.order_id = order_id
        self.task_list = ""
        self.image_pixels = math.nan
        self._runs: list[_Run] = []
        self.refresh()

    def refresh(self) -> None:
        """Read the order and its task runs again (a new task run has started)."""
        with self.engine.connect() as conn:
            order = conn.execute(select(orders).where(orders.c.id == self.order_id)).mappings().first()
            runs = conn.execute(
                select(task_runs.c.position, task_runs.c.attempt, tasks.c.name, task_runs.c.started_at,
                       task_runs.c.finished_at, task_runs.c.input_pixels, task_runs.c.input_channels,
                       task_runs.c.input_bytes, task_runs.c.output_bytes, task_runs.c.operation_ns,
                       task_runs.c.params)
                .join(tasks, tasks.c.id == task_runs.c.task_id)
                .where(task_runs.c.order_id == self.order_id)
                .order_by(task_runs.c.started_at)
            ).all()
        if order is not None:
            self.task_list = order["task_list"]
            if order["image_width"] and order["image_height"]:
                self.image_pixels = float(order["image_width"] * order["image_height"])
        self._runs = [_Run(p, a, name, to_ms(s), to_ms(f) if f else None, px, ch, size, out, op,
                           params or NO_PARAMS)
                      for p, a, name, s, f, px, ch, size, out, op, params in runs]

    def started_ms(self, position: int) -> int | None:
        """When the last attempt of the task run at ``position`` started (None: unknown)."""
        starts = [run.started_ms for run in self._runs if run.position == position]
        return max(starts) if starts else None

    def raw(self, task: str, resource: str, timestamp_ms: int, value: float,
            position: int | None = None, attempt: int | None = None) -> dict | None:
        """The sample with its run's facts (models.rows.RAW_COLUMNS), or None when no run of
        ``task`` covers it. A sample that names its run (``position``, ``attempt``) is matched
        by that alone."""
        run = self._match(task, timestamp_ms, position, attempt)
        if run is None:
            self.refresh()
            run = self._match(task, timestamp_ms, position, attempt)
            if run is None:
                return None
        pixels = run.input_pixels or self.image_pixels
        return {"order_id": self.order_id, "position": run.position, "attempt": run.attempt, "task": task,
                "prev_task": previous_task(self.task_list, run.position), "image_pixels": float(pixels),
                "image_channels": float(run.input_channels or math.nan),
                "image_bytes": float(run.input_bytes or math.nan),
                "output_bytes": float(run.output_bytes if run.output_bytes is not None else math.nan),
                "operation_seconds": run.operation_ns / 1e9 if run.operation_ns is not None else math.nan,
                "params": run.params,
                "started_ms": run.started_ms, "ts_ms": timestamp_ms, "resource": resource, "value": value}

    def _match(self, task: str, timestamp_ms: int, position: int | None, attempt: int | None) -> _Run | None:
        if position is not None:
            return next((run for run in self._runs if run.task == task and run.position == position
                         and (attempt is None or run.attempt == attempt)), None)
        # Samples stored before they named their run: the latest run of this task that started before the sample: runs of one order never
        # overlap, so that is the one that was running. A sample stamped before every run of
        # its task can only come from a clock running behind the orchestrator's: the first run.
        candidates = [run for run in self._runs if run.task == task]
        for run in reversed(candidates):
            if run.started_ms <= timestamp_ms:
                return run
        return candidates[0] if candidates else None


def order_samples(engine: Engine, order_id: int) -> list[SampleContext]:
    """Every stored sample of an order as scored samples (model rows), in time order per run."""
    from pipeline.db.schema import measurements, resources

    query = (
        select(tasks.c.name, resources.c.name, measurements.c.ts, measurements.c.value,
               measurements.c.position, measurements.c.attempt)
        .join(tasks, tasks.c.id == measurements.c.task_id)
        .join(resources, resources.c.id == measurements.c.resource_id)
        .where(measurements.c.order_id == order_id)
        .order_by(measurements.c.ts, resources.c.name)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    context = OrderContext(engine, order_id)
    raw = (context.raw(task, resource, to_ms(ts), value, position, attempt)
           for task, resource, ts, value, position, attempt in rows)
    return contexts(model_rows(pd.DataFrame([r for r in raw if r is not None], columns=RAW_COLUMNS)))
