"""The shared task runtime: the protocol steps of every image task, around its image operation.

On start: ORDER on ``task<ID>`` (headers ``pid``, ``host``, ``index``, ``attempt``,
``started_ns``). On end: PROGRESS on ``orchestrator`` (headers ``order_id``, ``task``,
``index``, ``status``), HALT on ``task<ID>`` with the task's own totals (what the kernel
accounted for it, read last, for the monitor's closing sample), and STOP when it was the last
task. A task that raises reports a failed PROGRESS and exits non-zero, so the orchestrator can
retry it. A task asked to read or write outside ARTIFACT_DIR (the order's image, read by the
first task, excepted) refuses before opening anything, with one line and no traceback.

Nothing waits for the monitor: a task shorter than the sampling interval is accounted for by
its totals, so no task is slowed down to be seen.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from PIL import Image

from pipeline.entry import exit_status
from pipeline.errors import PipelineError
from pipeline.kafka import Producer
from pipeline.lifetime import exit_now, stop_with_parent
from pipeline.logs import configure_logging
from pipeline.invocation import TaskInvocation
from pipeline.proctime import started_ns
from pipeline.protocol import OrderStopped, Progress, TaskHalted, TaskStarted, TaskStatus
from pipeline.settings import Settings
from services.runtime.confinement import PathRefused, check_paths
from services.runtime.faults import Fault
from services.runtime.spec import ImageTask
from services.runtime.totals import operation_clock_ns, own_totals

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
_UNTIL_EXIT: list[Producer] = []  # clients the process's end drops, not the interpreter


def output_path(settings: Settings, inv: TaskInvocation, task: ImageTask) -> Path:
    """One file per task under ARTIFACT_DIR: ``order-<ID>/<position>-<task>.<ext>``."""
    extension = {"JPEG": "jpg"}.get(task.output_format, task.output_format.lower())
    return settings.artifact_dir / f"order-{inv.order_id}" / f"{inv.position:02d}-{inv.task_name}.{extension}"


def task_host() -> str:
    """The ``host`` header of ORDER: the pod's name on Kubernetes (the sampler sidecar of the
    pod recognises its task by it), the machine's name elsewhere."""
    return os.environ.get("POD_NAME") or socket.gethostname()


def run_task(task: ImageTask, inv: TaskInvocation, settings: Settings, stop: threading.Event) -> int:
    """Announce, work, report; returns the exit status."""
    # Not idempotent: an idempotent producer's first message waits ~500 ms for its producer id
    # (measured, bench/order_flow.py), a delay every task would pay before the monitor hears
    # of it; a duplicated ORDER or PROGRESS is harmless to their readers.
    producer = Producer(settings, **{"linger.ms": 0, "enable.idempotence": False})
    try:
        # Sent, not awaited: the work need not wait for the broker's ack (a failed delivery
        # is raised at the next send), and HALT's totals cover whatever the monitor misses.
        producer.send(TaskStarted(inv.required_tasks, inv.task_name, inv.order_id, os.getpid(),
                                  task_host(), inv.position, inv.attempt, started_ns()).encode())
        try:
            output, operation_ns = _work(task, inv, settings, stop)
        except PathRefused as exc:  # a forged path: one line, no traceback, nothing opened
            logger.error("order_id=%d task=%s index=%d %s", inv.order_id, inv.task_name, inv.position, exc)
            _end(producer, inv, Progress(inv.order_id, inv.task_name, inv.position, TaskStatus.FAILED,
                                         inv.progress, error=str(exc)[:500], attempt=inv.attempt), last=False)
            return EXIT_FAILED
        except Exception as exc:  # noqa: BLE001 - the job boundary: report, never swallow
            logger.exception("order_id=%d task=%s index=%d failed", inv.order_id, inv.task_name, inv.position)
            _end(producer, inv, Progress(inv.order_id, inv.task_name, inv.position, TaskStatus.FAILED,
                                         inv.progress, error=f"{type(exc).__name__}: {exc}"[:500],
                                         attempt=inv.attempt), last=False)
            return EXIT_FAILED
        logger.info("order_id=%d task=%s index=%d wrote %s", inv.order_id, inv.task_name, inv.position, output)
        _end(producer, inv, Progress(inv.order_id, inv.task_name, inv.position, TaskStatus.SUCCEEDED,
                                     (*inv.progress, str(output)), attempt=inv.attempt,
                                     operation_ns=operation_ns), last=inv.is_last,
             output=output)
    finally:
        # Delivered, and the client left for the process's end to drop (main exits at once):
        # destroying it, its threads joined, is CPU after the totals were read that no sample
        # would account for (~10 ms, 6 % of a 0.2 s task's).
        producer.flush()
        _UNTIL_EXIT.append(producer)
    return 0


def _end(producer: Producer, inv: TaskInvocation, progress: Progress, last: bool,
         output: Path | None = None) -> None:
    """PROGRESS, then HALT (and STOP) with the totals read as late as possible: only
    delivering these messages and exiting remain, and :func:`main` exits without
    interpreter teardown. The totals include the size of ``output``, what the run wrote, and
    the operation's CPU time (the same as PROGRESS's)."""
    totals = own_totals(output, progress.operation_ns)
    producer.send(progress.encode())
    producer.send(TaskHalted(inv.order_id, totals).encode())
    if last:
        producer.send(OrderStopped(inv.order_id).encode())


def _work(task: ImageTask, inv: TaskInvocation, settings: Settings, stop: threading.Event) -> tuple[Path, int | None]:
    """The task's output, and the CPU time of its operation: applying it and saving the result
    (decoding the input is not the task's work, and is the same for every task)."""
    target = output_path(settings, inv, task)
    partial = target.with_name(target.name + ".partial")
    # Before anything is opened: the earlier outputs came in a message anyone who can write to
    # the broker could have forged (services/runtime/confinement.py).
    check_paths(inv, (target, partial), settings.artifact_dir)
    fault = Fault(inv.fault, inv.fault_at, stop, inv.fault_factor)
    fault.before_work()
    with Image.open(inv.input_path) as source:
        source.load()
        began = operation_clock_ns()
        result = fault.work(task.run, source, inv.params)  # task.run(source, inv.params) unless faulted
    target.parent.mkdir(parents=True, exist_ok=True)
    fault.save(result, partial, task.output_format)  # result.save(partial, format=...) unless faulted
    ended = operation_clock_ns()
    partial.replace(target)  # a reader never sees half an image
    fault.after_work()
    return target, None if began is None or ended is None else max(ended - began, 0)


def main(task: ImageTask, argv: list[str] | None = None) -> int:
    """Entry point of every ``services/<task>/main.py``. An expected failure is one line in the
    task's log, as at every entry point (pipeline/entry.py)."""
    configure_logging()
    stop = threading.Event()
    # SIGTERM (Kubernetes, the orchestrator's timeout) ends a stalled task cleanly.
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), sys.exit(143)))
    stop_with_parent()
    status = exit_status(lambda: _invoke(task, argv, stop))
    # HALT's totals were read just before: a full teardown would be CPU no sample accounts for.
    exit_now(status)


def _invoke(task: ImageTask, argv: list[str] | None, stop: threading.Event) -> int:
    inv = TaskInvocation.from_args(argv)
    if inv.task_name != task.name:
        raise PipelineError(f"this is task {task.name!r}, asked to run {inv.task_name!r}")
    return run_task(task, inv, Settings.from_env(), stop)
