"""The process-tree sampler against the kernel's own accounting of real (small) processes: a
reaped child counts once, a counter that cannot be read gives no sample, and the closing
sample accounts for what the live samples have not. No servers: the processes are plain
Python children of the test, reaped with wait4 for the kernel's figures."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.waiting import PATIENCE, wait_for
from monitor import proc
from pipeline.proctime import boottime_ns, start_ns
from monitor.sampler import ProcessTreeSampler, TaskGoneError, Usage
from pipeline.protocol import TaskTotals

# A file in the folder argv[1] says what the tree has done, another lets it go on: the test
# lets it go on only once a sample has seen that state, however slowly the machine runs.
_WAIT = """
import os, sys, time
def say(name):
    open(os.path.join(sys.argv[1], name), "w").close()
def wait(name):
    while not os.path.exists(os.path.join(sys.argv[1], name)):
        time.sleep(0.01)
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
"""
# Spins 1.2 s of CPU, says "spun" and exits on "child-go": seen live with all of its CPU.
CHILD = _WAIT + "spin(1.2)\nsay('spun')\nwait('child-go')\n"
# The parent spins 0.2 s, runs the child and reaps it, says "reaped" and exits on "parent-go":
# the child's CPU is then seen again in the parent's reaped-children counters.
PARENT_WITH_A_REAPED_CHILD = _WAIT + f"""
import subprocess
spin(0.2)
subprocess.run([sys.executable, "-c", {CHILD!r}, sys.argv[1]])
say("reaped")
wait("parent-go")
"""
GATES = {"spun": "child-go", "reaped": "parent-go"}  # what the tree says -> what lets it go on

def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args])


def _sample_until_gone(sampler: ProcessTreeSampler, gates: Path, every: float = 0.25) -> list[Usage]:
    """A sample every ``every`` seconds until the root has ended. Each state the tree says in
    ``gates`` is answered once a sample taken after it has seen it."""
    samples = []
    deadline = time.monotonic() + PATIENCE
    while True:
        assert time.monotonic() < deadline, f"the tree did not end within {PATIENCE:g}s"
        time.sleep(every)
        said = [go for state, go in GATES.items() if (gates / state).exists()]
        try:
            samples.append(sampler.sample())
        except TaskGoneError:
            return samples
        for go in said:
            (gates / go).touch()


def _reap(process: subprocess.Popen) -> tuple[int, float, int]:
    """(CLOCK_BOOTTIME ns at its end, CPU seconds of it and its reaped children, peak KiB)."""
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    ended_ns = boottime_ns()
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0
    return ended_ns, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def _cpu_seconds(samples: list[Usage]) -> float:
    return sum(s.values["cpu"] / 100 * s.seconds for s in samples)


def test_a_reaped_child_counts_once_live_or_reaped(tmp_path) -> None:
    process = _start(PARENT_WITH_A_REAPED_CHILD, str(tmp_path))
    sampler = ProcessTreeSampler(process.pid)
    samples = _sample_until_gone(sampler, tmp_path)
    ended_ns, true_cpu, _ = _reap(process)

    live = _cpu_seconds(samples)
    # The child's 1.2 s was seen live and then again in the parent's reaped-children time;
    # counting it twice would put the live samples far above the kernel's total.
    assert live <= true_cpu * 1.05 + 0.02
    assert live >= 1.2  # and the child was not dropped either
    assert max(s.values["cpu"] for s in samples) <= 100 * 1.1  # one core at most, never 250 %


def test_the_closing_sample_makes_the_run_add_up_to_the_totals(tmp_path) -> None:
    process = _start(PARENT_WITH_A_REAPED_CHILD, str(tmp_path))
    sampler = ProcessTreeSampler(process.pid)
    samples = _sample_until_gone(sampler, tmp_path, every=0.4)
    ended_ns, true_cpu, peak_kib = _reap(process)
    totals = TaskTotals(cpu_ns=round(true_cpu * 1e9), ended_ns=ended_ns, ended_ms=int(time.time() * 1000),
                        peak_rss_kib=peak_kib)

    closing = sampler.close(totals)
    if closing is not None:
        samples.append(closing)
    assert _cpu_seconds(samples) == pytest.approx(true_cpu, rel=0.02)
    assert max(s.values["memory"] for s in samples) * 1024 >= 0.9 * peak_kib


def test_a_task_that_ended_before_it_was_seen_is_one_sample_over_its_whole_life() -> None:
    process = _start("pass")
    started_ns = start_ns(proc.read_process(process.pid).start_ticks)
    ended_ns, true_cpu, peak_kib = _reap(process)
    sampler = ProcessTreeSampler(process.pid, started_ns)  # the pid is gone by now
    totals = TaskTotals(cpu_ns=round(true_cpu * 1e9), ended_ns=ended_ns, ended_ms=int(time.time() * 1000),
                        peak_rss_kib=peak_kib, read_bytes=0, write_bytes=8192, cpu_wait_ns=0)

    with pytest.raises(TaskGoneError):
        sampler.sample()
    closing = sampler.close(totals)
    assert closing.seconds == pytest.approx((ended_ns - started_ns) / 1e9)
    assert _cpu_seconds([closing]) == pytest.approx(true_cpu)
    assert closing.values["disk_write"] * closing.seconds == pytest.approx(8.0)
    assert closing.values["memory"] == pytest.approx(peak_kib / 1024)


def test_a_counter_that_cannot_be_read_gives_no_sample_and_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(proc, "_storage_io", lambda base: (None, None))  # as for another user's process
    process = _start("import time; time.sleep(600)")
    try:
        sampler = ProcessTreeSampler(process.pid)
        with caplog.at_level(logging.WARNING, logger="monitor.sampler"):
            first, second = sampler.sample(), sampler.sample()
    finally:
        process.kill()
        process.wait()
    for usage in (first, second):
        assert "disk_read" not in usage.values and "disk_write" not in usage.values
        assert {"cpu", "memory", "cpu_wait"} <= set(usage.values)
    assert len([r for r in caplog.records if "not readable" in r.getMessage()]) == 1
    totals = TaskTotals(cpu_ns=1, ended_ns=boottime_ns(), ended_ms=int(time.time() * 1000) + 5,
                        peak_rss_kib=1, read_bytes=10, write_bytes=10)
    assert "disk_write" not in sampler.close(totals).values  # no total passed off as one interval's


def test_a_reused_pid_is_not_taken_for_the_task() -> None:
    process = _start("import time; time.sleep(600)")
    try:
        real_start = start_ns(proc.read_process(process.pid).start_ticks)
        sampler = ProcessTreeSampler(process.pid, started_ns=real_start - 10**9)
        with pytest.raises(TaskGoneError):
            sampler.sample()
    finally:
        process.kill()
        process.wait()


# Says it spins (a file named after its pid in argv[1]), then spins until "stop" is there.
SPINNER = """
import os, sys
open(os.path.join(sys.argv[1], f"spinning-{os.getpid()}"), "w").close()
stop = os.path.join(sys.argv[1], "stop")
while not os.path.exists(stop):
    pass
