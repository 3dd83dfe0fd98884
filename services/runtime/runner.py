"""The shared task runtime: the protocol steps of every image task, around its image operation.

On start: ORDER on ``task<ID>`` (headers ``pid``, ``host``, ``index``). On end: PROGRESS on
``orchestrator`` (headers ``order_id``, ``task``, ``index``, ``status``), HALT on
``task<ID>``, and STOP when it was the last task. A task that raises reports a failed PROGRESS
and exits non-zero, so the orchestrator can retry it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.errors import PipelineError
from pipeline.kafka import Producer
from pipeline.logs import configure_logging
from pipeline.protocol import (
    OrderStopped, Progress, TaskHalted, TaskStarted, TaskStatus, decode_output,
    decode_required_tasks,
)
from pipeline.settings import Settings
from services.runtime.faults import Fault
from services.runtime.spec import ImageTask

logger = logging.getLogger(__name__)

# The monitor learns of a task through Kafka; a task that ended before the monitor read its
# ORDER would leave no sample. Light tasks therefore stay observable at least this long.
MIN_OBSERVABLE_SECONDS = 0.5
EXIT_FAILED = 1


@dataclass(frozen=True)
class TaskInvocation:
    """What the orchestrator starts a task with (DESIGN.md: required tasks, own name, orderID,
    progress so far), plus the order's input image, parameters and any injected fault."""

    order_id: int
    required_tasks: tuple[str, ...]
    task_name: str
    progress: tuple[str, ...]
    image: Path
    params: dict
    fault: str | None
    fault_at: float
    attempt: int

    @property
    def index(self) -> int:
        """The task's position: the number of earlier outputs."""
        return len(self.progress)

    @property
    def is_last(self) -> bool:
        return self.index == len(self.required_tasks) - 1

    @property
    def input_path(self) -> Path:
        return Path(self.progress[-1]) if self.progress else self.image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run one image task of an order.")
    parser.add_argument("--order-id", type=int, required=True)
    parser.add_argument("--required-tasks", required=True, help="task names joined with ','")
    parser.add_argument("--task-name", required=True)
    parser.add_argument("--progress", default="", help="earlier outputs, as in PROGRESS's value")
    parser.add_argument("--image", required=True, help="the order's input image")
    parser.add_argument("--params", default="{}", help="the task's parameters as JSON")
    parser.add_argument("--fault", default=None)
    parser.add_argument("--fault-at", type=float, default=0.0)
    parser.add_argument("--attempt", type=int, default=1)
    return parser


def parse_invocation(argv: list[str] | None = None) -> TaskInvocation:
    """Parse and check the command line (wire formats through the protocol module)."""
    args = build_parser().parse_args(argv)
    progress = tuple(decode_output(p) for p in args.progress.split(":")) if args.progress else ()
    return TaskInvocation(
        order_id=args.order_id,
        required_tasks=decode_required_tasks(args.required_tasks),
        task_name=args.task_name,
        progress=progress,
        image=Path(args.image),
        params=json.loads(args.params),
        fault=args.fault,
        fault_at=args.fault_at,
        attempt=args.attempt,
    )


def output_path(settings: Settings, inv: TaskInvocation, task: ImageTask) -> Path:
    """One file per task under ARTIFACT_DIR: ``order-<ID>/<position>-<task>.<ext>``."""
    extension = {"JPEG": "jpg"}.get(task.output_format, task.output_format.lower())
    return settings.artifact_dir / f"order-{inv.order_id}" / f"{inv.index:02d}-{inv.task_name}.{extension}"


def run_task(task: ImageTask, inv: TaskInvocation, settings: Settings, stop: threading.Event) -> int:
    """Announce, work, report; returns the exit status."""
    with Producer(settings, **{"linger.ms": 0}) as producer:
        started = time.monotonic()
        producer.send_now(TaskStarted(inv.required_tasks, inv.task_name, inv.order_id,
                                      os.getpid(), socket.gethostname(), inv.index).encode())
        try:
            output = _work(task, inv, settings, stop)
        except Exception as exc:  # noqa: BLE001 - the job boundary: report, never swallow
            logger.exception("order_id=%d task=%s index=%d failed", inv.order_id, inv.task_name, inv.index)
            _linger(started, stop)
            producer.send(Progress(inv.order_id, inv.task_name, inv.index, TaskStatus.FAILED,
                                   inv.progress, error=f"{type(exc).__name__}: {exc}"[:500],
                                   attempt=inv.attempt).encode())
            producer.send(TaskHalted(inv.order_id).encode())
            return EXIT_FAILED
        _linger(started, stop)
        producer.send(Progress(inv.order_id, inv.task_name, inv.index, TaskStatus.SUCCEEDED,
                               (*inv.progress, str(output)), attempt=inv.attempt).encode())
        producer.send(TaskHalted(inv.order_id).encode())
        if inv.is_last:
            producer.send(OrderStopped(inv.order_id).encode())
    logger.info("order_id=%d task=%s index=%d wrote %s", inv.order_id, inv.task_name, inv.index, output)
    return 0


def _work(task: ImageTask, inv: TaskInvocation, settings: Settings, stop: threading.Event) -> Path:
    fault = Fault(inv.fault, inv.fault_at, stop)
    fault.before_work()
    with Image.open(inv.input_path) as source:
        source.load()
        result = task.run(source, inv.params)
    target = output_path(settings, inv, task)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    result.save(partial, format=task.output_format)
    partial.replace(target)  # a reader never sees half an image
    fault.after_work()
    return target


def _linger(started: float, stop: threading.Event) -> None:
    remaining = MIN_OBSERVABLE_SECONDS - (time.monotonic() - started)
    if remaining > 0:
        stop.wait(remaining)


def main(task: ImageTask, argv: list[str] | None = None) -> int:
    """Entry point of every ``services/<task>/main.py``."""
    configure_logging()
    stop = threading.Event()
    # SIGTERM (Kubernetes, the orchestrator's timeout) ends a stalled task cleanly.
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), sys.exit(143)))
    try:
        inv = parse_invocation(argv)
        if inv.task_name != task.name:
            raise PipelineError(f"this is task {task.name!r}, asked to run {inv.task_name!r}")
        return run_task(task, inv, Settings.from_env(), stop)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
