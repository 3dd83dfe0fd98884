"""Resource usage of a task's whole process tree, as DESIGN.md's resources and units.

cpu: percent of one core, summed over the tree; memory: resident MiB; disk_read and
disk_write: KiB/s of storage I/O. Rates are per-process differences between two readings, so
a child that exits between readings neither subtracts from nor inflates the next value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

_MIB = 1024 * 1024


@dataclass
class _Reading:
    cpu_seconds: float
    read_bytes: int
    write_bytes: int


class TaskGoneError(Exception):
    """The task's root process no longer exists."""


class ProcessTreeSampler:
    """Samples one task (its root pid and every descendant)."""

    def __init__(self, pid: int) -> None:
        try:
            self.root = psutil.Process(pid)
            self._root_started = self.root.create_time()
        except psutil.NoSuchProcess as exc:
            raise TaskGoneError(pid) from exc
        self.pid = pid
        self._last: dict[int, _Reading] = {}
        self._last_time: float | None = None

    def sample(self) -> dict[str, float]:
        """Usage since the previous call (the first call: since the task started)."""
        now = time.time()
        processes = self._tree()
        readings = {p.pid: r for p in processes if (r := _read(p)) is not None}
        if not readings and not self.alive():
            raise TaskGoneError(self.pid)
        if self._last_time is None:
            # First reading: average over the task's life so far, so that even a task shorter
            # than one interval yields a meaningful sample.
            elapsed = max(now - self._root_started, 1e-3)
            previous: dict[int, _Reading] = {}
        else:
            elapsed = max(now - self._last_time, 1e-3)
            previous = self._last
        zero = _Reading(0.0, 0, 0)
        cpu = sum(max(r.cpu_seconds - previous.get(pid, zero).cpu_seconds, 0.0) for pid, r in readings.items())
        read = sum(max(r.read_bytes - previous.get(pid, zero).read_bytes, 0) for pid, r in readings.items())
        write = sum(max(r.write_bytes - previous.get(pid, zero).write_bytes, 0) for pid, r in readings.items())
        memory = sum(_rss(p) for p in processes)
        self._last, self._last_time = readings, now
        return {
            "cpu": 100.0 * cpu / elapsed,
            "memory": memory / _MIB,
            "disk_read": read / 1024 / elapsed,
            "disk_write": write / 1024 / elapsed,
        }

    def alive(self) -> bool:
        """Whether the root process still runs (a zombie counts as ended)."""
        try:
            return self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def _read(process: psutil.Process) -> _Reading | None:
    try:
        with process.oneshot():
            times = process.cpu_times()
            try:
                io = process.io_counters()
                read, write = io.read_bytes, io.write_bytes
            except (psutil.AccessDenied, AttributeError):
                read = write = 0  # no I/O accounting here (some containers): report none
            # Children the process already reaped count through children_user/system.
            cpu = times.user + times.system + times.children_user + times.children_system
        return _Reading(cpu, read, write)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0
