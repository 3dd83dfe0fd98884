"""The small interface the orchestrator needs from a runtime."""

from __future__ import annotations

import abc
import logging
import signal
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.invocation import TaskInvocation

logger = logging.getLogger(__name__)

# The runtimes' name for what a task attempt is started with.
TaskLaunch = TaskInvocation


class Handle(abc.ABC):
    """A started task or monitor."""

    name: str

    @abc.abstractmethod
    def exit_code(self) -> int | None:
        """The exit status once it ended, else None. Never blocks."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the end; the exit status or None."""

    @abc.abstractmethod
    def wait_ready(self, timeout: float) -> None:
        """Return once the service listens; raise RuntimeFailure if it died or timed out."""

    @abc.abstractmethod
    def stop(self, grace: float = 10.0) -> int | None:
        """Ask it to stop (SIGTERM), force it after ``grace`` seconds; the exit status."""

    def end_reason(self) -> str:
        """How it ended, in words, for a failure message (call once it has ended)."""
        return f"exited with status {self.exit_code()}"

    def started_at(self) -> datetime | None:
        """When its process started, where the runtime can tell; None: now is as good."""
        return None


class ProcessGroupHandle(Handle):
    """A local process in a session of its own: stopped by signalling its whole group."""

    @abc.abstractmethod
    def _signal_group(self, signum: int) -> None:
        """Send ``signum`` to its process group (nothing once it has ended)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the handle holds once the process has ended."""

    def stop(self, grace: float = 10.0) -> int | None:
        if self.exit_code() is None:
            self._signal_group(signal.SIGTERM)
            if self.wait(grace) is None:
                logger.warning("%s ignored SIGTERM for %gs; killing it", self.name, grace)
                self._signal_group(signal.SIGKILL)
                self.wait(5.0)
        self.close()
        return self.exit_code()


class RuntimeFailure(PipelineError):
    """A task or monitor could not be started or ended badly."""


class Runtime(abc.ABC):
    """Starts tasks and monitors."""

    # True where a monitor elsewhere cannot see a task's processes, so each task carries its
    # own sampler (Kubernetes); the order then has no monitor-producer of its own, and
    # ``start_monitor("producer")`` only completes the STOP/TERMINATE handshake.
    samples_in_task_pods: bool = False
    # How long a monitor may take to become ready (a cluster may first pull its image).
    monitor_ready_timeout: float = 60.0

    @abc.abstractmethod
    def start_task(self, launch: TaskLaunch,
                   resources: Mapping[str, Mapping[str, str]] | None = None,
                   timeout_seconds: float = 300.0) -> Handle:
        """Start one attempt of a task. ``resources`` (the order's requests/limits overrides)
        and ``timeout_seconds`` (the order's task timeout, which the orchestrator enforces)
        matter to runtimes that can hand them to the platform as well."""

    @abc.abstractmethod
    def start_monitor(self, kind: str, order_id: int) -> Handle:
        """Start the monitor-``kind`` (``producer`` or ``consumer``) of an order."""

    def stage_input(self, image: Path, order_id: int) -> Path:
        """The path under which the tasks can read the order's input image."""
        return image

    def close(self) -> None:
        """Release what the runtime holds (watches, connections) once no order runs."""
