"""Training data: stored measurements joined with their task runs and orders, turned into
model rows by :func:`models.features.model_rows` (the same function live scoring uses); splits
by order.

A sample belongs to the SUCCEEDED run it names (position and attempt, from its headers);
samples stored before producers sent those are matched by time window instead (``started_at
<= ts <= finished_at``; the runs of one order never overlap). Failed attempts and runs with
an injected fault are left out, as they are not the usage a healthy task should show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
from sqlalchemy import Engine, and_, inspect, or_, select
from sqlalchemy.exc import SQLAlchemyError

from models.rows import NO_PARAMS, RAW_COLUMNS, ROW_COLUMNS, model_rows, previous_task
from pipeline.db.orders import RunStatus
from pipeline.db.schema import measurements, orders, resources, task_runs, tasks
from pipeline.errors import DatabaseError
from pipeline.settings import mask_url
from training.errors import InsufficientDataError

logger = logging.getLogger(__name__)

COLUMNS = ROW_COLUMNS
COLLECT_HINT = ("collect more history first, e.g. `./dev run orders/example-*.json --repeat 20` "
                "(each run of an order adds its tasks' samples)")


@dataclass(frozen=True)
class Split:
    """Rows of disjoint sets of orders: train, validation, test."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    def orders(self) -> dict[str, int]:
        return {name: int(part["order_id"].nunique()) for name, part in self.parts().items()}

    def parts(self) -> dict[str, pd.DataFrame]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def load_measurements(engine: Engine, since: datetime | None = None,
                      until: datetime | None = None) -> pd.DataFrame:
    """Model rows of every sample of a SUCCEEDED task run (columns :data:`COLUMNS`).

    ``since``/``until`` select orders by their creation time (``since <= created_at <
    until``), so an order is never cut in half. An empty database gives an empty frame.
    """
    try:
        if not inspect(engine).has_table(measurements.name):
            return pd.DataFrame(columns=COLUMNS)
        with engine.connect() as conn:
            rows = conn.execute(_query(since, until)).mappings().all()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read measurements from {mask_url(str(engine.url))}: "
                            f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}") from exc
    return _frame(pd.DataFrame(rows))


def _query(since: datetime | None, until: datetime | None):
    run = and_(task_runs.c.order_id == measurements.c.order_id,
               task_runs.c.task_id == measurements.c.task_id,
               task_runs.c.status == RunStatus.SUCCEEDED.value,
               task_runs.c.fault.is_(None),  # injected faults are not normal usage
               or_(and_(measurements.c.position == task_runs.c.position,
                        measurements.c.attempt == task_runs.c.attempt),
                   and_(measurements.c.position.is_(None),
                        measurements.c.ts >= task_runs.c.started_at,
                        measurements.c.ts <= task_runs.c.finished_at)))
    query = (
        select(measurements.c.order_id, tasks.c.name.label("task"),
               resources.c.name.label("resource"), measurements.c.value, measurements.c.ts,
               task_runs.c.position, task_runs.c.attempt, task_runs.c.started_at,
               task_runs.c.input_pixels, task_runs.c.input_channels, task_runs.c.input_bytes,
               task_runs.c.output_bytes, task_runs.c.operation_ns, task_runs.c.params,
               orders.c.task_list, orders.c.image_width, orders.c.image_height)
        .select_from(measurements)
        .join(task_runs, run)
        .join(orders, orders.c.id == measurements.c.order_id)
        .join(tasks, tasks.c.id == measurements.c.task_id)
        .join(resources, resources.c.id == measurements.c.resource_id)
        .order_by(measurements.c.order_id, measurements.c.ts, resources.c.name)
    )
    if since is not None:
        query = query.where(orders.c.created_at >= since)
    if until is not None:
        query = query.where(orders.c.created_at < until)
    return query


def _frame(raw: pd.DataFrame) -> pd.DataFrame:
    if raw.empty:
        return pd.DataFrame(columns=COLUMNS)
    return model_rows(raw_samples(raw))


def raw_samples(raw: pd.DataFrame) -> pd.DataFrame:
    """Joined rows (sample, run, order) as :func:`models.features.model_rows` reads them."""
    order_pixels = pd.to_numeric(raw["image_width"], errors="coerce") \
        * pd.to_numeric(raw["image_height"], errors="coerce")
    run_pixels = pd.to_numeric(raw["input_pixels"], errors="coerce")
    frame = pd.DataFrame({
        "order_id": raw["order_id"].astype("int64"),
        "position": raw["position"].astype("int64"),
        "attempt": raw["attempt"].astype("int64"),
        "task": raw["task"].astype(str),
        "prev_task": [previous_task(tl, int(p)) for tl, p in zip(raw["task_list"], raw["position"])],
        "image_pixels": run_pixels.fillna(order_pixels).astype("float64"),
        "image_channels": pd.to_numeric(raw.get("input_channels"), errors="coerce").astype("float64")
        if "input_channels" in raw else np.nan,
        "image_bytes": pd.to_numeric(raw.get("input_bytes"), errors="coerce").astype("float64")
        if "input_bytes" in raw else np.nan,
        "output_bytes": pd.to_numeric(raw.get("output_bytes"), errors="coerce").astype("float64")
        if "output_bytes" in raw else np.nan,
        "operation_seconds": pd.to_numeric(raw.get("operation_ns"), errors="coerce").astype("float64") / 1e9
        if "operation_ns" in raw else np.nan,
        "params": raw["params"].fillna(NO_PARAMS).astype(str) if "params" in raw else NO_PARAMS,
        "started_ms": _ms(raw["started_at"]),
        "ts_ms": _ms(raw["ts"]),
        "resource": raw["resource"].astype(str),
        "value": raw["value"].astype("float64"),
    })
    return frame[RAW_COLUMNS]


def _ms(column: pd.Series) -> pd.Series:
    return (_utc(column) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)


def _utc(column: pd.Series) -> pd.Series:
    # SQLite hands back naive datetimes (stored in UTC), PostgreSQL aware ones.
    return pd.to_datetime(column, utc=True)


def require_enough(frame: pd.DataFrame, min_orders: int) -> None:
    """Raise :class:`InsufficientDataError` unless ``frame`` holds ``min_orders`` orders."""
    found = int(frame["order_id"].nunique()) if len(frame) else 0
    needed = max(min_orders, 3)  # one order at least in each of train, validation and test
    if found < needed:
        raise InsufficientDataError(
            f"not enough history to train: {found} order(s) with measurements in the data "
            f"window, at least {needed} needed; {COLLECT_HINT}"
        )


def split_by_order(frame: pd.DataFrame, seed: int, validation: float = 0.15,
                   test: float = 0.15) -> Split:
    """Assign whole orders at random (seeded) to train, validation and test, never rows."""
    order_ids = np.sort(frame["order_id"].unique())
    shuffled = np.random.default_rng(seed).permutation(order_ids)
    n = len(shuffled)
    n_test = max(1, round(n * test))
    n_val = max(1, round(n * validation))
    if n - n_test - n_val < 1:
        raise InsufficientDataError(f"{n} order(s) cannot be split into train, validation and "
                                    f"test; {COLLECT_HINT}")
    test_ids, val_ids = set(shuffled[:n_test]), set(shuffled[n_test:n_test + n_val])
    in_test, in_val = frame["order_id"].isin(test_ids), frame["order_id"].isin(val_ids)
    return Split(train=frame[~in_test & ~in_val].reset_index(drop=True),
                 validation=frame[in_val].reset_index(drop=True),
                 test=frame[in_test].reset_index(drop=True))
