"""The local runtime: tasks and monitors as child processes of the orchestrator."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.runtime.base import Handle, ProcessGroupHandle, Runtime, RuntimeFailure, TaskLaunch
from orchestrator.runtime.fork_client import ForkServerClient, ForkServerUnavailable
from pipeline.lifetime import PARENT_PID_VARIABLE
from pipeline.proctime import started_ns, wall_time
from ops.infra.kafka_auth import role_environment
from pipeline.settings import Settings, TaskStart
from services.catalog import TASK_ENVIRONMENT, task_module

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]


class ProcessHandle(ProcessGroupHandle):
    """A child process in its own process group (Ctrl-C reaches only the orchestrator, which
    then stops the children itself), with its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path,
                 ready_pipe: bool) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            command, env=env, cwd=_REPO_ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_pipe else self._log, stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def exit_code(self) -> int | None:
        return self.process.poll()

    def started_at(self):
        # The kernel's start of the child, not the moment Popen was called: forking a busy
        # orchestrator can take a tenth of a second, which would otherwise be a light task's
        # first interval too long.
        start = started_ns(self.pid)
        return wall_time(start) if start is not None else None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_ready(self, timeout: float) -> None:
        stdout = self.process.stdout
        assert stdout is not None, "started without a ready pipe"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([stdout], [], [], 0.2)
            if readable:
                line = stdout.readline()
                if line.strip() == b"READY":
                    return
                if not line:  # end of file: the process is gone
                    break
        code = self.wait(1.0)
        raise RuntimeFailure(
            f"{self.name} did not become ready within {timeout:g}s"
            + (f" (exit status {code})" if code is not None else "")
            + f"; see {self.log_path}"
        )

    def close(self) -> None:
        """Release the pipe and log file once the process has ended."""
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


class LocalRuntime(Runtime):
    """Runs everything with this machine's Python, from the repository root."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        env = dict(os.environ)
        env.update(settings.to_env())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env[PARENT_PID_VARIABLE] = str(os.getpid())
        # Beside this state folder's own authenticated broker (`infra up --kafka-auth`), each
        # process logs in as its role, whose ACLs allow only what that role does: the tasks
        # (and the fork server, whose environment a forked task has) as `task`, the monitors
        # as `sampler` and `consumer` (their logins laid over this one when they start).
        env.update(role_environment(settings, "task"))
        self.env = env
        self._monitor_logins = {kind: role_environment(settings, role)
                                for kind, role in (("producer", "sampler"), ("consumer", "consumer"))}
        # TASK_START=fork-server: tasks are forked from a server with their imports loaded
        # (started with the first task); a start it cannot serve is spawned instead.
        self.fork_server = (ForkServerClient(self.task_env, _REPO_ROOT, log_dir)
                            if settings.task_start is TaskStart.FORK_SERVER else None)

    @property
    def task_env(self) -> dict[str, str]:
        """A task process's environment: this runtime's, over :data:`TASK_ENVIRONMENT`."""
        return {**TASK_ENVIRONMENT, **self.env}

    def start_task(self, launch: TaskLaunch, resources=None, timeout_seconds: float = 300.0) -> Handle:
        # Local processes share the machine; requests and limits are a cluster's business.
        name = f"task {launch.task_name} (order {launch.order_id}, position {launch.position}, attempt {launch.attempt})"
        log = self.log_dir / f"order-{launch.order_id}" / f"{launch.position:02d}-{launch.task_name}-{launch.attempt}.log"
        module, args = task_module(launch.task_name), launch.to_args()
        if self.fork_server is not None:
            try:
                return self.fork_server.start(name, module, args, self.task_env, _REPO_ROOT, log)
            except ForkServerUnavailable as exc:
                logger.warning("%s: fork server unavailable (%s); spawning it", name, exc)
        command = [sys.executable, "-m", module, *args]
        return ProcessHandle(name, command, self.task_env, log, ready_pipe=False)

    def start_monitor(self, kind: str, order_id: int) -> Handle:
        log = self.log_dir / f"order-{order_id}" / f"monitor-{kind}.log"
        command = [sys.executable, "-m", "monitor", kind, str(order_id)]
        env = {**self.env, **self._monitor_logins.get(kind, {})}
        return ProcessHandle(f"monitor-{kind} (order {order_id})", command, env, log, ready_pipe=True)

    def close(self) -> None:
        """Stop the fork server (tasks of orders still running are stopped with it)."""
        if self.fork_server is not None:
            self.fork_server.close()
