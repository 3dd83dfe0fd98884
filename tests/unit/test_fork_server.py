"""The fork server and its client: a task forked from the server is a process of its own (own
pid and session, the server its parent, CPU from zero), its exit status comes back as
subprocess reports one, stop() ends its whole process group, the server ends with its parent
and stops its tasks on SIGTERM, and the local runtime spawns a task when no server can serve
it. Real processes throughout; the task modules are small files under a temporary folder on
the server's PYTHONPATH."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from devkit.waiting import PATIENCE, wait_for
from orchestrator.runtime import fork_client
from orchestrator.runtime.base import TaskLaunch
from orchestrator.runtime.fork_client import ForkedTaskHandle, ForkServerClient, ForkServerUnavailable
from orchestrator.runtime.local import LocalRuntime, ProcessHandle
from ops.infra.state import pid_alive
from pipeline.lifetime import PARENT_PID_VARIABLE
from pipeline.proctime import TICK_NS, boottime_ns, read_start_ticks, start_ns
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]

MODULES = {
    "fs_exit": "import sys\nsys.exit(int(sys.argv[1]))\n",
    "fs_raise": "raise RuntimeError('boom from a forked task')\n",
    # Writes what it sees of itself to argv[1], then (argv[2] == "stay") sleeps.
    "fs_info": textwrap.dedent("""
        import json, os, sys, time
        cpu_ns = time.process_time_ns()
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        info = {"pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
                "parent_variable": os.environ.get("PIPELINE_PARENT_PID"), "marker": os.environ.get("MARKER"),
                "cwd": os.getcwd(), "stdin": os.readlink("/proc/self/fd/0"), "argv": sys.argv, "name": __name__,
                "cpu_ticks": int(fields[11]) + int(fields[12]), "start_ticks": int(fields[19]),
                "cpu_ns": cpu_ns}
        print("hello from the task")
        with open(sys.argv[1] + ".tmp", "w") as out:
            json.dump(info, out)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        if sys.argv[2:] == ["stay"]:
            time.sleep(60)
    """),
    # A task with a child of its own in its process group; both pids go to argv[1].
    "fs_family": textwrap.dedent("""
        import json, os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(sys.argv[1] + ".tmp", "w") as out:
            json.dump({"task": os.getpid(), "child": child.pid}, out)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(60)
    """),
}


def _module_dir(folder: Path) -> Path:
    for name, code in MODULES.items():
        (folder / f"{name}.py").write_text(code)
    return folder


def _server_env(modules: Path, parent: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(modules)])
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_PID_VARIABLE] = str(parent or os.getpid())
    return env


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _module_dir(tmp_path_factory.mktemp("fork-modules"))


@pytest.fixture(scope="module")
def client(modules: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the tests that do not end it."""
    client = ForkServerClient(_server_env(modules), REPO, tmp_path_factory.mktemp("fork-logs"))
    yield client
    client.close()


def _start(client: ForkServerClient, module: str, args: list[str], log: Path, **env: str) -> ForkedTaskHandle:
    return client.start(f"test {module}", module, args, {**os.environ, **env}, log.parent, log)


def _wait_for_file(path: Path) -> dict:
    wait_for(path.exists, f"{path} written", every=0.01)
    return json.loads(path.read_text())



