"""Warm stop on the first SIGTERM/SIGINT, forced stop on the second (as rq's workers do)."""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)


class StopSignals:
    """``requested`` is set by the first signal; the second raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def install(self) -> "StopSignals":
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        logger.info("%s: finishing the current step, then stopping (again to force)",
                    signal.Signals(signum).name)
        self.requested.set()


def announce_ready() -> None:
    """Tell the runtime that started this service that it is listening: one stdout line for
    the local runtime, and the file ``READY_FILE`` names (if set) for a Kubernetes readiness
    probe."""
    print("READY", flush=True)
    ready_file = os.environ.get("READY_FILE")
    if ready_file:
        with open(ready_file, "w", encoding="utf-8") as marker:
            marker.write("READY\n")
