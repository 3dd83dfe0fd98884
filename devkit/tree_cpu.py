"""An independent reader of a process tree's CPU time, for checking the sampler's time course.

:class:`TreeCpuReader` reads ``/proc/<pid>/stat`` of a task and of every descendant about ten
times a second in a thread of its own and keeps the tree's cumulative CPU-seconds: each live
process's ``utime + stime`` plus its ``cutime + cstime`` (the children it has reaped, whose
whole lives the kernel adds there), in clock ticks. It shares no code with ``monitor/``: the
sampler reads each process's nanosecond scheduler clock, this reads the tick counters, and the
descendants come from a pass over every ``/proc/<n>/stat`` of its own.

Every reading keeps the wall-clock moments just before and just after it. As the counters
only grow, the tree's CPU time at a moment ``t`` lies between the last reading that ended
before ``t`` and the first that began after it (:meth:`TreeCpuReader.bounds`), whatever the
reader's jitter on a busy machine; :meth:`TreeCpuReader.estimate` interpolates between them.

A reading is only as good as its ticks: ``utime`` and ``stime`` are each whole ticks
(``SC_CLK_TCK``, 10 ms), so a reading lies up to two ticks per process below the scheduler's
clock.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Reading:
    """The tree's cumulative CPU-seconds, read between ``before_ms`` and ``after_ms`` (wall)."""

    before_ms: float
    after_ms: float
    cpu_s: float
    processes: int

    @property
    def at_ms(self) -> float:
        return (self.before_ms + self.after_ms) / 2


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, CPU ticks with reaped children, start ticks) of ``pid``; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is proc(5)'s field 3 (state): ppid is 4, utime..cstime 14-17, starttime 22.
    return int(fields[1]), sum(int(v) for v in fields[11:15]), int(fields[19])


def tree_cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(CPU ticks, processes) of ``pid`` and its live descendants, reaped children included;
    None once ``pid`` itself is gone (a zombie still reads: its counters are final)."""
    stats: dict[int, tuple[int, int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (found := _stat(int(name))) is not None:
            stats[int(name)] = found
    if pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(child)
    total, count, frontier = 0, 0, [pid]
    while frontier:
        current = frontier.pop()
        total += stats[current][1]
        count += 1
        frontier.extend(children.get(current, []))
    return total, count


class TreeCpuReader:
    """Reads a task tree's CPU time every ``period`` seconds while it lives (see the module).

    ``started_ms`` is the task's start on the wall clock: the tree had used no CPU then, which
    is the first reading. Call :meth:`start`, and :meth:`finish` once the task is a zombie
    (reaped by no one yet): that last reading holds the task's final counters."""

    def __init__(self, pid: int, started_ms: float, period: float = 0.1) -> None:
        self.pid = pid
        self.period = period
        self.readings: list[Reading] = [Reading(started_ms, started_ms, 0.0, 1)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tree-cpu-{pid}", daemon=True)

    def start(self) -> TreeCpuReader:
        self._thread.start()
        return self

    def finish(self) -> None:
        """Stop reading and take the last reading (of the zombie task)."""
        self._stop.set()
        self._thread.join()
        self._read()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.period)

    def _read(self) -> None:
        before = time.time() * 1000
        found = tree_cpu_ticks(self.pid)
        after = time.time() * 1000
        if found is not None:
            ticks, processes = found
            # A process moving between two readings (reaped while the pass read it) may count
            # twice for a moment; the counters never really go back, so neither do readings.
            cpu = max(ticks / CLOCK_TICKS, self.readings[-1].cpu_s)
            self.readings.append(Reading(before, after, cpu, processes))

    def bounds(self, at_ms: float) -> tuple[float, float]:
        """The least and the most CPU-seconds the tree can have used by ``at_ms``: the last
        reading that ended by then and the first that began after it (the last reading when
        none did: :meth:`finish` reads the ended task's final counters)."""
        low = max((r.cpu_s for r in self.readings if r.after_ms <= at_ms), default=0.0)
        high = min((r.cpu_s for r in self.readings if r.before_ms >= at_ms), default=self.readings[-1].cpu_s)
        return low, max(high, low)

    def estimate(self, at_ms: float) -> float:
        """The tree's CPU-seconds at ``at_ms``, interpolated between the readings around it."""
        moments = [r.at_ms for r in self.readings]
        index = bisect.bisect_left(moments, at_ms)
        if index == 0:
            return self.readings[0].cpu_s
        if index == len(moments):
            return self.readings[-1].cpu_s
        a, b = self.readings[index - 1], self.readings[index]
        if b.at_ms == a.at_ms:
            return b.cpu_s
        return a.cpu_s + (b.cpu_s - a.cpu_s) * (at_ms - a.at_ms) / (b.at_ms - a.at_ms)

    def between(self, from_ms: float, to_ms: float) -> tuple[float, float, float]:
        """(least, interpolated, most) CPU-seconds the tree used from ``from_ms`` to ``to_ms``."""
        low_from, high_from = self.bounds(from_ms)
        low_to, high_to = self.bounds(to_ms)
        return (max(low_to - high_from, 0.0), self.estimate(to_ms) - self.estimate(from_ms),
                high_to - low_from)

    def gaps_ms(self) -> list[float]:
        """Time between consecutive readings (the reader's jitter)."""
        return [b.at_ms - a.at_ms for a, b in zip(self.readings[1:], self.readings[2:])]
