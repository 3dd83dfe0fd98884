"""The local runtime's side of the fork server (services/runtime/fork_server.py).

:class:`ForkServerClient` starts the server on the first task, from one long-lived thread of
its own (PR_SET_PDEATHSIG, which stops the server with the orchestrator, fires when the
*thread* that started it ends, so it must not be an order's thread), and asks it for one
task process per connection. :class:`ForkedTaskHandle` follows that task through its
connection. When the server cannot start or is gone, :meth:`ForkServerClient.start` raises
:class:`ForkServerUnavailable` (the runtime then spawns the task instead) and the next start
after ``RETRY_SECONDS`` tries a new server.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from orchestrator.runtime.base import ProcessGroupHandle, RuntimeFailure
from pipeline.proctime import read_start_ticks, start_ns, wall_time

logger = logging.getLogger(__name__)

SERVER_MODULE = "services.runtime.fork_server"
# The server's own start is Python, the tasks' imports and every task module: well under a
# second on an idle machine, several on a loaded one.
START_TIMEOUT = 20.0
REPLY_TIMEOUT = 10.0
RETRY_SECONDS = 10.0
STOP_TIMEOUT = 10.0
# Bytes of command line the server is started with to hold each task's ``python -m MODULE
# ARGS`` (the room for ps and psutil to show it; a longer one is cut).
COMMAND_LINE_ROOM = 8192
# The exit status of a task whose server went away before it could report one.
UNKNOWN_STATUS = 255


class ForkServerUnavailable(RuntimeFailure):
    """The fork server could not start a task (start a process of its own instead)."""


class _Launcher:
    """Runs calls in one daemon thread that lives as long as the client (see the module doc)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fork-server-launcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            function, done, result = call
            try:
                result.append((True, function()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result.append((False, exc))
            done.set()

    def call(self, function):
        done, result = threading.Event(), []
        self._calls.put((function, done, result))
        done.wait()
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(5.0)


class ForkServerClient:
    """One fork server for the runtime, started lazily, restarted after a failure."""

    def __init__(self, env: dict[str, str], cwd: Path, log_dir: Path,
                 socket_path: Path | None = None) -> None:
        self.env = env
        self.cwd = cwd
        self.log_path = log_dir / "fork-server.log"
        self._socket_path = socket_path  # None: a private folder of its own for each server
        self._lock = threading.Lock()
        self._launcher: _Launcher | None = None
        self._process: subprocess.Popen | None = None
        self._path: str | None = None
        self._folder: str | None = None
        self._retry_at = 0.0
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self, name: str, module: str, args: list[str], env: dict[str, str], cwd: Path,
              log_path: Path) -> "ForkedTaskHandle":
        """Fork ``python -m module args`` with ``env`` in ``cwd``, output appended to ``log_path``."""
        path = self._running_server()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        request = {"module": module, "args": list(args), "env": dict(env), "cwd": str(cwd),
                   "log": str(log_path)}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(REPLY_TIMEOUT)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            buffer = b""
            while b"\n" not in buffer:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("the server closed the connection")
                buffer += data
            line, rest = buffer.split(b"\n", 1)
            reply = json.loads(line)
            if not isinstance(reply, dict) or "pid" not in reply:
                refusal = reply.get("error", reply) if isinstance(reply, dict) else reply
                raise ValueError(f"the server refused the request: {refusal}")
            pid = int(reply["pid"])
        except (OSError, ValueError, TypeError) as exc:
            sock.close()
            raise ForkServerUnavailable(f"{type(exc).__name__}: {exc}{self._check_server()}") from exc
        sock.setblocking(False)
        return ForkedTaskHandle(name, pid, sock, rest, log_path)

    def _running_server(self) -> str:
        with self._lock:
            if self._closed:
                raise ForkServerUnavailable("the runtime is closed")
            if self._process is not None:
                if self._process.poll() is None:
                    return self._path
                raise ForkServerUnavailable(self._forget())
            now = time.monotonic()
            if now < self._retry_at:
                raise ForkServerUnavailable(
                    f"it failed recently, a new one is tried in {self._retry_at - now:.0f}s; "
                    f"see {self.log_path}")
            try:
                return self._start_locked()
            except ForkServerUnavailable:
                self._retry_at = time.monotonic() + RETRY_SECONDS
                raise

    def _check_server(self) -> str:
        """After a failed request: why, when the server is gone (it is then forgotten, and the
        first start after RETRY_SECONDS starts another); a server that still runs is kept."""
        with self._lock:
            if self._process is not None and self._process.poll() is not None:
                return "; " + self._forget()
        return ""

    def _forget(self) -> str:
        """Forget a server that ended; the reason, in words."""
        why = (f"the fork server (pid {self._process.pid}) exited with status "
               f"{self._process.returncode}; see {self.log_path}")
        self._process = None
        self._remove_folder()
        self._retry_at = time.monotonic() + RETRY_SECONDS
        return why

    def _start_locked(self) -> str:
        if self._launcher is None:
            self._launcher = _Launcher()
        command = [sys.executable, "-m", SERVER_MODULE]
        if self._socket_path is not None:
            path = str(self._socket_path)
            command.append(path)
        else:
            # Short (a socket's path has at most 107 bytes) and private (0700); the server
            # removes it when it ends, should this process not live to.
            self._folder = tempfile.mkdtemp(prefix="pipeline-fork-")
            path = os.path.join(self._folder, "server.sock")
            command += [path, "--remove-folder"]
        command.append(" " * COMMAND_LINE_ROOM)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        def launch() -> subprocess.Popen:
            with open(self.log_path, "ab") as log:
                return subprocess.Popen(command, env=self.env,
                                        cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)

        try:
            process = self._launcher.call(launch)
        except OSError as exc:
            self._remove_folder()
            raise ForkServerUnavailable(f"cannot start it: {exc}") from exc
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = process.poll()
            if code is not None:
                self._remove_folder()
                raise ForkServerUnavailable(f"it exited with status {code} at start; see {self.log_path}")
            if _accepts(path):
                break
            if time.monotonic() > deadline:
                _stop_process(process)
                self._remove_folder()
                raise ForkServerUnavailable(f"it did not listen within {START_TIMEOUT:g}s; see {self.log_path}")
            time.sleep(0.01)
        self._process, self._path = process, path
        logger.info("fork server (pid %d) listening on %s", process.pid, path)
        return path

    def _remove_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def close(self) -> None:
        """Stop the server (it stops the tasks still running) and its launcher thread."""
        with self._lock:
            self._closed = True
            if self._process is not None:
                _stop_process(self._process)
                self._process = None
            self._remove_folder()
            if self._launcher is not None:
                self._launcher.close()
                self._launcher = None


def _accepts(path: str) -> bool:
    """Whether a server listens on ``path`` (it sees a connection with no request and drops it)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("fork server (pid %d) ignored SIGTERM; killing it", process.pid)
            process.kill()
            process.wait(5.0)


class ForkedTaskHandle(ProcessGroupHandle):
    """A task forked by the fork server: its own pid and session; its exit status arrives on
    the connection it was requested on. Safe to use from several threads."""

    def __init__(self, name: str, pid: int, sock: socket.socket, received: bytes, log_path: Path) -> None:
        self.name = name
        self.pid = pid
        self.log_path = log_path
        self._sock: socket.socket | None = sock
        self._buffer = received
        self._code: int | None = None
        self._lost = False  # the server went away before the exit status came
        self._lock = threading.Lock()
        # Still there: the server reaps it, and reports that, only after it replied the pid.
        self._start_ticks = read_start_ticks(pid)
        self._parse()

    # ---- reading the connection (with the lock held)

    def _parse(self) -> None:
        while b"\n" in self._buffer and self._code is None:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and "exit" in message:
                self._code = int(message["exit"])
                self._close_socket()

    def _pump(self, timeout: float) -> None:
        """Read what the server sent, waiting up to ``timeout`` for something to arrive."""
        if self._code is not None:
            return
        if self._sock is None:
            if self._lost:
                if not self._alive():
                    self._code = UNKNOWN_STATUS
                elif timeout > 0:
                    time.sleep(min(timeout, 0.05))
            elif timeout > 0:
                time.sleep(timeout)  # closed before its end: nothing can tell it
            return
        try:
            # poll, not select: an orchestrator of a few hundred orders has descriptors
            # above select's limit of 1024.
            poller = select.poll()
            poller.register(self._sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(max(timeout, 0.0) * 1000):
                return
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._buffer += data
            self._parse()
        else:
            # The server is gone; the task gets SIGTERM from the kernel with it (its parent).
            self._close_socket()
            self._lost = True
            if not self._alive():
                self._code = UNKNOWN_STATUS

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _alive(self) -> bool:
        """Whether the task's process still exists (the same process: same start time)."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return fields[0] != b"Z" and int(fields[19]) == self._start_ticks

    # ---- Handle

    def exit_code(self) -> int | None:
        with self._lock:
            self._pump(0.0)
            return self._code

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                remaining = deadline - time.monotonic()
                self._pump(min(max(remaining, 0.0), 0.2))
                if self._code is not None:
                    return self._code
            if remaining <= 0:
                return None

    def wait_ready(self, timeout: float) -> None:
        raise RuntimeFailure(f"{self.name} is a task: it has no readiness to wait for")

    def end_reason(self) -> str:
        if self._lost:
            return "ended after its fork server went away (exit status unknown)"
        return super().end_reason()

    def started_at(self):
        # The kernel's start of the process: the fork, as ProcessHandle's is the spawn's.
        return wall_time(start_ns(self._start_ticks)) if self._start_ticks is not None else None

    def close(self) -> None:
        """Drop the connection (a task still running is then reaped by the server unseen)."""
        with self._lock:
            self._close_socket()

    def _signal_group(self, signum: int) -> None:
        with self._lock:
            # Only while no exit status arrived and it is the same process: its pid could
            # otherwise name another's by now.
            self._pump(0.0)
            if self._code is not None or not self._alive():
                return
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                try:  # forked, not yet in its own session
                    os.kill(self.pid, signum)
                except ProcessLookupError:
                    pass
