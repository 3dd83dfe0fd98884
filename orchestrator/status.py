"""``python -m orchestrator status [ORDER_ID] [--json]``: where every order stands, read from
the database: the orders newest first, each with its task runs (status, attempt, times), its
stored samples and its anomalies."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db.orders import ACTIVE, utcnow
from pipeline.db.owners import Owner
from pipeline.db.schema import deviations, measurements, orders, task_runs, tasks
from pipeline.errors import DatabaseError, PipelineError
from pipeline.settings import mask_url


class UnknownOrderError(PipelineError):
    exit_code = 2


@dataclass
class TaskRunReport:
    position: int
    attempt: int
    task: str
    status: str
    started_at: str | None
    finished_at: str | None
    seconds: float | None
    error: str | None


@dataclass
class OrderStatusReport:
    order_id: int
    name: str
    status: str
    created_at: str | None
    finished_at: str | None
    seconds: float | None
    tasks: list[str]
    samples: int
    anomalies: int
    error: str | None
    runs: list[TaskRunReport] = field(default_factory=list)
    orchestrator: str | None = None  # the process running it: "pid N on host"
    orchestrator_gone: bool = False  # unfinished, but that process is gone (see pipeline/db/owners.py)


def order_statuses(engine: Engine, order_id: int | None = None, limit: int = 20,
                   patience: float = 120.0) -> list[OrderStatusReport]:
    """The newest ``limit`` orders (or the one ``order_id``), newest first; ``patience`` is
    DB_RETRY_SECONDS, for telling whether an unfinished order's orchestrator is gone."""
    try:
        with engine.connect() as conn:
            query = select(orders).order_by(orders.c.id.desc())
            query = query.where(orders.c.id == order_id) if order_id is not None else query.limit(limit)
            rows = conn.execute(query).mappings().all()
            if order_id is not None and not rows:
                raise UnknownOrderError(f"no order {order_id} in {mask_url(str(engine.url))}")
            ids = [row["id"] for row in rows]
            runs = conn.execute(
                select(task_runs, tasks.c.name.label("task")).join(tasks, tasks.c.id == task_runs.c.task_id)
                .where(task_runs.c.order_id.in_(ids)).order_by(task_runs.c.position, task_runs.c.attempt)
            ).mappings().all()
            samples = dict(conn.execute(
                select(measurements.c.order_id, func.count()).where(measurements.c.order_id.in_(ids))
                .group_by(measurements.c.order_id)).all())
            anomalies = dict(conn.execute(
                select(deviations.c.order_id, func.count()).where(deviations.c.order_id.in_(ids),
                                                                  deviations.c.anomaly.is_(True))
                .group_by(deviations.c.order_id)).all())
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the orders from {mask_url(str(engine.url))}: "
                            f"{str(exc).splitlines()[0]}") from exc
    reports = []
    now = utcnow()
    for row in rows:
        report = OrderStatusReport(
            row["id"], row["name"], row["status"], _iso(row["created_at"]), _iso(row["finished_at"]),
            _seconds(row["started_at"] or row["created_at"], row["finished_at"]), row["task_list"].split(","),
            samples.get(row["id"], 0), anomalies.get(row["id"], 0), row["error"])
        owner = Owner.parse(row["owner"])
        if owner is not None:
            report.orchestrator = owner.describe()
            report.orchestrator_gone = row["status"] in ACTIVE and not owner.alive(
                row["heartbeat_at"], now, patience)
        report.runs = [TaskRunReport(r["position"], r["attempt"], r["task"], r["status"], _iso(r["started_at"]),
                                 _iso(r["finished_at"]), _seconds(r["started_at"], r["finished_at"]), r["error"])
                       for r in runs if r["order_id"] == row["id"]]
        reports.append(report)
    return reports


def format_statuses(reports: list[OrderStatusReport]) -> str:
    """One line per order, one indented line per task run."""
    if not reports:
        return "no orders yet"
    lines = []
    for o in reports:
        took = f"{o.seconds:.1f}s" if o.seconds is not None else "-"
        gone = f" (its orchestrator, {o.orchestrator}, is gone: the next run marks it FAILED)" \
            if o.orchestrator_gone else ""
        lines.append(f"order {o.order_id} {o.name}: {o.status}{gone}, created {o.created_at or '-'}, {took}, "
                     f"{o.samples} samples, {o.anomalies} anomalies" + (f"; {o.error}" if o.error else ""))
        for r in o.runs:
            took = f"{r.seconds:.1f}s" if r.seconds is not None else "running"
            lines.append(f"  {r.position + 1}. {r.task:<12} {r.status:<10} attempt {r.attempt}  {took}"
                         + (f"  {r.error}" if r.error else ""))
    return "\n".join(lines)


def to_json(reports: list[OrderStatusReport]) -> str:
    return json.dumps([asdict(r) for r in reports], indent=2)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)
