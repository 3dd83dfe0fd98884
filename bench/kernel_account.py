"""Run a command as a child and record what the kernel accounted for it, independently of the
pipeline's sampler: the child's rusage from wait4 (itself and every child it reaped: CPU
seconds, ru_maxrss) and its /proc/<pid>/io read while it is a zombie, before it is reaped.

    python bench/kernel_account.py OUT.json -- COMMAND [ARGS...]

The exit status is the command's. SIGTERM and SIGINT reach the command through its process
group; this wrapper ignores them and waits for the command to end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def _io(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/io") as handle:
            values = dict(line.strip().split(": ") for line in handle if ": " in line)
        return {"read_bytes": int(values["read_bytes"]), "write_bytes": int(values["write_bytes"])}
    except (OSError, KeyError, ValueError):
        return {}


def _start_ms(pid: int) -> float:
    """When the kernel started ``pid`` (``starttime``, clock ticks since boot), in wall ms."""
    with open(f"/proc/{pid}/stat") as handle:
        ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return (time.time() - age) * 1000


def main(argv: list[str]) -> int:
    out, separator, command = argv[0], argv[1], argv[2:]
    if separator != "--" or not command:
        print(__doc__, file=sys.stderr)
        return 2
    if "PIPELINE_PARENT_PID" in os.environ:
        # A task stops itself when its parent is not the one it was told of: now that is us.
        os.environ["PIPELINE_PARENT_PID"] = str(os.getpid())
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # a zombie now: its counters are final
    ended_ms = time.time() * 1000
    started_ms = _start_ms(pid)
    io = _io(pid)
    _, status, usage = os.wait4(pid, 0)
    record = {"pid": pid, "command": command, "started_ms": started_ms, "ended_ms": ended_ms,
              "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_kib": usage.ru_maxrss, **io}
    with open(out, "w") as handle:
        json.dump(record, handle)
    return os.waitstatus_to_exitcode(status) if status >= 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
