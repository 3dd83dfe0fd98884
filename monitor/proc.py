"""One process's counters as the kernel keeps them in ``/proc`` (Linux).

Every reader returns None rather than a guess when the kernel does not tell (the process is
gone, or the counter is not readable here): a missing counter must never read as zero.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pipeline.proctime import TICK_NS

_CPUCLOCK_SCHED = 2  # the kernel's encoding of another process's CPU clock (clock_getcpuclockid)


@dataclass(frozen=True)
class ProcessCounters:
    """Cumulative counters of one process at one moment."""

    pid: int
    ppid: int
    start_ticks: int  # when it started (clock ticks since boot): tells a reused pid apart
    zombie: bool
    cpu_ns: int  # its own CPU time, every thread, live or ended
    reaped_cpu_ns: int  # CPU time of the children it reaped (whole clock ticks)
    thread_waits_ns: dict[int, int] | None  # per live thread: time waiting for a CPU; None: unreadable
    read_bytes: int | None  # storage I/O, its own and its reaped children's; None: unreadable
    write_bytes: int | None
    rss_kib: int
    peak_rss_kib: int  # VmHWM: the largest resident size it has had

    @property
    def key(self) -> tuple[int, int]:
        """Identity across readings: a pid with its start time."""
        return self.pid, self.start_ticks


def read_process(pid: int) -> ProcessCounters | None:
    """The counters of ``pid``, or None when it no longer exists."""
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 of proc(5): state, ppid, ..., utime(14) stime cutime cstime ... starttime(22)
    state, ppid = fields[0], int(fields[1])
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    start_ticks = int(fields[19])
    cpu_ns = _process_clock_ns(pid)
    if cpu_ns is None:  # a zombie has no clock left to read: its tick counters are final
        cpu_ns = (utime + stime) * TICK_NS
    memory = _memory_kib(base)
    if memory is None:
        return None  # status is readable by anyone while the process exists: it has gone
    rss, peak = memory
    read_bytes, write_bytes = _storage_io(base)
    return ProcessCounters(pid, ppid, start_ticks, state == "Z", cpu_ns, (cutime + cstime) * TICK_NS,
                           _thread_waits(base), read_bytes, write_bytes, rss, peak)


def _process_clock_ns(pid: int) -> int | None:
    # The process's CPU clock, as clock_getcpuclockid(3) would give it: the scheduler's own
    # nanosecond count, every thread included, rather than /proc's 10 ms clock ticks.
    try:
        return time.clock_gettime_ns(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return None


def _memory_kib(base: str) -> tuple[int, int] | None:
    # A zombie (or a kernel thread) has no VmRSS line: it holds no memory any more.
    rss = peak = 0
    try:
        with open(f"{base}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1])
    except OSError:
        return None
    return rss, max(peak, rss)


def _storage_io(base: str) -> tuple[int | None, int | None]:
    try:
        with open(f"{base}/io", "rb") as handle:
            values = dict(line.split(b": ", 1) for line in handle if b": " in line)
        return int(values[b"read_bytes"]), int(values[b"write_bytes"])
    except (OSError, KeyError, ValueError):
        return None, None  # not ours to read (another user's process, some containers)


# A kernel built without scheduler statistics has no schedstat files: cpu_wait is then
# unknown (None), never zero.
_HAS_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def _thread_waits(base: str) -> dict[int, int] | None:
    # /proc/<pid>/schedstat is the main thread's alone: read every thread's run_delay.
    if not _HAS_SCHEDSTAT:
        return None
    waits: dict[int, int] = {}
    try:
        threads = os.listdir(f"{base}/task")
    except OSError:
        return waits  # gone meanwhile
    for tid in threads:
        try:
            with open(f"{base}/task/{tid}/schedstat", "rb") as handle:
                waits[int(tid)] = int(handle.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return waits


PRESSURE_FILE = "/proc/pressure/cpu"


def cpu_pressure(path: str = PRESSURE_FILE) -> tuple[int, float] | None:
    """The node's CPU pressure (PSI ``some``): the cumulative microseconds during which at
    least one runnable task waited for a CPU, and the kernel's 10-second average (percent).
    None where the kernel has no PSI."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline()
    except OSError:
        return None
    fields = dict(f.split(b"=", 1) for f in first.split()[1:] if b"=" in f)
    try:
        return int(fields[b"total"]), float(fields[b"avg10"])
    except (KeyError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (a pass over ``/proc``: the kernel keeps no list a
    reader outside the process can use)."""
    return ChildIndex().descendants(pid)


class ChildIndex:
    """Who is whose child, from one pass over ``/proc``, reused for ``max_age`` seconds: a
    sampler of many tasks makes one pass for all the tasks it samples at about one moment.

    A child born after the pass is found at the next one; it loses nothing by that, since a
    process seen for the first time counts with everything it has done, and one that its
    parent reaped in between is in the parent's reaped-children counters."""

    def __init__(self, max_age: float = 0.0) -> None:
        self.max_age = max_age
        self._parents: dict[int, list[int]] = {}
        self._read_at = -float("inf")

    def descendants(self, pid: int) -> list[int]:
        if time.monotonic() - self._read_at > self.max_age:
            self._parents = _parents()
            self._read_at = time.monotonic()
        found, frontier = [], [pid]
        while frontier:
            children = self._parents.get(frontier.pop(), [])
            found.extend(children)
            frontier.extend(children)
        return found


def _parents() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(name))
    return parents
