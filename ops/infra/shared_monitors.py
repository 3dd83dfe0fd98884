"""The shared monitoring services on this machine: one sampler and N consumer replicas.

``python -m pipeline infra up`` starts them beside the broker (``python -m monitor producer
--all`` and ``python -m monitor consumer --all``), each in a session of its own with its log in
``$PIPELINE_STATE_DIR/logs/``. They serve the settings they were started with; a fingerprint
of those (broker, database, model store) is kept with their pid files, and an orchestrator
uses them only when its own settings match (``MONITORS=auto``), so a run against another
database never stores its samples in the wrong place.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InfraError
from ops.infra.kafka_auth import role_environment
from ops.infra.state import pid_alive, process_cmdline
from pipeline.lifetime import PARENT_PID_VARIABLE
from pipeline.settings import Settings, mask_url

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 180.0  # a consumer that scores loads PyTorch and the model first
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServiceStatus:
    name: str  # sampler, consumer-1, consumer-2, ...
    pid: int | None
    log: Path

    @property
    def running(self) -> bool:
        return self.pid is not None


def fingerprint(settings: Settings) -> str:
    """What the services' work depends on: the deployment (broker and database, see
    :meth:`Settings.deployment_id`) and the model store they score with."""
    return f"{settings.deployment_id()} {mask_url(settings.mlflow_tracking_uri)}"


class SharedMonitors:
    """Start, inspect and stop this state folder's shared monitoring services."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.state_dir / "monitors"
        self.log_dir = settings.state_dir / "logs"

    def _command(self, name: str) -> list[str]:
        kind = "producer" if name == "sampler" else "consumer"
        return [sys.executable, "-m", "monitor", kind, "--all"]

    def _names(self) -> list[str]:
        names = sorted(p.stem for p in self.home.glob("*.pid")) if self.home.exists() else []
        return names or ["sampler", "consumer-1"]

    def status(self) -> list[ServiceStatus]:
        return [ServiceStatus(name, self._pid(name), self.log_dir / f"monitor-{name}.log")
                for name in self._names()]

    def serving(self, settings: Settings | None = None) -> bool:
        """Whether the sampler and a consumer run, started for ``settings``' broker and database."""
        running = {s.name for s in self.status() if s.running}
        if "sampler" not in running or not any(n.startswith("consumer-") for n in running):
            return False
        try:
            recorded = json.loads((self.home / "settings.json").read_text())
        except (FileNotFoundError, ValueError):
            return False
        return recorded.get("fingerprint") == fingerprint(settings or self.settings)

    def start(self, consumers: int | None = None) -> list[str]:
        """Start what is not running (restarting services started for other settings);
        ``consumers`` replicas of the consumer (default: as many as before, at least one).
        One report line per service."""
        if consumers is None:
            consumers = max(1, sum(1 for n in self._names() if n.startswith("consumer-")))
        if consumers < 1:
            raise InfraError("at least one monitor-consumer replica is needed")
        wanted = ["sampler", *(f"consumer-{i}" for i in range(1, consumers + 1))]
        current = fingerprint(self.settings)
        try:
            recorded = json.loads((self.home / "settings.json").read_text()).get("fingerprint")
        except (FileNotFoundError, ValueError):
            recorded = None
        lines = []
        if recorded != current:
            lines += [f"monitor-{line} (started for other settings)" for line in self.stop()]
        for name in self._names():
            if name not in wanted and self._pid(name) is not None:
                self._stop_one(name)
                lines.append(f"monitor-{name}: stopped (replicas now {consumers})")
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.home / "settings.json").write_text(json.dumps({"fingerprint": current}))
        starting = {}
        for name in wanted:
            pid = self._pid(name)
            if pid is not None:
                lines.append(f"monitor-{name}: already running (pid {pid})")
                continue
            starting[name] = self._spawn(name)
        for name, process in starting.items():
            began = time.monotonic()
            self._wait_ready(name, process)
            lines.append(f"monitor-{name}: started (pid {process.pid}) in {time.monotonic() - began:.1f}s, "
                         f"log {self.log_dir / f'monitor-{name}.log'}")
        return lines

    def stop(self) -> list[str]:
        """Stop every service of this state folder; one line each."""
        lines = []
        for name in self._names():
            if self._stop_one(name):
                lines.append(f"{name}: stopped")
        (self.home / "settings.json").unlink(missing_ok=True)
        return lines

    def _spawn(self, name: str) -> subprocess.Popen:
        env = dict(os.environ)
        env.update(self.settings.to_env())
        # On the local broker with authentication each logs in as its own role, whatever login
        # its starter has (ops/infra/kafka_auth.py).
        env.update(role_environment(self.settings, "sampler" if name == "sampler" else "consumer"))
        env.pop(PARENT_PID_VARIABLE, None)  # services: they outlive whoever started them
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        ready = self.home / f"{name}.ready"
        ready.unlink(missing_ok=True)
        env["READY_FILE"] = str(ready)
        with open(self.log_dir / f"monitor-{name}.log", "ab") as log:
            process = subprocess.Popen(self._command(name), env=env, cwd=_REPO_ROOT, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        (self.home / f"{name}.pid").write_text(str(process.pid))
        return process

    def _wait_ready(self, name: str, process: subprocess.Popen) -> None:
        ready = self.home / f"{name}.ready"
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if ready.exists():
                return
            if process.poll() is not None:
                (self.home / f"{name}.pid").unlink(missing_ok=True)
                raise InfraError(f"monitor-{name} exited with status {process.returncode} while starting; "
                                 f"see {self.log_dir / f'monitor-{name}.log'}")
            time.sleep(0.1)
        raise InfraError(f"monitor-{name} did not become ready within {READY_TIMEOUT:g}s; "
                         f"see {self.log_dir / f'monitor-{name}.log'}")

    def _pid(self, name: str) -> int | None:
        path = self.home / f"{name}.pid"
        try:
            pid = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        # A stale pid file may name a recycled pid: only our command line is ours.
        if pid_alive(pid) and " ".join(self._command(name)[1:]) in process_cmdline(pid):
            return pid
        return None

    def _stop_one(self, name: str) -> bool:
        pid = self._pid(name)
        (self.home / f"{name}.ready").unlink(missing_ok=True)
        if pid is None:
            (self.home / f"{name}.pid").unlink(missing_ok=True)
            return False
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                logger.warning("monitor-%s pid=%d ignored SIGTERM for %gs; killing it", name, pid, STOP_TIMEOUT)
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        (self.home / f"{name}.pid").unlink(missing_ok=True)
        return True
