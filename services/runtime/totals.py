"""A task's own account of what it used, read from the kernel as the last thing it does.

The monitor-producer samples a task from outside once a second; whatever happened after its
last sample (all of a task shorter than a second) only the task itself can still read before
it exits. These totals travel in HALT's headers (:class:`pipeline.protocol.TaskTotals`).
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

from pipeline.proctime import boottime_ns
from pipeline.protocol import TaskTotals

_PROC_SELF = Path("/proc/self")


def own_totals(output: Path | None = None, operation_ns: int | None = None) -> TaskTotals:
    """CPU, storage I/O, peak resident size and CPU wait of this process and the children
    it reaped, now; the size of ``output``, the file it wrote (when it wrote one); and
    ``operation_ns``, its image operation's CPU time (:func:`operation_clock_ns`)."""
    ended_ns = boottime_ns()
    ended_ms = int(time.time() * 1000)
    # The process clock counts every thread (live or ended) in ns; getrusage's children
    # figures are the reaped children's (their own reaped children included).
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ns = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID) + \
        round((children.ru_utime + children.ru_stime) * 1e9)
    own = resource.getrusage(resource.RUSAGE_SELF)
    read_bytes, write_bytes = _storage_io()
    return TaskTotals(cpu_ns=cpu_ns, ended_ns=ended_ns, ended_ms=ended_ms,
                      peak_rss_kib=max(own.ru_maxrss, children.ru_maxrss),
                      read_bytes=read_bytes, write_bytes=write_bytes, cpu_wait_ns=_cpu_wait_ns(),
                      output_bytes=_size(output), operation_ns=operation_ns)


KAFKA_THREAD_PREFIX = "rdk:"  # librdkafka names its threads rdk:main, rdk:broker<N>, ...


def operation_clock_ns() -> int | None:
    """CPU time so far of this process's threads but the Kafka client's, in ns; the difference
    of two readings around the image operation is its CPU time.

    Not the process clock: the Kafka client's threads send ORDER and fetch metadata while the
    operation runs, a few ms that would be 10-30 % of a light operation's time and vary with
    the broker. The calling thread (where the operation runs) is read from its own clock,
    exact to the ns; any other thread from its ``schedstat``, whose time on a CPU the kernel
    brings up to date at its scheduler's events only (a running thread's lags by up to a
    tick), which is exact for a thread that is waiting, as a helper thread between calls is.
    A thread that ends between the readings (none in the catalog's operations) would take its
    time with it. None where /proc is unreadable."""
    own = threading.get_native_id()
    total = time.clock_gettime_ns(time.CLOCK_THREAD_CPUTIME_ID)
    try:
        threads = [t for t in (_PROC_SELF / "task").iterdir() if t.name != str(own)]
    except OSError:
        return None
    for thread in threads:
        try:
            if (thread / "comm").read_text().startswith(KAFKA_THREAD_PREFIX):
                continue
            total += int((thread / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


def _size(path: Path | None) -> int | None:
    try:
        return path.stat().st_size if path is not None else None
    except OSError:
        return None


def _storage_io() -> tuple[int | None, int | None]:
    # /proc/<pid>/io counts the process's threads and its reaped children (the kernel adds a
    # child's counters to its parent's when it is reaped).
    try:
        lines = (_PROC_SELF / "io").read_text().splitlines()
    except OSError:
        return None, None
    values = dict(line.split(": ", 1) for line in lines if ": " in line)
    try:
        return int(values["read_bytes"]), int(values["write_bytes"])
    except (KeyError, ValueError):
        return None, None


def _cpu_wait_ns() -> int | None:
    # /proc/self/schedstat is the main thread's only: add up every live thread's run_delay.
    total, found = 0, False
    try:
        threads = list((_PROC_SELF / "task").iterdir())
    except OSError:
        return None
    for thread in threads:
        try:
            total += int((thread / "schedstat").read_text().split()[1])
            found = True
        except (OSError, IndexError, ValueError):
            continue
    return total if found else None
