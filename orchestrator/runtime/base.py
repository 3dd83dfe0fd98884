"""The small interface the orchestrator needs from a runtime."""

from __future__ import annotations

import abc

from pipeline.invocation import TaskInvocation

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


class RuntimeFailure(Exception):
    """A task or monitor could not be started or ended badly."""


class Runtime(abc.ABC):
    """Starts tasks and monitors."""

    @abc.abstractmethod
    def start_task(self, launch: TaskLaunch) -> Handle:
        """Start one attempt of a task."""

    @abc.abstractmethod
    def start_monitor(self, kind: str, order_id: int) -> Handle:
        """Start the monitor-``kind`` (``producer`` or ``consumer``) of an order."""