"""
# Starts argv[2] spinners (child processes, so that no GIL serialises them) and waits for them.
SPINNERS = """
import subprocess, sys
spinners = [subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1]]) for _ in range(int(sys.argv[2]))]
for spinner in spinners:
    spinner.wait()
"""


def test_cpu_wait_is_the_time_the_trees_threads_spent_waiting_for_a_cpu(tmp_path) -> None:
    # Three always-runnable threads per CPU this test may use, whatever else the machine runs.
    cpus = len(os.sched_getaffinity(0))
    process = _start(SPINNERS, str(tmp_path), str(3 * cpus), SPINNER)
    try:
        sampler = ProcessTreeSampler(process.pid)

        def spinning() -> list[int]:
            pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("spinning-*")]
            return pids if len(pids) == 3 * cpus else []

        spinners = wait_for(spinning, "every spinner spinning")
        start_up = sampler.sample()
        # An interval in which all of them spin throughout, long enough for each to have been
        # put on a CPU many times (the kernel adds a wait to run_delay when the wait ends).
        ran = {pid: proc.read_process(pid).cpu_ns for pid in spinners}
        wait_for(lambda: all(proc.read_process(pid).cpu_ns - ran[pid] >= 100_000_000 for pid in spinners),
                 "every spinner's next 0.1 s of CPU")
        spinning_only = sampler.sample()
    finally:
        (tmp_path / "stop").touch()
        process.wait()
    assert start_up.values["cpu_wait"] >= 0
    # cpu_wait sums the threads' run-queue waits as cpu sums their running (percent of the
    # interval, like cpu). With three runnable threads per CPU, at any moment at least two of
    # them wait for each one that runs: the tree waits more than it runs, on any machine and
    # however busy (other work only makes them wait longer).
    assert spinning_only.values["cpu_wait"] > spinning_only.values["cpu"] > 0


def test_without_scheduler_statistics_there_is_no_cpu_wait_sample_rather_than_a_zero(monkeypatch, caplog) -> None:
    monkeypatch.setattr(proc, "_HAS_SCHEDSTAT", False)  # a kernel built without them
    process = _start("import time; time.sleep(600)")
    try:
        sampler = ProcessTreeSampler(process.pid)
        with caplog.at_level(logging.WARNING, logger="monitor.sampler"):
            usage = sampler.sample()
    finally:
        process.kill()
        process.wait()
    assert "cpu_wait" not in usage.values and "cpu" in usage.values
    assert [r for r in caplog.records if "schedstat" in r.getMessage()]


def test_node_cpu_pressure_is_read_from_psi(tmp_path) -> None:
    from monitor.proc import cpu_pressure

    psi = tmp_path / "cpu"
    psi.write_text("some avg10=12.50 avg60=3.00 avg300=1.00 total=123456789\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cpu_pressure(str(psi)) == (123456789, 12.5)
    assert cpu_pressure(str(tmp_path / "absent")) is None  # a kernel without PSI: no sample


def test_each_sample_carries_the_nodes_cpu_pressure_over_its_interval() -> None:
    from monitor.proc import PRESSURE_FILE

    sampler = ProcessTreeSampler(os.getpid())
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        pass
    usage = sampler.sample()
    if os.path.exists(PRESSURE_FILE):
        assert 0.0 <= usage.values["node_cpu_pressure"] <= 100.0
    else:
        assert "node_cpu_pressure" not in usage.values
