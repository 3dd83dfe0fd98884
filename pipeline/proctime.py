"""When a process started, as the kernel recorded it, on the clocks the pipeline uses.

The kernel keeps a process's start in clock ticks since boot (``/proc/<pid>/stat`` field 22,
on CLOCK_BOOTTIME). The task runtime announces its own start with it, the sampler begins a
task's first interval there, and the local runtime records a task run as started then: all
three name the same instant, whatever a loaded machine makes of fork and exec.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TICK_NS = 1_000_000_000 // CLOCK_TICKS


def boottime_ns() -> int:
    """Now on CLOCK_BOOTTIME (monotonic; the clock of the kernel's process start times)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def start_ns(start_ticks: int) -> int:
    """A ``starttime`` in clock ticks, on :func:`boottime_ns`'s clock."""
    return start_ticks * TICK_NS


def read_start_ticks(pid: int | None = None) -> int | None:
    """``starttime`` of ``pid`` (default: this process), or None when it is gone."""
    try:
        with open(f"/proc/{'self' if pid is None else pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def started_ns(pid: int | None = None) -> int | None:
    """When ``pid`` (default: this process) started, on CLOCK_BOOTTIME in ns."""
    ticks = read_start_ticks(pid)
    return None if ticks is None else start_ns(ticks)


def wall_time(boot_ns: int) -> datetime:
    """A CLOCK_BOOTTIME instant on the wall clock (UTC)."""
    seconds = time.time() - (boottime_ns() - boot_ns) / 1e9
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
