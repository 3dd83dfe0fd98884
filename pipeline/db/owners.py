"""Which orchestrator process runs an order, and whether it is still alive.

Every order records its owner, ``host:pid:start-ticks`` (the start time tells a reused pid
apart), and the owner refreshes ``orders.heartbeat_at`` while it runs. An order that is still
PENDING or RUNNING although its owner is gone was left by an orchestrator that died (SIGKILL,
out of memory, a lost node): the next orchestrator to start marks it FAILED, so no order
stays RUNNING for ever.

On the owner's own host the answer is exact (is that process there?). From another host
(an orchestrator Job in a cluster) only the heartbeat can tell, so an order counts as
abandoned once its heartbeat is older than the owner's own patience with a lost database
plus a few missed beats: a live owner riding out an outage is never mistaken for a dead one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

HEARTBEAT_SECONDS = 15.0
MISSED_BEATS = 4


@dataclass(frozen=True)
class Owner:
    """One orchestrator process."""

    host: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22; 0 where unknown

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), _start_ticks(os.getpid()))

    @classmethod
    def parse(cls, text: str | None) -> "Owner | None":
        """The owner recorded as ``host:pid:ticks``; None for a missing or foreign value."""
        parts = (text or "").rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]))

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start_ticks}"

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def alive(self, heartbeat: datetime | None, now: datetime, patience: float) -> bool:
        """Whether this owner may still be running its orders."""
        if self.host == socket.gethostname():
            ticks = _start_ticks(self.pid)
            return ticks is not None and (self.start_ticks == 0 or ticks == self.start_ticks)
        return heartbeat_fresh(heartbeat, now, patience)


def heartbeat_fresh(heartbeat: datetime | None, now: datetime, patience: float) -> bool:
    """A heartbeat recent enough that its owner may be alive (riding out a database outage of
    ``patience`` seconds at most, having missed a few beats)."""
    if heartbeat is None:
        return False
    if heartbeat.tzinfo is None:  # SQLite hands back naive datetimes (stored as UTC)
        heartbeat = heartbeat.replace(tzinfo=now.tzinfo)
    return now - heartbeat < timedelta(seconds=patience + MISSED_BEATS * HEARTBEAT_SECONDS)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when there is no such process;
    0 where /proc cannot tell (the pid alone is trusted then)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    state = fields[0]
    if state in (b"Z", b"X"):  # a zombie has finished its work
        return None
    return int(fields[19])
