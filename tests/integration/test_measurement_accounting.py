"""Conservation of usage, end to end: the stored samples of every task run add up to what the
kernel accounted for the task's process tree, reaped children included.

Real tasks run against the real broker and database with the real monitor-producer and
monitor-consumer; the test itself is every task's parent, so it gathers the kernel's figures
without the sampler: wait4's rusage (the task and each child it reaped) and the task's
/proc/<pid>/io read while it is a zombie. A run's samples are integrated as the protocol
defines them: each a rate over the interval that ends at its timestamp, the first starting
when the task's process did.

Adding up is not enough: the closing sample (published on HALT from the task's own totals
less what the periodic samples counted) absorbs any undercount of the periodic samples, so a
run adds up whatever they say. Two checks can fail on such an undercount: the share of every
run's CPU that its closing sample carries is held to its interval's share of the run's time,
and the periodic samples of a task that works, stalls and works again are held, one by one,
to an independent reader of the task tree's CPU time (devkit/tree_cpu.py, /proc/<pid>/stat
about ten times a second, read by the test itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
from devkit.sample_series import closing_share, intervals
from devkit.tree_cpu import TreeCpuReader

ORDER_ID = 870_001
TASKS = [
    # (name, params, fault): what each run exercises
    ("flip", {}, None),  # about 50 ms of work: gone before the first one-second tick
    ("median", {"size": 7, "passes": 3}, None),  # seconds of CPU: several live samples
    ("blur", {}, "cpu_hog"),  # forks worker children that it reaps
    ("upscale", {"factor": 2, "iterations": 1}, None),  # writes a large file
]

# A task that works, stalls and works again: a median filter of about 6 CPU-seconds, which the
# test freezes (SIGSTOP) once two periodic samples of it are stored and thaws (SIGCONT) once
# two more lie wholly in the freeze. The catalog's `stall` fault cannot serve: it never ends
# but by SIGTERM, and a task ended so sends no HALT, hence no closing sample.
PHASED_ORDER_ID = 870_002
PHASED_TASKS = [("median", {"size": 9, "passes": 10}, None)]
PHASED_IMAGE = "scene-1024x768.jpg"

# How much of a run's CPU its closing sample may carry: its interval's share of the run's time
# plus CLOSING_MARGIN, for the phased run and every run of CLOSING_BOUNDED_CPU_S or more by the
# kernel's account (the blur's 12 s of three spinners; the others are one to three samples,
# mostly closing). Were the tree's CPU rate the same in the closing interval as over the whole
# run, the closing sample would carry exactly the time share; it carries time share x (closing
# rate / mean rate - 1) more. Measured on two cores, quiet and with two spinners beside the
# test: for the long runs at most 0.037 more (the phased run, whose mean rate the stall lowers:
# ratios 1.1 to 1.6, at time shares up to 0.073); a margin of 0.10 allows a ratio of 2.4 there.
# A short run cannot be bounded so: it is a few intervals, each getting what the machine leaves
# it, and with another test suite's CPU hogs beside this one (load average 5) the 1.1 CPU-s
# median took 7.4 s and its closing sample carried 0.227 of its CPU in 0.045 of its time (a
# ratio of 5); the blur, starved as much, can fall under 4 CPU-s and go unbounded. A 20 %
# undercount of the periodic samples moves a fifth of them into the closing sample: 0.18 or more
# over the time share of a run whose closing interval is a tenth of it or less.
CLOSING_MARGIN = 0.10
CLOSING_BOUNDED_CPU_S = 4.0


def _closing_bound(time_share: float) -> float:
    return time_share + CLOSING_MARGIN


def _closing_failure(name: str, share) -> str:
    return (f"{name}: the closing sample carries {share.cpu_share:.3f} of the run's {share.run_cpu_s:.2f} CPU-s "
            f"over {share.time_share:.3f} of its {share.run_s:.2f} s (at most {_closing_bound(share.time_share):.3f})")


# Each sample against the independent reader (see test_periodic_samples_follow_...).
READER_SLACK_S = 0.05
STALL_CEILING = 2.0  # percent of one core
WORK_FLOOR = 5 * STALL_CEILING
"""Percent of one core a work phase holds at least, over the phase: far above any stall, so the
samples tell work from a stall. How much more the task gets is the machine's to decide (a
CPU hog beside CI gave the work phase 14 % of a core, agreeing with the reader), and the level
is held by the reader check, not by this floor."""


@dataclass
class KernelAccount:
    started_ms: float
    ended_ms: float
    cpu_seconds: float
    peak_rss_kib: int
    read_bytes: int
    write_bytes: int


def _run_task(settings, env, position: int, progress: tuple[str, ...], order_id: int = ORDER_ID,
              tasks: list = TASKS, image: str = "scene-640x480.jpg",
              while_running: Callable[[subprocess.Popen, float], None] | None = None,
              ) -> tuple[KernelAccount, str]:
    """Run task ``position`` of ``tasks`` as this process's child; the kernel's account of it.
    ``while_running(task, started_ms)`` runs once the task has started, before it is awaited."""
    name, params, fault = tasks[position]
    invocation = TaskInvocation(order_id, tuple(t[0] for t in tasks), name, progress,
                                IMAGES / image, params, fault, 0.3 if fault else 0.0)
    task = subprocess.Popen([sys.executable, "-m", task_module(name), *invocation.to_args()], cwd=REPO, env=env)
    if while_running is not None:
        while_running(task, _kernel_start_ms(task.pid))
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


def _monitor(env, kind: str, order_id: int = ORDER_ID) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "monitor", kind, str(order_id)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "READY", process.stderr.read()
    return process


def _stored_series(settings, order_id: int = ORDER_ID, engine=None) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """(timestamp ms, value) of every stored sample of ``order_id``, by position and resource."""
    own = engine is None
    engine = connect(settings.database_url) if own else engine
    query = (select(measurements.c.position, resources.c.name, measurements.c.ts, measurements.c.value)
             .join(resources, resources.c.id == measurements.c.resource_id)
             .where(measurements.c.order_id == order_id).order_by(measurements.c.ts))
    series: dict = {}
    with engine.connect() as conn:
        for position, resource, ts, value in conn.execute(query):
            stamp = ts.replace(tzinfo=ts.tzinfo or timezone.utc).timestamp() * 1000
            series.setdefault(position, {}).setdefault(resource, []).append((stamp, value))
    if own:
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
        # Adding up is not enough: whatever the periodic samples undercount, the closing
        # sample makes up. It may carry only about its interval's share of the run.
        share = closing_share(stored["cpu"], true.started_ms)
        print(f"{name}: closing sample carries {share.cpu_share:.3f} of {share.run_cpu_s:.2f} CPU-s over "
              f"{share.time_share:.3f} of {share.run_s:.2f} s ({share.periodic} periodic samples)")
        if true.cpu_seconds >= CLOSING_BOUNDED_CPU_S:
            assert share.cpu_share <= _closing_bound(share.time_share), _closing_failure(name, share)


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
    # The forked workers are in the samples while they run: the hog's spinners ask for more
    # than the one core a single-threaded blur could. Asked for, not got: cpu + cpu_wait of a
    # tick (the demand), since on a machine shared with more than two spinners the tree's cpu
    # alone fell to 105 % of a core while its four processes still waited to run.
    blur = series[2]
    assert max(cpu + wait for (_, cpu), (_, wait) in zip(blur["cpu"], blur["cpu_wait"])) > 120


@dataclass
class PhasedRun:
    true: KernelAccount
    reader: TreeCpuReader
    stalled_ms: float  # SIGSTOP sent (the tree runs nothing after it)
    resumed_ms: float  # SIGCONT about to be sent (nor before it)
    cpu: list[tuple[float, float]]  # the run's stored cpu samples


def _exited(pid: int) -> bool:
    """Whether ``pid``, this process's child, has ended, without reaping it."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _wait_for(condition: Callable[[], bool], task: subprocess.Popen, what: str) -> None:
    """Poll (the database) until ``condition`` holds; the task must not end meanwhile."""
    while not condition():
        if _exited(task.pid):
            pytest.fail(f"the task ended before {what}: give it more work (PHASED_TASKS)")
        time.sleep(0.05)


