"""Conservation of usage, end to end: the stored samples of every task run add up to what the
kernel accounted for the task's process tree, reaped children included.

Real tasks run against the real broker and database with the real monitor-producer and
monitor-consumer; the test itself is every task's parent, so it gathers the kernel's figures
without the sampler: wait4's rusage (the task and each child it reaped) and the task's
/proc/<pid>/io read while it is a zombie. A run's samples are integrated as the protocol
defines them: each a rate over the interval that ends at its timestamp, the first starting
when the task's process did.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.db import connect
from pipeline.db.schema import measurements, resources
from pipeline.invocation import TaskInvocation
from pipeline.kafka import TopicAdmin
from pipeline.protocol import order_topics
from services.catalog import get_task, task_module
from services.runtime.runner import output_path
from devkit.orders import IMAGES, REPO, child_env

ORDER_ID = 870_001
TASKS = [
    # (name, params, fault): what each run exercises
    ("flip", {}, None),  # about 50 ms of work: gone before the first one-second tick
    ("median", {"size": 7, "passes": 3}, None),  # seconds of CPU: several live samples
    ("blur", {}, "cpu_hog"),  # forks worker children that it reaps
    ("upscale", {"factor": 2, "iterations": 1}, None),  # writes a large file
]


@dataclass
class KernelAccount:
    started_ms: float
    ended_ms: float
    cpu_seconds: float
    peak_rss_kib: int
    read_bytes: int
    write_bytes: int


def _run_task(settings, env, position: int, progress: tuple[str, ...]) -> tuple[KernelAccount, str]:
    name, params, fault = TASKS[position]
    invocation = TaskInvocation(ORDER_ID, tuple(t[0] for t in TASKS), name, progress,
                                IMAGES / "scene-640x480.jpg", params, fault, 0.3 if fault else 0.0)
    task = subprocess.Popen([sys.executable, "-m", task_module(name), *invocation.to_args()], cwd=REPO, env=env)
    os.waitid(os.P_PID, task.pid, os.WEXITED | os.WNOWAIT)  # a zombie: its counters are final
    ended_ms = time.time() * 1000
    io = dict(line.split(": ") for line in Path(f"/proc/{task.pid}/io").read_text().splitlines())
    started_ms = _kernel_start_ms(task.pid)
    _, status, usage = os.wait4(task.pid, 0)
    task.returncode = os.waitstatus_to_exitcode(status)
    assert task.returncode == 0, f"{name} failed"
    account = KernelAccount(started_ms, ended_ms, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
                            int(io["read_bytes"]), int(io["write_bytes"]))
    return account, str(output_path(settings, invocation, get_task(name)))


def _kernel_start_ms(pid: int) -> float:
    """When the kernel started ``pid`` (its ``starttime``, clock ticks since boot), in wall ms."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return (time.time() - age) * 1000


def _monitor(env, kind: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "monitor", kind, str(ORDER_ID)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "READY", process.stderr.read()
    return process


def _stored_series(settings) -> dict[int, dict[str, list[tuple[float, float]]]]:
    engine = connect(settings.database_url)
    query = (select(measurements.c.position, resources.c.name, measurements.c.ts, measurements.c.value)
             .join(resources, resources.c.id == measurements.c.resource_id)
             .where(measurements.c.order_id == ORDER_ID).order_by(measurements.c.ts))
    series: dict = {}
    with engine.connect() as conn:
        for position, resource, ts, value in conn.execute(query):
            stamp = ts.replace(tzinfo=ts.tzinfo or timezone.utc).timestamp() * 1000
            series.setdefault(position, {}).setdefault(resource, []).append((stamp, value))
    engine.dispose()
    return series


def _integral(points: list[tuple[float, float]], started_ms: float) -> float:
    total, previous = 0.0, started_ms
    for stamp, value in points:
        total += value * (stamp - previous) / 1000.0
        previous = stamp
    return total


@pytest.fixture
def accounted_order(settings):
    """Run the tasks of TASKS one after another under both monitors; the kernel's figures per
    position and the stored samples per position."""
    admin = TopicAdmin(settings)
    topics = list(order_topics(ORDER_ID))
    admin.delete([t for t in topics if t in admin.existing()])
    admin.create(topics)
    env = {**child_env(settings), "LIVE_SCORING": "off"}
    producer, consumer = _monitor(env, "producer"), _monitor(env, "consumer")
    try:
        truth, progress = {}, ()
        for position in range(len(TASKS)):
            truth[position], output = _run_task(settings, env, position, progress)
            progress = (*progress, output)
        # The last task's STOP ends the monitors' handshake.
        assert consumer.wait(120) == 0 and producer.wait(120) == 0
        yield truth, _stored_series(settings)
    finally:
        for process in (producer, consumer):
            if process.poll() is None:
                process.kill()
                process.wait()
        admin.delete(topics)


def test_every_run_adds_up_to_the_kernels_accounting(accounted_order):
    truth, series = accounted_order
    for position, true in truth.items():
        name = TASKS[position][0]
        stored = series[position]
        # The task's own usage, and the node's CPU pressure it ran under (this kernel has PSI).
        assert set(stored) == {"cpu", "memory", "disk_read", "disk_write", "cpu_wait", "node_cpu_pressure"}, name
        cpu = _integral(stored["cpu"], true.started_ms) / 100
        assert cpu == pytest.approx(true.cpu_seconds, rel=0.05), name
        written = _integral(stored["disk_write"], true.started_ms) * 1024
        assert written == pytest.approx(true.write_bytes, rel=0.05, abs=4096), name
        read = _integral(stored["disk_read"], true.started_ms) * 1024
        assert read == pytest.approx(true.read_bytes, rel=0.05, abs=4096), name
        peak = max(value for _, value in stored["memory"]) * 1024
        assert peak >= 0.9 * true.peak_rss_kib, name


def test_light_tasks_get_one_closing_sample_and_long_ones_one_a_second(accounted_order):
    truth, series = accounted_order
    for position, true in truth.items():
        samples, seconds = len(series[position]["cpu"]), (true.ended_ms - true.started_ms) / 1000
        # One sample per whole second of its life (ticks skipped on a busy machine are not
        # made up), and the closing one; a task shorter than a second is that one alone.
        assert 1 <= samples <= int(seconds) + 1, (TASKS[position][0], samples, seconds)
        if seconds < 1.0:
            assert samples == 1, TASKS[position][0]
    assert len(series[2]["cpu"]) >= 2  # the blur with its workers runs for 12 s
    assert all(len(points) == len(series[p]["cpu"]) for p in series for points in series[p].values())
    # The forked workers' CPU is in the samples while they run: the hog's spinners hold more
    # than the one core a single-threaded blur could.
    assert max(value for _, value in series[2]["cpu"]) > 120