def _wait_gone(pid: int) -> bool:
    return wait_for(lambda: not pid_alive(pid), f"the end of pid {pid}", every=0.02)


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` so far, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _wall_bracket(boot_ns: int) -> tuple[float, float]:
    """Bounds of a CLOCK_BOOTTIME instant on the wall clock (time.time()): the boot clock is
    read between two wall-clock readings, so the offset between the clocks lies between them."""
    before = time.time()
    now_ns = boottime_ns()
    after = time.time()
    return before - (now_ns - boot_ns) / 1e9, after - (now_ns - boot_ns) / 1e9


# --- exit statuses -------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "args", "status"),
                         [("fs_exit", ["0"], 0), ("fs_exit", ["3"], 3), ("fs_raise", [], 1)],
                         ids=["exit 0", "exit 3", "raises"])
def test_the_exit_status_comes_back_as_a_new_interpreter_would_give_it(
        client: ForkServerClient, tmp_path: Path, module: str, args: list[str], status: int) -> None:
    handle = _start(client, module, args, tmp_path / "task.log")

    assert handle.wait(PATIENCE) == status
    assert handle.exit_code() == status
    if module == "fs_raise":
        log = (tmp_path / "task.log").read_text()
        assert "Traceback" in log and "RuntimeError: boom from a forked task" in log


def test_a_task_killed_by_sigterm_reports_minus_15(client: ForkServerClient, tmp_path: Path) -> None:
    handle = _start(client, "fs_info", [str(tmp_path / "info.json"), "stay"], tmp_path / "task.log")
    _wait_for_file(tmp_path / "info.json")

    assert handle.exit_code() is None
    # ps and psutil show the command line it would have had as a new interpreter.
    assert psutil.Process(handle.pid).cmdline() == [sys.executable, "-m", "fs_info", str(tmp_path / "info.json"), "stay"]
    os.kill(handle.pid, signal.SIGTERM)
    assert handle.wait(PATIENCE) == -signal.SIGTERM


# --- a process of its own ------------------------------------------------------------------


def test_a_forked_task_is_its_own_process_in_its_own_session_under_the_server(
        client: ForkServerClient, tmp_path: Path) -> None:
    assert _start(client, "fs_exit", ["0"], tmp_path / "first.log").wait(PATIENCE) == 0  # the server runs
    server = client.pid
    server_ticks = _cpu_ticks(server)  # its start and preloading: far more than a task's start
    before_ns = boottime_ns()
    handle = _start(client, "fs_info", [str(tmp_path / "info.json")], tmp_path / "task.log", MARKER="m-42")
    info = _wait_for_file(tmp_path / "info.json")
    assert handle.wait(PATIENCE) == 0

    assert info["pid"] == handle.pid != server != os.getpid()
    assert info["sid"] == info["pgid"] == handle.pid  # setsid: its own session and group
    assert info["ppid"] == server
    assert info["parent_variable"] == str(server)  # it dies with the server, the server with us
    assert info["marker"] == "m-42"  # the environment of the request
    assert info["cwd"] == str(tmp_path)
    assert info["stdin"] == "/dev/null"
    assert info["name"] == "__main__" and info["argv"][1:] == [str(tmp_path / "info.json")]
    assert info["argv"][0].endswith("fs_info.py")
    # Counted from the fork: none of the server's CPU (its imports), which a child that
    # inherited the counters would start with; started after the server, for this request.
    assert info["cpu_ticks"] < server_ticks
    assert info["cpu_ns"] < server_ticks * TICK_NS
    assert info["start_ticks"] > read_start_ticks(server)
    kernel_start = start_ns(info["start_ticks"])  # whole ticks: up to one tick before the fork
    assert before_ns - TICK_NS < kernel_start <= boottime_ns()
    # started_at() is that instant on the wall clock. Each reading converts it with two clock
    # readings, so a preemption between them can only make it earlier: the latest of a few.
    started = [handle.started_at() for _ in range(5)]
    assert None not in started
    low, high = _wall_bracket(kernel_start)
    assert low - 1e-5 <= max(s.timestamp() for s in started) <= high + 1e-5  # microsecond rounding
    assert (tmp_path / "task.log").read_text() == "hello from the task\n"


def test_stop_ends_the_tasks_whole_process_group(client: ForkServerClient, tmp_path: Path) -> None:
    handle = _start(client, "fs_family", [str(tmp_path / "family.json")], tmp_path / "task.log")
    family = _wait_for_file(tmp_path / "family.json")
    assert os.getpgid(family["child"]) == handle.pid

    # Ended by the SIGTERM to its group, not by the SIGKILL after the grace; the child too.
    # (How fast stop() returns is bench/fork_server.py's to measure.)
    assert handle.stop(grace=PATIENCE) == -signal.SIGTERM
    assert _wait_gone(family["child"])
    # Stopping what has ended signals nothing and keeps its status.
    assert handle.stop(grace=1.0) == -signal.SIGTERM


# --- the server's own lifetime --------------------------------------------------------------


def test_sigterm_to_the_server_stops_its_running_tasks_and_the_server(
        modules: Path, tmp_path: Path) -> None:
    client = ForkServerClient(_server_env(modules), REPO, tmp_path)
    try:
        handle = _start(client, "fs_family", [str(tmp_path / "family.json")], tmp_path / "task.log")
        family = _wait_for_file(tmp_path / "family.json")
        server = client.pid
        os.kill(server, signal.SIGTERM)

        assert handle.wait(PATIENCE) == -signal.SIGTERM  # reported before the server left
        assert _wait_gone(family["child"])
        assert _wait_gone(server)
        # The next start finds it gone and says so; the runtime then spawns instead.
        with pytest.raises(ForkServerUnavailable, match="exited with status 0"):
            _start(client, "fs_exit", ["0"], tmp_path / "next.log")
    finally:
        client.close()


def test_the_server_outlives_the_thread_that_started_it(modules: Path, tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that started a process ends: an order's thread
    # that happens to start the first task must not take the server with it.
    client = ForkServerClient(_server_env(modules), REPO, tmp_path)
    try:
        first: list[ForkedTaskHandle] = []
        thread = threading.Thread(target=lambda: first.append(_start(client, "fs_exit", ["0"], tmp_path / "a.log")))
        thread.start()
        thread.join()
        assert first[0].wait(PATIENCE) == 0
        server = client.pid
        # Once the thread is gone from the kernel too, a parent-death signal tied to it has
        # been sent. A server that got it stops listening at the end of its loop's round, so
        # of two requests after that, one after the other, the second would be refused.
        wait_for(lambda: not os.path.exists(f"/proc/self/task/{thread.native_id}"), "the thread's end")
        assert _start(client, "fs_exit", ["4"], tmp_path / "b.log").wait(PATIENCE) == 4
        assert _start(client, "fs_exit", ["5"], tmp_path / "c.log").wait(PATIENCE) == 5
        assert client.pid == server and pid_alive(server)
        assert "stopped" not in (tmp_path / "fork-server.log").read_text()
    finally:
        client.close()
    assert _wait_gone(server)


PARENT = """
import os, sys, time
from pathlib import Path
from orchestrator.runtime.fork_client import ForkServerClient
env = dict(os.environ, PIPELINE_PARENT_PID=str(os.getpid()))
client = ForkServerClient(env, Path(sys.argv[1]), Path(sys.argv[2]))
handle = client.start("t", "fs_info", [sys.argv[3], "stay"], env, Path(sys.argv[2]), Path(sys.argv[2]) / "t.log")
print(client.pid, handle.pid, os.path.dirname(client._path), flush=True)
time.sleep(60)
"""


def test_the_server_and_its_tasks_end_when_its_parent_dies(modules: Path, tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(REPO), str(tmp_path), str(tmp_path / "info.json")],
                              env=_server_env(modules), stdout=subprocess.PIPE, text=True)
    try:
        server, task, folder = parent.stdout.readline().split()
        server, task = int(server), int(task)
        _wait_for_file(tmp_path / "info.json")
        assert pid_alive(server) and pid_alive(task)

        parent.kill()  # no clean-up of its own: only the kernel's PR_SET_PDEATHSIG is left
        parent.wait()
        assert _wait_gone(server)
        assert _wait_gone(task)
        assert not os.path.exists(folder)  # the socket's private folder: removed by the server
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()


# --- the local runtime -----------------------------------------------------------------------


def _runtime(tmp_path: Path, task_start: str) -> LocalRuntime:
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state"),
                                  "PIPELINE_CACHE_DIR": str(tmp_path / "cache"), "TASK_START": task_start})
    runtime = LocalRuntime(settings, tmp_path / "logs")
    # A setting the task refuses at once (exit status 2, before any Kafka client): what
    # matters here is how the process was started and that the task's code ran.
    runtime.env["DATABASE_URL"] = "mysql://refused"
    return runtime


LAUNCH = TaskLaunch(7, ("grayscale",), "grayscale", (), REPO / "orders" / "images" / "pattern-320x320.png")


def _log_of(runtime: LocalRuntime) -> str:
    return (runtime.log_dir / "order-7" / "00-grayscale-1.log").read_text()


def test_the_local_runtime_forks_tasks_from_its_server(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, "fork-server")
    try:
        handle = runtime.start_task(LAUNCH)
        assert isinstance(handle, ForkedTaskHandle)
        assert handle.wait(PATIENCE) == 2
        assert "error: DATABASE_URL='mysql://refused'" in _log_of(runtime)
        server = runtime.fork_server.pid
        assert server is not None
    finally:
        runtime.close()
    assert _wait_gone(server)


def test_a_local_task_has_no_openblas_worker_thread_beside_it(tmp_path: Path) -> None:
    """numpy's OpenBLAS would start one per core, spinning for tens of ms after it starts and
    after each call: CPU time the task's accounting would carry, more the idler the node."""
    runtime = _runtime(tmp_path, "spawn")
    try:
        probe = ("import os, numpy; numpy.ones((64, 64)) @ numpy.ones((64, 64)); "
                 "print(len(os.listdir('/proc/self/task')))")
        done = subprocess.run([sys.executable, "-c", probe], env=runtime.task_env, capture_output=True,
                              text=True, timeout=PATIENCE)
        assert done.stdout.strip() == "1", done.stderr
    finally:
        runtime.close()


def test_the_local_runtime_spawns_when_the_socket_path_is_unusable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fork_client, "RETRY_SECONDS", 3600.0)  # however slow this test, within it
    runtime = _runtime(tmp_path, "fork-server")
    runtime.fork_server = ForkServerClient(runtime.env, REPO, runtime.log_dir,
                                           socket_path=tmp_path / "no-such-folder" / "server.sock")
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.local"):
            handle = runtime.start_task(LAUNCH)
        assert isinstance(handle, ProcessHandle)
        assert handle.wait(PATIENCE) == 2
        handle.stop()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "fork server unavailable" in warnings[0].getMessage()
        assert "cannot listen" in (runtime.log_dir / "fork-server.log").read_text()
        # Within the retry interval the next start spawns at once, without a new server: no
        # second server tried to listen (its failure would be in the log by the time the start
        # returned: the client waits for a new server to listen or exit).
        with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.local"):
            second = runtime.start_task(LAUNCH)
        assert isinstance(second, ProcessHandle)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "it failed recently" in warnings[1]
        assert (runtime.log_dir / "fork-server.log").read_text().count("cannot listen") == 1
        assert second.wait(PATIENCE) == 2
        second.stop()
    finally:
        runtime.close()


def test_task_start_spawn_uses_no_server(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, "spawn")
    try:
        assert runtime.fork_server is None
        handle = runtime.start_task(LAUNCH)
        assert isinstance(handle, ProcessHandle)
        assert handle.wait(PATIENCE) == 2
        handle.stop()
    finally:
        runtime.close()
