"""Resource usage of a task's whole process tree, in the resources and units of
docs/protocol.md, accounted so that a run's samples add up to what the kernel accounted.

Each sample is a rate (or, for memory, a level) over the interval that ends at the sample:
the first interval starts when the task's process started, each later one at the previous
sample, and the closing one (:meth:`ProcessTreeSampler.close`, from the totals the task reads
itself at its end and sends in HALT) ends at the task's end. So:

- CPU and storage I/O add up: every process of the tree is counted by its own increase since
  the previous reading; a child that its parent reaped shows up again in the parent's
  reaped-children counters, and what was already counted of it is taken off there (as
  Netdata's apps.plugin does), so a child counts once, live or reaped. A child reaped by
  someone outside the tree (an orphan) loses only what it did since its last reading.
- CPU is the scheduler's nanosecond clock of each process, not 10 ms clock ticks; only the
  reaped-children figures come in ticks, and the closing sample settles them exactly.
- memory is the resident size of the tree; a process whose peak (VmHWM) rose during the
  interval counts with that peak, so a peak between two readings is not missed.
- cpu_wait is the time the tree's threads waited on a run queue (schedstat ``run_delay``).
- node_cpu_pressure is the node's, not the tree's: the share of the interval in which some
  runnable task on the node waited for a CPU (PSI ``cpu some``). It tells the model how busy
  the machine was; a kernel without PSI gives no such sample.
- A counter that cannot be read (another user's ``/proc/<pid>/io``) yields no sample of its
  resources, never a zero; the first such reading logs one warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from monitor.proc import ProcessCounters, children_of, cpu_pressure, read_process
from pipeline.errors import PipelineError
from pipeline.proctime import TICK_NS, boottime_ns, start_ns
from pipeline.protocol import TaskTotals

logger = logging.getLogger(__name__)

_KIB = 1024


class TaskGoneError(PipelineError):
    """The task's root process has ended (it may still be a zombie)."""


@dataclass(frozen=True)
class Usage:
    """One sample's values, resource by resource (a resource that could not be read is
    absent), over the interval that ends at ``timestamp_ms``."""

    values: dict[str, float]
    timestamp_ms: int
    seconds: float  # the interval's length


@dataclass
class _Counted:
    """What the samples so far have accounted for, cumulatively."""

    cpu_ns: int = 0
    read_bytes: int = 0
    write_bytes: int = 0


@dataclass
class _Seen:
    """The previous reading of every process of the tree, by identity."""

    processes: dict[tuple[int, int], ProcessCounters] = field(default_factory=dict)
    root_wait_ns: int = 0  # the root's live threads' waits at the previous reading
    peak_rss_kib: int = 0  # the largest peak any process of the tree showed
    memory_kib: int = 0  # the tree's level at the previous reading


