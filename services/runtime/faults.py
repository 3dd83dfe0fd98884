"""Injected faults: a task misbehaves on purpose so that failure handling and the deviation
detector can be tested on known anomalies.

``raise`` and ``stall`` break the task itself; ``cpu_hog``, ``memory_leak`` and ``io_storm``
let it succeed while it uses what it should not, for ``FAULT_SECONDS`` from ``fault_at``.
Every fault starts ``fault_at`` seconds after the task started, while its work goes on: a
``stall`` blocks the task's main thread then (a timer signal whose handler waits forever, so
the work stops at the next Python instruction: inside one long native call, when that call
returns), as a task wedged on a lock would be, until SIGTERM or the orchestrator's timeout
ends it. Its Kafka client keeps running, so the task is seen to hang, not to vanish.

The regression faults model a release that does more than the last one, from the first
instruction to the last (no ``fault_at``), by ``factor`` (> 1):

* ``extra_work``: the task's operation is done ``factor`` times over: once on the whole image
  (the output), again on the whole image as often as the factor's whole part less one, and
  on a full-width crop of the top rows holding the factor's fraction of the pixels; its output
  is encoded as many times over (into memory), so the CPU time of the work grows ~``factor``
  times;
* ``extra_memory``: a block of ``factor - 1`` times the process's own resident memory is held
  (filled, so resident) from the start, grown while the operation and the save run to
  ``factor - 1`` times the largest own resident size seen (a look every 10 ms, then the
  high-water mark), and let go at the end: the run's peak resident size becomes ~``factor``
  times a healthy run's, never more;
* ``double_write``: the output is written a second time, to another file in its folder that
  is then removed, so the process's ``write_bytes`` counts twice the output's bytes (the
  kernel counts a page when it turns dirty: rewriting the same file's dirty pages would not).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from PIL import Image

from pipeline.invocation import DEFAULT_FAULT_FACTOR, REGRESSION_FAULTS

logger = logging.getLogger(__name__)

FAULT_SECONDS = 12.0
_FOLLOW_SECONDS = 0.01  # extra_memory's look at the resident size while an operation runs
_MIB = 1024 * 1024


class InjectedFault(RuntimeError):
    """Raised by the ``raise`` fault."""


class Fault:
    """Runs one injected fault beside the task's own work."""

    def __init__(self, kind: str | None, at: float, stop: threading.Event,
                 factor: float = DEFAULT_FAULT_FACTOR) -> None:
        if kind in REGRESSION_FAULTS and not factor > 1:
            raise ValueError(f"fault {kind}: the factor must be a number > 1, got {factor!r}")
        self.kind = kind
        self.at = at
        self.stop = stop
        self.factor = factor
        self._thread: threading.Thread | None = None
        self._held: list[bytes] = []  # extra_memory's block, in resident chunks
        self._held_bytes = 0
        self._own_peak = 0

    def before_work(self) -> None:
        """Start the fault: synchronous ones act now, the others in a background thread."""
        if self.kind is None:
            return
        if self.kind in REGRESSION_FAULTS:
            logger.warning("injected regression %s x%g from the task's start", self.kind, self.factor)
            if self.kind == "extra_memory":
                self._grow(_resident_bytes())
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

    def work(self, operation: Callable[[Image.Image, Mapping[str, object]], Image.Image],
             image: Image.Image, params: Mapping[str, object]) -> Image.Image:
        """``operation(image, params)``, the task's output; ``extra_work`` repeats it
        (results dropped), ``extra_memory`` grows its block with it."""
        with self._memory_follows():
            result = operation(image, params)
        if self.kind == "extra_work":
            extra = self.factor - 1
            while extra >= 1:
                operation(image, params)
                extra -= 1
            rows = round(image.height * extra)
            if rows >= 1:
                operation(image.crop((0, 0, image.width, rows)), params)
        return result

    def save(self, result: Image.Image, path: Path, image_format: str) -> None:
        """Save ``result`` to ``path``; ``double_write`` writes it a second time elsewhere."""
        with self._memory_follows():  # encoding may be the peak
            result.save(path, format=image_format)
        if self.kind == "double_write":
            _write_again(path)
        if self.kind == "extra_work":  # encoding is the task's work too: done factor times over
            extra = self.factor - 1
            while extra > 0:
                rows = round(result.height * min(extra, 1.0))
                if rows >= 1:
                    result.crop((0, 0, result.width, rows)).save(io.BytesIO(), format=image_format)
                extra -= 1

    @contextlib.contextmanager
    def _memory_follows(self) -> Iterator[None]:
        """For ``extra_memory``, around a step of the work: the block follows the process's
        own resident size, looked at every ``_FOLLOW_SECONDS`` from a thread (the operations
        run native code, the GIL let go), then its high-water mark, for a peak between looks."""
        if self.kind != "extra_memory":
            yield
            return
        done = threading.Event()

        def follow() -> None:
            while not done.wait(_FOLLOW_SECONDS):
                self._grow(_resident_bytes() - self._held_bytes)

        follower = threading.Thread(target=follow, daemon=True, name="fault-extra_memory")
        follower.start()
        try:
            yield
        finally:
            done.set()
            follower.join()
            # A lower bound: the block was held at that peak, but perhaps a smaller one.
            self._grow(_peak_resident_bytes() - self._held_bytes)

    def _grow(self, own: int) -> None:
        """Hold ``factor - 1`` times the largest own resident size (the block left out) seen."""
        self._own_peak = max(self._own_peak, own)
        missing = int((self.factor - 1) * self._own_peak) - self._held_bytes
        if missing > 0:
            self._held.append(b"\x01" * missing)  # written, so resident (bytearray(n) would not be)
            self._held_bytes += missing

    def after_work(self) -> None:
        """Let a background fault run its full length, so it shows in the measurements. A
        stall due after the work ended is called off: there is no work left to stall.
        ``extra_memory`` lets its block go."""
        self._held.clear()
        self._held_bytes = 0
        if self.kind == "stall" and threading.current_thread() is threading.main_thread():
            if signal.setitimer(signal.ITIMER_REAL, 0)[0] > 0:
                logger.warning("injected stall at %.1fs came after the work ended: not injected", self.at)
        if self._thread is not None:
            self._thread.join()

    def _delayed(self, body) -> None:
        if not self.stop.wait(self.at):
            body(self.stop, time.monotonic() + FAULT_SECONDS)


def _resident_bytes() -> int:
    """This process's resident size now (/proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    """This process's peak resident size so far: VmHWM, its own address space's high-water
    mark. ru_maxrss is not used here: after exec it still holds the peak of the process that
    started it (a big orchestrator would be taken for the task's own use)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _resident_bytes()


def _write_again(path: Path) -> None:
    """Copy ``path`` to another file in its folder, through the page cache, and remove it.
    Removed before writeback, the copy never reaches the disk (the kernel counts it in
    ``cancelled_write_bytes`` too), but ``write_bytes`` has counted it, as a monitor sees it."""
    handle, copy = tempfile.mkstemp(prefix=path.name + ".", suffix=".again", dir=path.parent)
    try:
        with open(path, "rb") as source, os.fdopen(handle, "wb") as target:
            while chunk := source.read(_MIB):
                target.write(chunk)
    finally:
        os.unlink(copy)


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
