"""Order and task-run records: the database allocates each run of an order its orderID."""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

from sqlalchemy import Engine, func, insert, select, update

from pipeline.db.lookups import NameLookup
from pipeline.db.owners import Owner, heartbeat_fresh
from pipeline.db.retry import retrying
from pipeline.db.schema import measurements, orders, task_runs, tasks

T = TypeVar("T")


SHARED_MONITORS = "shared"  # orders.monitors of an order the shared services serve


class RunStatus(enum.StrEnum):
    """Lifecycle of one run of an order (``orders.status``) and of one attempt of a task
    (``task_runs.status``: RUNNING, SUCCEEDED or FAILED; PENDING in a report, not yet reached).
    The value is what the database stores."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class OrderRecord:
    """One row of ``orders``."""

    id: int
    name: str
    image: str
    image_width: int | None
    image_height: int | None
    task_list: str
    status: RunStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    monitors: str | None = None
    owner: str | None = None
    heartbeat_at: datetime | None = None
    topics_kept: bool | None = None


def utcnow() -> datetime:
    """Now, timezone-aware, as every stored time is."""
    return datetime.now(timezone.utc)


ACTIVE = (RunStatus.PENDING.value, RunStatus.RUNNING.value)


class OrderStore:
    """Reads and writes ``orders`` and ``task_runs``.

    With ``patience`` (the orchestrator's ``DB_RETRY_SECONDS``), every call rides out a lost
    database connection for that long before it raises DatabaseError; ``stop`` ends the
    waiting early. The orders it creates are recorded as ``owner``'s (see pipeline/db/owners.py).
    """

    def __init__(self, engine: Engine, patience: float = 0.0, stop: threading.Event | None = None,
                 owner: Owner | None = None) -> None:
        self.engine = engine
        self.patience = patience
        self.owner = owner
        self._stop = stop
        self._tasks = NameLookup(tasks)

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        return retrying(operation, what, self.patience, self._stop)

    def create(self, name: str, image: str, task_list: str,
               image_size: tuple[int, int] | None = None, monitors: str | None = None) -> int:
        """Insert a PENDING order and return its fresh numeric orderID."""
        width, height = image_size or (None, None)
        owner = str(self.owner) if self.owner else None

        def insert_order() -> int:
            with self.engine.begin() as conn:
                now = utcnow()
                result = conn.execute(
                    insert(orders)
                    .values(name=name, image=image, task_list=task_list,
                            image_width=width, image_height=height,
                            status=RunStatus.PENDING.value, created_at=now, monitors=monitors,
                            owner=owner, heartbeat_at=now if owner else None)
                    .returning(orders.c.id)
                )
                return int(result.scalar_one())
        return self._retrying(f"recording order {name}", insert_order)

    def set_status(self, order_id: int, status: RunStatus, error: str | None = None,
                   topics_kept: bool = False) -> None:
        """Move an order to ``status``, stamping its start or end time; an order that ends
        with ``topics_kept`` stays the shared services' to serve (in the same write, so that
        they never see it over without it)."""
        values: dict[str, object] = {"status": status.value}
        if status is RunStatus.RUNNING:
            values["started_at"] = utcnow()
        elif status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED):
            values["finished_at"] = utcnow()
            values["error"] = error
            values["topics_kept"] = topics_kept
        self._update(f"order {order_id}: recording {status.value}",
                     update(orders).where(orders.c.id == order_id).values(**values))

    def _update(self, what: str, statement) -> None:
        def execute() -> None:
            with self.engine.begin() as conn:
                conn.execute(statement)
        self._retrying(what, execute)

    def get(self, order_id: int) -> OrderRecord | None:
        """The order row, or None."""
        def read():
            with self.engine.connect() as conn:
                return conn.execute(select(orders).where(orders.c.id == order_id)).mappings().first()
        row = self._retrying(f"reading order {order_id}", read)
        return None if row is None else _record(row)

    def set_monitors(self, order_id: int, monitors: str | None) -> None:
        """Record which monitors serve the order (the shared services look at this)."""
        self._update(f"order {order_id}: recording its monitors",
                     update(orders).where(orders.c.id == order_id).values(monitors=monitors))

    def start_task(self, order_id: int, position: int, attempt: int, task: str,
                   fault: str | None = None, started: datetime | None = None,
                   input_pixels: int | None = None, input_channels: int | None = None,
                   input_bytes: int | None = None, params: Mapping[str, object] | None = None) -> datetime:
        """Record that attempt ``attempt`` of the task at ``position`` started (now, unless
        ``started`` says when), with the facts of the image it reads when known (pixels,
        channels, file size) and its resolved task parameters."""
        started = started or utcnow()
        what = f"order {order_id}: recording the start of task {position + 1}"
        # One store serves many threads: the name's id is committed before it is used.
        task_id = self._retrying(what, lambda: self._tasks.committed_id_of(self.engine, task))
        self._update(what, insert(task_runs).values(
            order_id=order_id, position=position, attempt=attempt,
            task_id=task_id, status=RunStatus.RUNNING.value, started_at=started, fault=fault,
            input_pixels=input_pixels, input_channels=input_channels, input_bytes=input_bytes,
            params=None if params is None else params_text(params),
        ))
        return started

    def finish_task(self, order_id: int, position: int, attempt: int, status: RunStatus,
                    output: str | None = None, error: str | None = None, output_bytes: int | None = None,
                    operation_ns: int | None = None) -> None:
        """Record how an attempt ended (and the size of its output and its operation's CPU
        time, when known)."""
        self._update(
            f"order {order_id}: recording the end of task {position + 1}",
            update(task_runs)
            .where(task_runs.c.order_id == order_id, task_runs.c.position == position,
                   task_runs.c.attempt == attempt)
            .values(status=RunStatus(status).value, finished_at=utcnow(), output=output, error=error,
                    output_bytes=output_bytes, operation_ns=operation_ns))

    def count_measurements(self, order_id: int) -> int:
        """How many samples are stored for the order."""
        def count() -> int:
            with self.engine.connect() as conn:
                return int(conn.execute(
                    select(func.count()).select_from(measurements)
                    .where(measurements.c.order_id == order_id)
                ).scalar_one())
        return self._retrying(f"order {order_id}: counting its samples", count)

    def heartbeat(self) -> None:
        """Say that this store's owner is alive and still running its unfinished orders."""
        if self.owner is None:
            return
        self._update("heartbeat", update(orders)
                     .where(orders.c.owner == str(self.owner), orders.c.status.in_(ACTIVE))
                     .values(heartbeat_at=utcnow()))

    def mark_abandoned(self) -> list[OrderRecord]:
        """Mark FAILED every unfinished order whose orchestrator is gone (and its task runs
        still RUNNING); the orders marked, as they were."""
        now = utcnow()

        def active():
            with self.engine.connect() as conn:
                return conn.execute(select(orders).where(orders.c.status.in_(ACTIVE))).mappings().all()
        abandoned = []
        for row in self._retrying("looking for orders whose orchestrator died", active):
            record = _record(row)
            owner = Owner.parse(record.owner)
            if owner == self.owner:
                continue
            if owner is not None and owner.alive(record.heartbeat_at, now, self.patience):
                continue
            if owner is None and _fresh(record, now, self.patience):
                continue  # recorded without an owner (an older version): judged by its age
            who = owner.describe() if owner else "unknown"
            self._mark_failed(record.id, f"its orchestrator ({who}) ended without recording how the order ended")
            abandoned.append(record)
        return abandoned

    def _mark_failed(self, order_id: int, why: str) -> None:
        def mark() -> None:
            with self.engine.begin() as conn:
                conn.execute(update(task_runs)
                             .where(task_runs.c.order_id == order_id, task_runs.c.status == RunStatus.RUNNING.value)
                             .values(status=RunStatus.FAILED.value, finished_at=utcnow(), error=why))
                conn.execute(update(orders)
                             .where(orders.c.id == order_id, orders.c.status.in_(ACTIVE))
                             .values(status=RunStatus.FAILED.value, finished_at=utcnow(), error=why))
        self._retrying(f"order {order_id}: marking it FAILED", mark)


def _record(row) -> OrderRecord:
    return OrderRecord(**{**row, "status": RunStatus(row["status"])})


def _fresh(record: OrderRecord, now: datetime, patience: float) -> bool:
    return heartbeat_fresh(record.heartbeat_at or record.started_at or record.created_at, now, patience)


def params_text(params: Mapping[str, object]) -> str:
    """A run's task parameters as ``task_runs.params`` holds them: canonical JSON (sorted keys)."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"), default=str)
