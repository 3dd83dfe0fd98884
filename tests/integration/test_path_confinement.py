"""A forged output path reaches a task, against the real broker: the task refuses it before
opening anything (one line, a failed PROGRESS carrying it, exit status 1, no traceback), and an
order whose PROGRESS was forged fails cleanly through the orchestrator's retry path.

The forged path is a FIFO outside the artifact directory. Opening a FIFO for reading completes
the open of a writer waiting on it, so a test holding that writer knows whether anything
opened the path at all (and a task that did would hang, not pass).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import SQLAlchemyError

from pipeline.invocation import TaskInvocation
from pipeline.kafka import Consumer, Producer, TopicAdmin
from pipeline.protocol import ORCHESTRATOR_TOPIC, Key, Progress, TaskStatus, order_topics
from services.catalog import task_module
from devkit.orders import IMAGES, REPO, all_stored_orders, child_env, start_orchestrator, write_order

ORDER_ID = 880_101


class WatchedFifo:
    """A FIFO with a writer waiting on it: :attr:`opened` says whether anyone opened it to read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._closing = False
        self._writer = threading.Thread(target=self._wait_for_a_reader, daemon=True)
        self._writer.start()

    def _wait_for_a_reader(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # returns once a reader has opened the FIFO
        self.opened = not self._closing
        os.close(fd)

    def close(self) -> None:
        """Release the writer by opening the FIFO ourselves (not counted as a reader)."""
        self._closing = True
        reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._writer.join(5)
        os.close(reader)


def _forged(kind: str, artifacts: Path, fifo: Path) -> str:
    """A path to the FIFO that looks, in its own way, like an earlier output."""
    order_dir = artifacts / f"order-{ORDER_ID}"
    order_dir.mkdir(parents=True, exist_ok=True)
    if kind == "absolute":
        return str(fifo)
    if kind == "dotdot":
        return str(order_dir / ".." / ".." / fifo.parent.name / fifo.name)
    link = order_dir / "00-grayscale.png"
    link.symlink_to(fifo)
    return str(link)


def _progress_of(consumer: Consumer, order_id: int, timeout: float = 30.0) -> Progress:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.key == Key.PROGRESS.value and message.header("order_id") == str(order_id):
            return Progress.decode(message)
    raise AssertionError(f"no PROGRESS of order {order_id} within {timeout:g}s")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_a_task_refuses_a_forged_input_before_opening_it(settings, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = WatchedFifo(outside / "shadow.png")
    forged = _forged(kind, settings.artifact_dir, fifo.path)
    admin = TopicAdmin(settings)
    topics = [*order_topics(ORDER_ID)]
    admin.delete([t for t in topics if t in admin.existing()])
    admin.create([ORCHESTRATOR_TOPIC, *topics])
    invocation = TaskInvocation(ORDER_ID, ("grayscale", "blur"), "blur", (forged,), IMAGES / "scene-640x480.jpg")
    try:
        with Consumer(settings) as consumer:
            consumer.assign([ORCHESTRATOR_TOPIC], from_end=True)
            task = subprocess.run([sys.executable, "-m", task_module("blur"), *invocation.to_args()], cwd=REPO,
                                  env=child_env(settings), capture_output=True, text=True, timeout=60)
            progress = _progress_of(consumer, ORDER_ID)
    finally:
        fifo.close()
        admin.delete(topics)

    resolved = os.path.realpath(forged)
    where = f" (resolving to {resolved})" if resolved != os.path.abspath(forged) else ""
    line = f"refused: input {forged}{where} is outside the artifact directory {settings.artifact_dir}"
    assert task.returncode == 1, task.stderr
    assert not fifo.opened, "the task opened the forged path"
    assert "Traceback" not in task.stdout + task.stderr
    refusals = [out for out in task.stderr.splitlines() if "refused:" in out]
    assert len(refusals) == 1 and refusals[0].endswith(f"order_id={ORDER_ID} task=blur index=1 {line}"), task.stderr
    assert (progress.status, progress.error, progress.index, progress.task) == (TaskStatus.FAILED, line, 1, "blur")
    assert not any(settings.artifact_dir.rglob("*-blur.*")), "the task wrote an output"


def _running_order_id(settings, timeout: float = 60.0) -> int:
    """The id of this test's order once its first task run is recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = [o for o in all_stored_orders(settings) if o.status == "RUNNING" and o.runs]
        except SQLAlchemyError:  # the orchestrator has not created the tables yet
            running = []
        if running:
            return running[0].id
        time.sleep(0.2)
    raise AssertionError(f"no order started within {timeout:g}s")


def test_a_forged_progress_fails_the_order_with_the_refusal_line(settings, tmp_path):
    """The first task stalls; a PROGRESS forged in its name says it wrote /etc/passwd. The
    orchestrator passes that on (it takes PROGRESS's outputs as they come), and the second
    task refuses it on every attempt, so the order fails with that one line."""
    tasks = [{"name": "blur", "fault": "stall", "fault_at": 0}, "grayscale"]
    path = write_order(tmp_path, "forged-progress", tasks,
                       retry={"max_attempts": 2, "backoff_seconds": 0, "task_timeout_seconds": 120})
    orchestrator = start_orchestrator(settings, "--no-monitors", str(path))
    try:
        order_id = _running_order_id(settings)
        with Producer(settings) as producer:
            producer.send(Progress(order_id, "blur", 0, TaskStatus.SUCCEEDED, ("/etc/passwd",)).encode())
        out, err = orchestrator.communicate(timeout=180)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
            orchestrator.wait()

    line = f"refused: input /etc/passwd is outside the artifact directory {settings.artifact_dir}"
    assert orchestrator.returncode == 1, out + err
    assert "FAILED" in out and line in out + err, out + err
    assert "Traceback" not in out + err
    order = next(o for o in all_stored_orders(settings) if o.id == order_id)
    assert order.status == "FAILED"
    refused = [r for r in order.runs if r["task"] == "grayscale"]
    assert [(r["attempt"], r["status"], r["error"]) for r in refused] == [(1, "FAILED", line), (2, "FAILED", line)]
    logs = sorted((settings.state_dir / "logs" / f"order-{order_id}").glob("01-grayscale-*.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert line in text and "Traceback" not in text, text