class ProcessTreeSampler:
    """Samples one task: its root pid and every descendant."""

    def __init__(self, pid: int, started_ns: int | None = None,
                 children: Callable[[int], list[int]] = children_of) -> None:
        self.pid = pid
        self._children = children  # pid -> its live descendants
        root = read_process(pid)
        if root is not None and started_ns is not None and start_ns(root.start_ticks) != started_ns:
            root = None  # the pid was reused: the task itself is gone
        self.alive = root is not None and not root.zombie
        if started_ns is None:
            if root is None:
                raise TaskGoneError(f"pid {pid} is gone and its start time is unknown")
            started_ns = start_ns(root.start_ticks)
        self._root_start = root.start_ticks if root is not None else None
        self.started_ns = started_ns
        self._last_ns = started_ns
        self._last_ms = int(time.time() * 1000) - (boottime_ns() - started_ns) // 1_000_000
        self._counted = _Counted()
        self._seen = _Seen()
        self._io_readable = True
        self._waits_readable = True
        # The node's pressure counter at the previous reading (the first: now, as the
        # counter's value at the task's start is not known).
        self._pressure = (boottime_ns(), cpu_pressure())
        self.samples = 0

    def sample(self) -> Usage:
        """Usage since the previous sample (the first: since the task started).

        Raises :class:`TaskGoneError` once the root has ended: what remains is the closing
        sample, from the task's own totals."""
        now_ns, now_ms = boottime_ns(), int(time.time() * 1000)
        processes = self._read_tree()
        if processes is None:
            self.alive = False
            raise TaskGoneError(f"pid {self.pid} has ended")
        cpu, read, write, io_ok = self._increase(processes)
        wait = self._wait_increase(processes)
        memory = self._memory_kib(processes)
        self._remember(processes, memory)
        self._counted.cpu_ns += cpu
        if io_ok:
            self._counted.read_bytes += read
            self._counted.write_bytes += write
        return self._usage(now_ns, now_ms, cpu, wait, read if io_ok else None,
                           write if io_ok else None, memory)

    def close(self, totals: TaskTotals) -> Usage | None:
        """The closing sample: from the previous sample (or the task's start) to the task's
        end, whatever of ``totals`` the samples so far have not accounted for. None when a
        sample was already taken after the task's end."""
        self.alive = False
        if totals.ended_ns <= self._last_ns or totals.ended_ms <= self._last_ms:
            return None
        cpu = max(totals.cpu_ns - self._counted.cpu_ns, 0)
        wait = None
        if self._waits_readable and totals.cpu_wait_ns is not None:
            wait = max(totals.cpu_wait_ns - self._seen.root_wait_ns, 0)
        read = write = None
        if self._io_readable and totals.read_bytes is not None and totals.write_bytes is not None:
            read = max(totals.read_bytes - self._counted.read_bytes, 0)
            write = max(totals.write_bytes - self._counted.write_bytes, 0)
        # A new peak since the last reading happened in this interval; otherwise the level
        # the tree was last seen at is the best account of it.
        memory = totals.peak_rss_kib if totals.peak_rss_kib > self._seen.peak_rss_kib else self._seen.memory_kib
        self._counted.cpu_ns += cpu
        return self._usage(totals.ended_ns, totals.ended_ms, cpu, wait, read, write, memory)

    def _usage(self, now_ns: int, now_ms: int, cpu_ns: int, wait_ns: int | None, read: int | None,
               write: int | None, memory_kib: int) -> Usage:
        seconds = max(now_ns - self._last_ns, 1_000_000) / 1e9
        self._last_ns, self._last_ms = now_ns, max(now_ms, self._last_ms + 1)
        values = {"cpu": 100.0 * cpu_ns / 1e9 / seconds, "memory": memory_kib / _KIB}
        pressure = self._node_pressure()
        if pressure is not None:
            values["node_cpu_pressure"] = pressure
        if wait_ns is not None:
            values["cpu_wait"] = 100.0 * wait_ns / 1e9 / seconds
        if read is not None and write is not None:
            values["disk_read"] = read / _KIB / seconds
            values["disk_write"] = write / _KIB / seconds
        self.samples += 1
        return Usage(values, self._last_ms, seconds)

    def _node_pressure(self) -> float | None:
        """Percent of the time since the previous reading in which some task on the node
        waited for a CPU; over too short a time to tell (a closing sample right after a
        tick), the kernel's 10-second average. None without PSI."""
        now_ns, now = boottime_ns(), cpu_pressure()
        then_ns, then = self._pressure
        self._pressure = (now_ns, now)
        if now is None:
            return None
        if then is None or now_ns - then_ns < 50_000_000:
            return now[1]
        return min(max(100.0 * (now[0] - then[0]) * 1000 / (now_ns - then_ns), 0.0), 100.0)

    def _read_tree(self) -> list[ProcessCounters] | None:
        root = read_process(self.pid)
        if root is None or root.zombie or root.start_ticks != self._root_start:
            return None
        found = [root]
        for pid in self._children(self.pid):
            if (counters := read_process(pid)) is not None:
                found.append(counters)
        return found

    def _increase(self, processes: list[ProcessCounters]) -> tuple[int, int, int, bool]:
        """CPU ns and bytes read/written since the previous reading, each child once."""
        previous = self._seen.processes
        gone_by_parent = _gone_by_live_ancestor(previous, processes)
        io_ok = all(p.read_bytes is not None and p.write_bytes is not None for p in processes)
        if not io_ok and self._io_readable:
            self._io_readable = False
            logger.warning("pid=%d storage I/O of its process tree is not readable here: "
                           "no disk_read/disk_write samples for this task", self.pid)
        io_ok = io_ok and self._io_readable
        cpu = read = write = 0
        for p in processes:
            old = previous.get(p.key)
            gone = gone_by_parent.get(p.pid, [])
            own = max(p.cpu_ns - old.cpu_ns, 0) if old else p.cpu_ns
            reaped = max(p.reaped_cpu_ns - old.reaped_cpu_ns, 0) if old else p.reaped_cpu_ns
            if gone and old:
                # /proc/<pid>/stat shows the reaped user and system times in whole ticks, each
                # truncated on its own: allow two ticks per child for rounding.
                already = sum(c.cpu_ns + c.reaped_cpu_ns for c in gone)
                if reaped + 2 * TICK_NS * len(gone) >= already:
                    reaped = max(reaped - already, 0)
            cpu += own + reaped
            if io_ok:
                r = p.read_bytes - old.read_bytes if old else p.read_bytes
                w = p.write_bytes - old.write_bytes if old else p.write_bytes
                if gone and old:
                    r, w = _without(r, sum(c.read_bytes for c in gone)), _without(w, sum(c.write_bytes for c in gone))
                read += max(r, 0)
                write += max(w, 0)
        return cpu, read, write, io_ok

    def _wait_increase(self, processes: list[ProcessCounters]) -> int | None:
        # No kernel counter folds a reaped child's waits into its parent's, so each live
        # thread counts by its own increase; a thread that ended keeps what it had.
        if self._waits_readable and any(p.thread_waits_ns is None for p in processes):
            self._waits_readable = False
            logger.warning("pid=%d scheduler statistics (schedstat) are not readable here: "
                           "no cpu_wait samples for this task", self.pid)
        if not self._waits_readable:
            return None
        total = 0
        for p in processes:
            old = self._seen.processes.get(p.key)
            old_waits = (old.thread_waits_ns or {}) if old else {}
            total += sum(max(w - old_waits.get(tid, 0), 0) for tid, w in p.thread_waits_ns.items())
        return total

    def _memory_kib(self, processes: list[ProcessCounters]) -> int:
        total = 0
        for p in processes:
            old = self._seen.processes.get(p.key)
            total += p.peak_rss_kib if old is None or p.peak_rss_kib > old.peak_rss_kib else p.rss_kib
        return total

    def _remember(self, processes: list[ProcessCounters], memory_kib: int) -> None:
        self._seen.processes = {p.key: p for p in processes}
        self._seen.root_wait_ns = sum((processes[0].thread_waits_ns or {}).values())
        self._seen.peak_rss_kib = max([self._seen.peak_rss_kib, *(p.peak_rss_kib for p in processes)])
        self._seen.memory_kib = memory_kib


def _gone_by_live_ancestor(previous: dict[tuple[int, int], ProcessCounters],
                           processes: list[ProcessCounters]) -> dict[int, list[ProcessCounters]]:
    """Processes of the previous reading that have gone since, by the pid of their nearest
    ancestor that is still there: the one whose reaped-children counters now hold their
    whole lives (a child's through its gone parent's)."""
    live = {p.pid for p in processes}
    by_pid = {old.pid: old for key, old in previous.items()}
    now = {p.key for p in processes}
    found: dict[int, list[ProcessCounters]] = {}
    for key, old in previous.items():
        if key in now:
            continue
        ancestor, steps = old.ppid, 0
        while ancestor not in live and ancestor in by_pid and steps < len(by_pid):
            ancestor, steps = by_pid[ancestor].ppid, steps + 1
        if ancestor in live:
            found.setdefault(ancestor, []).append(old)
    return found


def _without(increase: int, already: int) -> int:
    """A parent's I/O increase less what was counted of the children it reaped, when the
    increase shows that it holds them (a parent that ignores SIGCHLD reaps without it)."""
    return increase - already if increase >= already else increase
