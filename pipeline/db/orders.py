"""Order and task-run records: the database allocates each run of an order its orderID."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, func, insert, select, update

from pipeline.db.lookups import NameLookup
from pipeline.db.schema import measurements, orders, task_runs, tasks


SHARED_MONITORS = "shared"  # orders.monitors of an order the shared services serve


class OrderStatus(str, enum.Enum):
    """Lifecycle of one run of an order."""

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
    status: OrderStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    monitors: str | None = None


def utcnow() -> datetime:
    """Now, timezone-aware, as every stored time is."""
    return datetime.now(timezone.utc)


class OrderStore:
    """Reads and writes ``orders`` and ``task_runs``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tasks = NameLookup(tasks)

    def create(self, name: str, image: str, task_list: str,
               image_size: tuple[int, int] | None = None, monitors: str | None = None) -> int:
        """Insert a PENDING order and return its fresh numeric orderID."""
        width, height = image_size or (None, None)
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(orders)
                .values(name=name, image=image, task_list=task_list,
                        image_width=width, image_height=height,
                        status=OrderStatus.PENDING.value, created_at=utcnow(), monitors=monitors)
                .returning(orders.c.id)
            )
            return int(result.scalar_one())

    def set_status(self, order_id: int, status: OrderStatus, error: str | None = None) -> None:
        """Move an order to ``status``, stamping its start or end time."""
        values: dict[str, object] = {"status": status.value}
        if status is OrderStatus.RUNNING:
            values["started_at"] = utcnow()
        elif status in (OrderStatus.SUCCEEDED, OrderStatus.FAILED, OrderStatus.CANCELLED):
            values["finished_at"] = utcnow()
            values["error"] = error
        with self.engine.begin() as conn:
            conn.execute(update(orders).where(orders.c.id == order_id).values(**values))

    def get(self, order_id: int) -> OrderRecord | None:
        """The order row, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(orders).where(orders.c.id == order_id)).mappings().first()
        if row is None:
            return None
        return OrderRecord(**{**row, "status": OrderStatus(row["status"])})

    def set_monitors(self, order_id: int, monitors: str | None) -> None:
        """Record which monitors serve the order (the shared services look at this)."""
        with self.engine.begin() as conn:
            conn.execute(update(orders).where(orders.c.id == order_id).values(monitors=monitors))

    def start_task(self, order_id: int, position: int, attempt: int, task: str,
                   fault: str | None = None, started: datetime | None = None,
                   input_pixels: int | None = None) -> datetime:
        """Record that attempt ``attempt`` of the task at ``position`` started (now, unless
        ``started`` says when), with the size of the image it reads when known."""
        started = started or utcnow()
        task_id = self._tasks.committed_id_of(self.engine, task)  # one store serves many threads
        with self.engine.begin() as conn:
            conn.execute(insert(task_runs).values(
                order_id=order_id, position=position, attempt=attempt,
                task_id=task_id, status="RUNNING", started_at=started, fault=fault,
                input_pixels=input_pixels,
            ))
        return started

    def finish_task(self, order_id: int, position: int, attempt: int, status: str,
                    output: str | None = None, error: str | None = None) -> None:
        """Record how an attempt ended."""
        with self.engine.begin() as conn:
            conn.execute(
                update(task_runs)
                .where(task_runs.c.order_id == order_id, task_runs.c.position == position,
                       task_runs.c.attempt == attempt)
                .values(status=status, finished_at=utcnow(), output=output, error=error)
            )

    def count_measurements(self, order_id: int) -> int:
        """How many samples are stored for the order."""
        with self.engine.connect() as conn:
            return int(conn.execute(
                select(func.count()).select_from(measurements)
                .where(measurements.c.order_id == order_id)
            ).scalar_one())
