"""Orders for tests and benchmarks: write order files, run the orchestrator, inspect results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
from sqlalchemy import select

from pipeline.db import connect
from pipeline.db.schema import measurements, orders, resources, task_runs, tasks
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "orders" / "images"


def write_order(folder: Path, name: str, tasks_: list, image: str = "scene-640x480.jpg", **extra) -> Path:
    """An order file in ``folder`` over one of the shipped sample images."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"id": name, "image": str(IMAGES / image), "tasks": tasks_, **extra}))
    return path


def child_env(settings: Settings) -> dict[str, str]:
    """The environment the local runtime gives tasks and monitors, for ``settings``.

    This process's environment without its own broker, database and state folder (a
    ``settings`` without a broker must not inherit one), then ``settings.to_env()``; the
    repository first on ``PYTHONPATH`` (an existing one kept after it) and unbuffered output.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "PIPELINE_STATE_DIR")}
    env.update(settings.to_env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_orchestrator(settings: Settings, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run", *args], cwd=REPO,
                            env=child_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_orchestrator(settings: Settings, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "run", *args], cwd=REPO,
                          env=child_env(settings), capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class StoredOrder:
    id: int
    name: str
    status: str
    runs: list[dict]  # task_runs rows with the task name, by position and attempt
    samples: list[dict]  # measurements with task and resource names


def stored_orders(settings: Settings) -> dict[str, StoredOrder]:
    """Every order in the database by name (names are unique within a test)."""
    return {order.name: order for order in all_stored_orders(settings)}


def all_stored_orders(settings: Settings) -> list[StoredOrder]:
    """Every order in the database, in id order (a repeated order appears once per run)."""
    engine = connect(settings.database_url)
    with engine.connect() as conn:
        order_rows = conn.execute(select(orders)).mappings().all()
        runs = conn.execute(
            select(task_runs, tasks.c.name.label("task"))
            .join(tasks, tasks.c.id == task_runs.c.task_id)
            .order_by(task_runs.c.position, task_runs.c.attempt)
        ).mappings().all()
        samples = conn.execute(
            select(measurements, tasks.c.name.label("task"), resources.c.name.label("resource"))
            .join(tasks, tasks.c.id == measurements.c.task_id)
            .join(resources, resources.c.id == measurements.c.resource_id)
            .order_by(measurements.c.ts)
        ).mappings().all()
    return [
        StoredOrder(
            row["id"], row["name"], row["status"],
            [dict(r) for r in runs if r["order_id"] == row["id"]],
            [dict(s) for s in samples if s["order_id"] == row["id"]],
        )
        for row in sorted(order_rows, key=lambda r: r["id"])
    ]


def ran_orders(settings: Settings) -> list[StoredOrder]:
    """The orders that ran, in id order. An id whose topics another database left on the
    broker is skipped by the orchestrator (its row FAILED, without task runs): on a broker
    shared by many tests' databases that happens, and such rows are not orders that ran."""
    return [order for order in all_stored_orders(settings) if order.runs]


def pipeline_processes(settings: Settings, order_id: int | None = None) -> list[psutil.Process]:
    """Live task and monitor processes working for ``settings``' database (and one order).

    Processes are matched by their DATABASE_URL, so runs of other tests or developers on the
    same machine, which have their own databases and may reuse order ids, never count.
    """
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE or len(cmdline) < 3:
            continue
        is_monitor = cmdline[1:3] == ["-m", "monitor"]
        is_task = cmdline[1] == "-m" and cmdline[2].startswith("services.")
        if not (is_monitor or is_task):
            continue
        try:
            if process.environ().get("DATABASE_URL") != settings.database_url:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if order_id is None or str(order_id) in cmdline[3:]:
            found.append(process)
    return found
