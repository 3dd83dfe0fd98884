"""How the pipeline's processes end: a warm stop on the first signal (:class:`StopSignals`),
children that do not outlive the orchestrator that started them, an exit without teardown.

The local runtime starts tasks and monitors in sessions of their own (so that a Ctrl-C in the
terminal reaches only the orchestrator, which then stops them in order). If the orchestrator
is killed outright (SIGKILL, OOM), nothing would stop them; so each child asks the kernel for
SIGTERM when its parent goes, which its signal handling turns into a clean stop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

PARENT_PID_VARIABLE = "PIPELINE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


class StopSignals:
    """Warm stop on the first SIGTERM/SIGINT, forced stop on the second (as rq's workers do):
    the first sets ``requested`` and is told to ``announce`` (with the signal's name); the second
    raises KeyboardInterrupt, which the entry point (pipeline/entry.py) turns into one line."""

    def __init__(self, requested: threading.Event | None = None,
                 announce: Callable[[str], None] | None = None) -> None:
        self.requested = requested if requested is not None else threading.Event()
        self._announce = announce or (lambda name: logger.info(
            "%s: finishing the current step, then stopping (again to force)", name))

    def install(self) -> "StopSignals":
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        self._announce(signal.Signals(signum).name)
        self.requested.set()


def stop_with_parent() -> None:
    """Arrange SIGTERM on the parent's death, when started by the local runtime on Linux."""
    parent = os.environ.get(PARENT_PID_VARIABLE)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        logger.warning("cannot ask for SIGTERM on parent death (errno %d)", ctypes.get_errno())
        return
    if os.getppid() != int(parent):  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def exit_now(status: int) -> None:
    """End the process at once, without the interpreter's teardown, once its work is flushed
    (Kafka clients closed, database committed). Tearing down Pillow, numpy, pandas and
    librdkafka costs a few hundred milliseconds that would be a task's unaccounted CPU, or the
    wait at every order's end for its monitors to exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