@pytest.fixture
def phased_run(settings):
    """One long median run under both monitors, frozen in the middle for a few samples, read
    by TreeCpuReader throughout. Both phase changes wait for stored samples, not for time."""
    admin = TopicAdmin(settings)
    topics = list(order_topics(PHASED_ORDER_ID))
    admin.delete([t for t in topics if t in admin.existing()])
    admin.create(topics)
    env = {**child_env(settings), "LIVE_SCORING": "off"}
    producer, consumer = (_monitor(env, "producer", PHASED_ORDER_ID), _monitor(env, "consumer", PHASED_ORDER_ID))
    engine = connect(settings.database_url)
    phases: dict = {}

    def stamps() -> list[float]:
        return [stamp for stamp, _ in _stored_series(settings, PHASED_ORDER_ID, engine).get(0, {}).get("cpu", [])]

    def work_stall_work(task: subprocess.Popen, started_ms: float) -> None:
        phases["task"] = task
        phases["reader"] = TreeCpuReader(task.pid, started_ms).start()
        _wait_for(lambda: len(stamps()) >= 2, task, "two samples of its work were stored")
        os.kill(task.pid, signal.SIGSTOP)
        phases["stalled_ms"] = stalled = time.time() * 1000
        # The first sample after the freeze spans it: two more lie wholly inside.
        _wait_for(lambda: sum(stamp > stalled for stamp in stamps()) >= 3, task,
                  "three samples after the freeze were stored")
        phases["resumed_ms"] = time.time() * 1000
        os.kill(task.pid, signal.SIGCONT)
        os.waitid(os.P_PID, task.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped yet
        phases["reader"].finish()  # so its last reading holds the final counters

    try:
        true, _ = _run_task(settings, env, 0, (), PHASED_ORDER_ID, PHASED_TASKS, PHASED_IMAGE,
                            while_running=work_stall_work)
        assert consumer.wait(120) == 0 and producer.wait(120) == 0
        yield PhasedRun(true, phases["reader"], phases["stalled_ms"], phases["resumed_ms"],
                        _stored_series(settings, PHASED_ORDER_ID, engine)[0]["cpu"])
    finally:
        if "reader" in phases:
            phases["reader"].finish()  # (done already unless the scenario failed)
        if "task" in phases and phases["task"].returncode is None:  # the scenario failed
            phases["task"].kill()  # a frozen task too
            phases["task"].wait()
        engine.dispose()
        for process in (producer, consumer):
            if process.poll() is None:
                process.kill()
                process.wait()
        admin.delete(topics)


def test_periodic_samples_follow_the_task_through_work_and_a_stall(phased_run):
    run, reader = phased_run, phased_run.reader
    spans = intervals(run.cpu, run.true.started_ms)
    periodic = spans[:-1]
    stall = [i for i in periodic if i.from_ms >= run.stalled_ms and i.to_ms <= run.resumed_ms]
    before = [i for i in periodic if i.to_ms <= run.stalled_ms]
    after = [i for i in periodic if i.from_ms >= run.resumed_ms]
    gaps = reader.gaps_ms()
    print(f"reader: {len(reader.readings)} readings, gap median {sorted(gaps)[len(gaps) // 2]:.0f} ms, "
          f"max {max(gaps):.0f} ms; stalled {run.stalled_ms - run.true.started_ms:.0f} ms to "
          f"{run.resumed_ms - run.true.started_ms:.0f} ms after the start")
    for i in spans:
        low, interpolated, high = reader.between(i.from_ms, i.to_ms)
        print(f"  {i.from_ms - run.true.started_ms:7.0f} to {i.to_ms - run.true.started_ms:7.0f} ms: "
              f"{i.value:6.1f} % -> {i.amount / 100:.3f} CPU-s; reader {low:.3f} <= {interpolated:.3f} <= {high:.3f}")
    # The scenario happened: work, then at least two samples wholly frozen, then work again.
    assert len(before) >= 2 and len(stall) >= 2 and len(after) >= 1, (len(before), len(stall), len(after))

    # Every sample, the closing one too, agrees with the independent reader over its own
    # interval. The reader's counters only grow, so the tree's CPU-seconds in the interval lie
    # between the readings just inside and just outside its ends (between()): that bracket is
    # the reader's jitter at ~10 Hz (about 0.1 s of a busy core at each end, more when the
    # reader is starved), measured rather than assumed. READER_SLACK_S adds what the bracket
    # does not hold: /proc's utime and stime are each whole 10 ms ticks (up to 20 ms low at
    # either end), and the sampler stamps a sample a moment before it reads the clocks (a
    # preemption in between, tens of ms on a busy machine, moves CPU into that sample and out
    # of the next).
    def where(i) -> str:
        return f"sample {i.from_ms - run.true.started_ms:.0f} to {i.to_ms - run.true.started_ms:.0f} ms"

    for i in spans:
        low, _, high = reader.between(i.from_ms, i.to_ms)
        assert low - READER_SLACK_S <= i.amount / 100 <= high + READER_SLACK_S, \
            f"{where(i)}: {i.amount / 100:.3f} CPU-s stored, the reader saw {low:.3f} to {high:.3f}"

    # A frozen tree runs nothing: its samples are near zero (0.0 in every run so far; the
    # freeze takes effect within microseconds of SIGSTOP, and the sample that spans it is left
    # out). A working one is not: each work sample of half a second or more holds more than a
    # stall could, and each work phase as a whole at least WORK_FLOOR. Not each sample: how
    # much a runnable task gets of an interval is the machine's to decide, and with another
    # test suite beside it the median once got 8 % of a core over a 0.4 s interval (a tick the
    # busy producer took late), agreeing with the reader; over whole phases it got 47 to 104 %,
    # and 14 % with spinning processes beside it.
    for i in stall:
        assert i.value <= STALL_CEILING, f"{where(i)} lies in the stall but holds {i.value:.1f} % of a core"
    for phase, name in ((before, "before"), (after, "after")):
        long_enough = [i for i in phase if i.seconds >= 0.5]
        assert long_enough, f"no work sample of half a second {name} the stall"
        for i in long_enough:
            assert i.value > STALL_CEILING, f"{where(i)} lies in the work but holds {i.value:.1f} % of a core"
        mean = sum(i.amount for i in phase) / sum(i.seconds for i in phase)
        print(f"work {name} the stall: {len(phase)} samples, {mean:.1f} % of a core")
        assert mean >= WORK_FLOOR, f"the work {name} the stall holds {mean:.1f} % of a core"

    # Summed, the per-sample errors of the stamps cancel: the periodic samples hold what the
    # reader saw up to the last of them, to the bracket at that one moment and the slack.
    low, _, high = reader.between(run.true.started_ms, periodic[-1].to_ms)
    counted = sum(i.amount for i in periodic) / 100
    assert low - READER_SLACK_S <= counted <= high + READER_SLACK_S, \
        f"the periodic samples hold {counted:.3f} CPU-s, the reader saw {low:.3f} to {high:.3f} by then"

    # And the run adds up, its closing sample carrying no more than its interval's share.
    assert sum(i.amount for i in spans) / 100 == pytest.approx(run.true.cpu_seconds, rel=0.05)
    share = closing_share(run.cpu, run.true.started_ms)
    print(f"closing sample carries {share.cpu_share:.3f} of {share.run_cpu_s:.2f} CPU-s over "
          f"{share.time_share:.3f} of {share.run_s:.2f} s")
    assert share.cpu_share <= _closing_bound(share.time_share), _closing_failure(PHASED_TASKS[0][0], share)
