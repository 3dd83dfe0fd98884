"""The fork server: task processes forked from an interpreter with the tasks' imports loaded.

    python -m services.runtime.fork_server SOCKET_PATH [--remove-folder] [ROOM]

Starting a light task as a new interpreter costs ~280 ms of Python start-up and imports
(Pillow, numpy, confluent-kafka, the pipeline). This server pays that once: it imports what
tasks need, then listens on a Unix stream socket (mode 0600). A client connects, sends one JSON
line ``{"module", "args", "env", "cwd", "log"}`` and gets ``{"pid": N}`` once the task is
forked, then ``{"exit": STATUS}`` when the server reaps it (negative: killed by that signal,
as :mod:`subprocess` reports it), and the server closes the connection.

Each task is still a process of its own, measured as such: its own pid and session (setsid,
so ``killpg(pid)`` reaches all of it), the kernel's start time at the fork, CPU and I/O
counters from zero. It runs its module as ``python -m`` would (``runpy``, ``__main__``,
``sys.argv``), with the given environment, cwd, stdin from /dev/null, stdout and stderr
appended to the log, the interpreter's default signal handling; it always ends with
``os._exit``. Its command line (``/proc/<pid>/cmdline``, what ``ps`` and psutil show) is
rewritten to the ``python -m MODULE ARGS`` it would have had, in the room of the server's own
command line: a last argument of spaces only (ROOM) makes that room.

Fork safety: the server is single-threaded (one poll loop; SIGCHLD and SIGTERM reach it through
``signal.set_wakeup_fd``) and creates no Kafka client, database connection or thread, so a
child inherits no lock held by a thread that does not exist in it.

The server does not outlive its parent (the orchestrator): PR_SET_PDEATHSIG, as every local
child (:func:`pipeline.lifetime.stop_with_parent`), plus a check of its parent pid each second.
On SIGTERM it stops accepting, sends SIGTERM to the process groups of its tasks still running,
reaps them (SIGKILL after a grace) and exits. Each task's ``PIPELINE_PARENT_PID`` is the
server's pid, so a task dies with the server as it would with the orchestrator.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import json
import os
import runpy
import selectors
import signal
import socket
import stat
import sys
import threading
import time
import traceback

from pipeline.lifetime import PARENT_PID_VARIABLE, stop_with_parent
from pipeline.proctime import started_ns, wall_time

MAX_REQUEST_BYTES = 1 << 20
STOP_GRACE_SECONDS = 5.0
# Signals whose handling the server changes; a task gets them back as the interpreter set them.
_HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The variables OpenBLAS reads for its thread count, in its order of precedence.
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def log(message: str) -> None:
    """One line on the server's stderr (its log file); no logging handlers a task could inherit."""
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} fork-server[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- preloading


def preload() -> None:
    """Import what tasks import, so that a forked task starts with it in memory."""
    # numpy's OpenBLAS starts its worker threads when it is loaded (one per core, as many as
    # OPENBLAS_NUM_THREADS says): with 1 it starts none, and the server stays single-threaded.
    # Set in the server's own environment only: each task gets its own environment from the
    # request and, in the child, the thread count OpenBLAS would have given itself in a new
    # interpreter with that environment (_blas_threads; sepia's matrix product uses them).
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import numpy  # noqa: F401
    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps  # noqa: F401

    Image.preinit()  # the codecs Image.open and save look for first (JPEG, PNG, GIF, BMP, PPM)
    import confluent_kafka  # noqa: F401  (the module only: no client, so no librdkafka thread)

    import services.runtime.runner  # noqa: F401  (pipeline.kafka, protocol, settings, ...)
    from services.catalog import all_tasks

    all_tasks()  # imports every services/<task>/main.py


def _blas_thread_setter():
    """OpenBLAS's ``set_num_threads`` in numpy's bundled library, or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                     "openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            setter = getattr(library, name, None)
            if setter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                return setter
    return None


def _blas_threads(env: dict[str, str]) -> int:
    """The thread count OpenBLAS gives itself in a new process with ``env``."""
    cpus = len(os.sched_getaffinity(0))
    for name in _BLAS_THREAD_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), cpus)
    return cpus


# --------------------------------------------------------------------------- the server


ACCOUNT_DIR_VARIABLE = "PIPELINE_KERNEL_ACCOUNT_DIR"


def _zombie_record(pid: int) -> dict | None:
    """What /proc still tells of an exited, unreaped child: its start and storage I/O."""
    started = started_ns(pid)
    try:
        with open(f"/proc/{pid}/io") as handle:
            io = dict(line.strip().split(": ") for line in handle if ": " in line)
    except (OSError, ValueError):
        return None
    if started is None:
        return None
    return {"pid": pid, "started_ms": wall_time(started).timestamp() * 1000, "ended_ms": time.time() * 1000,
            "read_bytes": int(io["read_bytes"]), "write_bytes": int(io["write_bytes"])}


def _write_record(folder: str, pid: int, record: dict) -> None:
    try:
        with open(os.path.join(folder, f"fork-{pid}-{time.monotonic_ns()}.json"), "w") as handle:
            json.dump(record, handle)
    except OSError as exc:
        log(f"cannot write the kernel record of pid {pid}: {exc}")


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.pid: int | None = None  # the task it started, once forked


class ForkServer:
    def __init__(self, path: str, remove_folder: bool = False) -> None:
        self.path = path
        self.remove_folder = remove_folder  # the socket's folder is its own: removed at the end
        self.pid = os.getpid()
        self.parent = os.getppid()
        self.commands: dict[int, list[str]] = {}  # pid -> the command line it stands for
        # bench/measurement_accuracy.py: the kernel's own account of every task, written at
        # its reaping in bench/kernel_account.py's format (independent of the sampler).
        self.account_dir = os.environ.get(ACCOUNT_DIR_VARIABLE) or None
        self.start_cwd = os.getcwd()
        self.children: dict[int, _Connection | None] = {}
        self.stopping = False
        self.selector = selectors.PollSelector()  # no epoll instance shared with the children
        self.saved_signals = {signum: signal.getsignal(signum) for signum in _HANDLED}
        self.blas_setter = None
        self.command_line = _CommandLine()
        self.listener: socket.socket | None = None
        self.wakeup_r = self.wakeup_w = -1

    # ---- set-up

    def open(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_stop)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, None)

        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600, never wider
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(socket.SOMAXCONN)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, None)

    def _remove_stale_socket(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{self.path} exists and is not a socket")
        os.unlink(self.path)

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    # ---- the loop

    def serve(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(timeout=1.0):
                if key.fileobj == self.wakeup_r:
                    self._drain_wakeup()
                elif key.fileobj is self.listener:
                    self._accept()
                else:
                    self._read(key.data)
            self._reap()
            if os.getppid() != self.parent:  # the parent is gone (PDEATHSIG covers it too)
                log("parent gone; stopping")
                self.stopping = True
        self._shut_down()

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log(f"accept failed: {exc}")
                return
            sock.setblocking(False)
            conn = _Connection(sock)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away; a task it started runs on and is reaped
            self._drop(conn)
            return
        if conn.pid is not None:
            return  # one request per connection; anything after it is ignored
        conn.buffer += data
        if b"\n" not in conn.buffer:
            if len(conn.buffer) > MAX_REQUEST_BYTES:
                self._reply(conn, {"error": "request too long"})
                self._drop(conn)
            return
        line = conn.buffer.split(b"\n", 1)[0]
        conn.buffer = b""
        try:
            request = _parse_request(line)
        except ValueError as exc:
            self._reply(conn, {"error": str(exc)})
            self._drop(conn)
            return
        self._fork(conn, request)

    def _fork(self, conn: _Connection, request: dict) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(request)  # never returns
        conn.pid = pid
        self.children[pid] = conn
        self.commands[pid] = [sys.executable, "-m", request["module"], *request["args"]]
        self._reply(conn, {"pid": pid})

    def _reply(self, conn: _Connection, message: dict) -> None:
        try:
            conn.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn.pid is not None and self.children.get(conn.pid) is conn:
            self.children[conn.pid] = None

    def _reap(self) -> None:
        while self.children:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None:
                return
            pid = found.si_pid
            record = _zombie_record(pid) if self.account_dir else None  # before it is reaped
            _, status, usage = os.wait4(pid, 0)
            command = self.commands.pop(pid, None)
            if record is not None and command is not None:
                _write_record(self.account_dir, pid, {**record, "command": command,
                                                      "cpu_seconds": usage.ru_utime + usage.ru_stime,
                                                      "peak_rss_kib": usage.ru_maxrss})
            conn = self.children.pop(pid, None)
            if conn is not None:
                self._reply(conn, {"exit": os.waitstatus_to_exitcode(status)})
                self._drop(conn)

    def _shut_down(self) -> None:
        """Stop accepting; SIGTERM the tasks still running (their process groups), reap them."""
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
                if self.remove_folder:
                    os.rmdir(os.path.dirname(self.path))
            except OSError:
                pass
        if self.children:
            log(f"stopping {len(self.children)} running task(s)")
        for pid in list(self.children):
            _signal_task(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        killed = False
        while self.children:
            self._reap()
            if not self.children:
                break
            if time.monotonic() > deadline and not killed:
                for pid in list(self.children):
                    _signal_task(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.02)
        log("stopped")

    # ---- the child

    def _child(self, request: dict) -> None:
        """Become the task; never returns."""
        status = 1
        try:
            os.setsid()
            self._leave_server()
            status = _run_as_main(request, self)
        except BaseException:  # noqa: BLE001 - the child's boundary: report, then exit
            try:
                traceback.print_exc()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)

    def _leave_server(self) -> None:
        """Drop the server's sockets, pipe and signal handling in a child."""
        signal.set_wakeup_fd(-1)
        for signum, handler in self.saved_signals.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        # Every socket the server holds is registered: the listener and each connection (the
        # one this child was requested on among them). Closed through their objects, so that
        # no stale object closes a descriptor number the task reuses.
        for key in list(self.selector.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        self.selector.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)


class _CommandLine:
    """This process's command line in memory: the bytes ``/proc/<pid>/cmdline`` shows, between
    the kernel's ``arg_start`` and ``arg_end``, overwritten in place (a forked child has its
    own copy of them).

    Written as setproctitle(3) does: one string, the words joined by spaces, and the area's
    last byte not NUL, so that the kernel shows the string up to its NUL (at most a page) and
    not the rest of the room. psutil splits such a command line at its spaces again."""

    def __init__(self) -> None:
        self.start = self.size = 0
        try:
            with open("/proc/self/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            start, end = int(fields[45]), int(fields[46])  # proc(5) fields 48 and 49
        except (OSError, IndexError, ValueError):
            return
        if 0 < start < end:
            self.start, self.size = start, end - start

    def set(self, words: list[str]) -> None:
        """Show ``words`` (cut to the room there is)."""
        if self.size < 2:
            return
        title = b" ".join(os.fsencode(word) for word in words)[: min(self.size, 4096) - 1]
        data = title + b"\0" + b" " * (self.size - len(title) - 1)
        ctypes.memmove(self.start, data, self.size)


def _parse_request(line: bytes) -> dict:
    try:
        request = json.loads(line)
    except ValueError:
        raise ValueError("not a JSON line") from None
    if not isinstance(request, dict):
        raise ValueError("expected a JSON object")
    module, args, env = request.get("module"), request.get("args", []), request.get("env")
    cwd, log_path = request.get("cwd"), request.get("log")
    if not isinstance(module, str) or not module:
        raise ValueError("'module' must be a module name")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError("'args' must be a list of strings")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("'env' must be an object of strings")
    if not isinstance(cwd, str) or not isinstance(log_path, str):
        raise ValueError("'cwd' and 'log' must be paths")
    return {"module": module, "args": args, "env": env, "cwd": cwd, "log": log_path}


def _run_as_main(request: dict, server: ForkServer) -> int:
    """What ``python -m MODULE ARGS`` does in a new interpreter, in this forked one; the status."""
    env = dict(request["env"])
    env[PARENT_PID_VARIABLE] = str(server.pid)  # the task's parent is this server
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    output = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    threads = _blas_threads(env)
    if threads != 1 and server.blas_setter is not None:
        server.blas_setter(threads)
    if sys.path and sys.path[0] == server.start_cwd:
        sys.path[0] = os.getcwd()  # what ``python -m`` puts first: the cwd it starts in
    module = request["module"]
    # Imported by the preloading under its own name; run afresh as __main__ it must not be
    # in sys.modules, or runpy warns that it may behave unpredictably.
    sys.modules.pop(module, None)
    sys.argv = [module, *request["args"]]  # run_module puts the module's file first
    server.command_line.set([sys.executable, "-m", module, *request["args"]])
    try:
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            status = 0
        finally:
            _interpreter_exit()
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        # As the interpreter does: end by SIGINT, so the parent sees it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGINT)
        status = 130
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, status 1
        traceback.print_exc()
        status = 1
    return status


def _interpreter_exit() -> None:
    """Wait for non-daemon threads and run the atexit handlers, as an interpreter's exit does."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()


def _exit_status(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives a process."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _signal_task(pid: int, signum: int) -> None:
    """Signal a task's process group (its session), or the task alone before its setsid."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[-1].strip(" ") == "":
        argv.pop()  # ROOM: only there to be overwritten
    if len(argv) not in (1, 2) or argv[1:] not in ([], ["--remove-folder"]):
        print("usage: python -m services.runtime.fork_server SOCKET_PATH [--remove-folder] [ROOM]",
              file=sys.stderr)
        return 2
    server = ForkServer(argv[0], remove_folder=argv[1:] == ["--remove-folder"])
    server.command_line.set([sys.executable, "-m", "services.runtime.fork_server", *argv])
    stop_with_parent()  # SIGTERM when the orchestrator goes (handled once the loop runs)
    began = time.monotonic()
    preload()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads != 1 or threading.active_count() != 1:
        log(f"{threads} threads after the imports: forking would be unsafe; not serving")
        return 1
    server.blas_setter = _blas_thread_setter()
    # What is loaded now lives as long as the server: out of the collector's way, so that a
    # child's collections do not touch (and copy) every page of it.
    gc.freeze()
    try:
        server.open()
    except OSError as exc:
        log(f"cannot listen on {server.path}: {exc}")
        return 1
    log(f"listening on {server.path} (imports took {time.monotonic() - began:.2f}s)")
    server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
