"""Injected faults: a task misbehaves on purpose so that failure handling and the deviation
detector can be tested on known anomalies.

``raise`` and ``stall`` break the task itself; ``cpu_hog``, ``memory_leak`` and ``io_storm``
let it succeed while it uses what it should not, for ``FAULT_SECONDS`` from ``fault_at``.
Every fault starts ``fault_at`` seconds after the task started, while its work goes on: a
``stall`` blocks the task's main thread then (a timer signal whose handler waits forever, so
the work stops at the next Python instruction: inside one long native call, when that call
returns), as a task wedged on a lock would be, until SIGTERM or the orchestrator's timeout
ends it. Its Kafka client keeps running, so the task is seen to hang, not to vanish.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

logger = logging.getLogger(__name__)

FAULT_SECONDS = 12.0
_MIB = 1024 * 1024


class InjectedFault(RuntimeError):
    """Raised by the ``raise`` fault."""


class Fault:
    """Runs one injected fault beside the task's own work."""

    def __init__(self, kind: str | None, at: float, stop: threading.Event) -> None:
        self.kind = kind
        self.at = at
        self.stop = stop
        self._thread: threading.Thread | None = None

    def before_work(self) -> None:
        """Start the fault: synchronous ones act now, the others in a background thread."""
        if self.kind is None:
            return
        logger.warning("injected fault %s starts %.1fs after task start", self.kind, self.at)
        if self.kind == "raise":
            self.stop.wait(self.at)
            raise InjectedFault("injected fault: raise")
        if self.kind == "stall":
            self._stall_later()
            return
        body = {"cpu_hog": _cpu_hog, "memory_leak": _memory_leak, "io_storm": _io_storm}[self.kind]
        self._thread = threading.Thread(target=self._delayed, args=(body,), daemon=True,
                                        name=f"fault-{self.kind}")
        self._thread.start()

    def _stall_later(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.stop.wait()  # no signals off the main thread: hang from the start
            return

        def freeze(_signum, _frame) -> None:
            self.stop.wait()  # SIGTERM's handler still runs in here and ends the task

        signal.signal(signal.SIGALRM, freeze)
        signal.setitimer(signal.ITIMER_REAL, max(self.at, 0.001))

    def after_work(self) -> None:
        """Let a background fault run its full length, so it shows in the measurements. A
        stall due after the work ended is called off: there is no work left to stall."""
        if self.kind == "stall" and threading.current_thread() is threading.main_thread():
            if signal.setitimer(signal.ITIMER_REAL, 0)[0] > 0:
                logger.warning("injected stall at %.1fs came after the work ended: not injected", self.at)
        if self._thread is not None:
            self._thread.join()

    def _delayed(self, body) -> None:
        if not self.stop.wait(self.at):
            body(self.stop, time.monotonic() + FAULT_SECONDS)


_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def hog_processes() -> int:
    """How many spinners the CPU hog starts: one more than the CPUs this process may run on,
    and at least three, so that the task's tree holds well over one core even while the work
    itself and other processes share the machine (on two cores with one other busy process:
    1.5 cores or more). A single-threaded task never uses more than one core, so the hog
    lies outside anything a normal run of it produces, however busy the machine is."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(3, cpus + 1)


def _cpu_hog(stop: threading.Event, until: float) -> None:
    # Spinning child processes, not threads: each takes a whole core whatever the GIL does,
    # and they belong to the task's process tree, which is what the monitor measures.
    code = _SPIN.format(seconds=until - time.monotonic())
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(hog_processes())]
    try:
        while any(s.poll() is None for s in spinners) and not stop.wait(0.2):
            pass
    finally:
        for spinner in spinners:
            if spinner.poll() is None:
                spinner.kill()
            spinner.wait()


def _memory_leak(stop: threading.Event, until: float) -> None:
    leaked = []
    while time.monotonic() < until and not stop.is_set():
        leaked.append(bytearray(os.urandom(1) * (40 * _MIB)))  # touched pages, so resident
        stop.wait(0.5)


def _io_storm(stop: threading.Event, until: float) -> None:
    block = os.urandom(4 * _MIB)
    with tempfile.TemporaryFile() as handle:
        while time.monotonic() < until and not stop.is_set():
            handle.seek(0)
            for _ in range(8):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
            stop.wait(0.2)
