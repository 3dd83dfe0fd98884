"""What the API server says about this orchestrator's Jobs, kept current by one watch.

One list-then-watch stream on the ``run`` label replaces a GET per Job per poll: the order
threads read the latest state from memory and wait on a condition. A broken or expired watch
(HTTP 410) is followed by a fresh list, which is also how a Job deleted while no watch was
open is noticed: it is missing from the list.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

logger = logging.getLogger(__name__)

WATCH_SECONDS = 30
RETRY_MAX_SECONDS = 10.0


class Phase(str, enum.Enum):
    ACTIVE = "active"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    GONE = "gone"  # deleted, by us or by someone else


@dataclass(frozen=True)
class JobState:
    phase: Phase
    ready: int = 0
    reason: str = ""
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.phase is not Phase.ACTIVE


def state_of(job: client.V1Job) -> JobState:
    """A Job's phase from its terminal conditions (set by the Job controller)."""
    status = job.status
    for condition in (status.conditions if status else None) or []:
        if condition.status != "True":
            continue
        if condition.type == "Complete":
            return JobState(Phase.SUCCEEDED)
        if condition.type == "Failed":
            return JobState(Phase.FAILED, reason=condition.reason or "",
                            message=condition.message or "")
    return JobState(Phase.ACTIVE, ready=(status.ready or 0) if status else 0)


class JobWatcher:
    """Follows the Jobs labelled ``selector`` in ``namespace`` on a daemon thread."""

    def __init__(self, api: client.BatchV1Api, namespace: str, selector: str) -> None:
        self.api = api
        self.namespace = namespace
        self.selector = selector
        self._states: dict[str, JobState] = {}
        self._expected: dict[str, float] = {}  # Jobs we created -> when (monotonic)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-watcher", daemon=True)

    def start(self) -> "JobWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        # The watch request ends by itself within WATCH_SECONDS; the thread is a daemon, so
        # an exiting orchestrator does not wait for it.
        self._thread.join(timeout=1.0)

    def expect(self, name: str) -> None:
        """Note a Job just created, so that its absence from a later list means it vanished."""
        with self._changed:
            self._expected[name] = time.monotonic()
            self._states.setdefault(name, JobState(Phase.ACTIVE))

    def state(self, name: str) -> JobState | None:
        with self._changed:
            return self._states.get(name)

    def wait_for(self, name: str, done: Callable[[JobState], bool], timeout: float) -> JobState | None:
        """Wait until ``done(state)`` holds; the state then, or the last state seen on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                current = self._states.get(name)
                if current is not None and done(current):
                    return current
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    return current
                self._changed.wait(remaining)

    def _run(self) -> None:
        pause = 0.5
        while not self._stopping.is_set():
            try:
                version = self._relist()
                self._follow(version)
                pause = 0.5
            except ApiException as exc:
                if exc.status == 410:  # the version expired: list again at once
                    continue
                logger.warning("watching Jobs in %s failed (HTTP %s: %s); retrying in %.1fs",
                               self.namespace, exc.status, exc.reason, pause)
            except Exception as exc:  # noqa: BLE001 - connection trouble: keep trying
                logger.warning("watching Jobs in %s failed (%s); retrying in %.1fs",
                               self.namespace, exc, pause)
            else:
                continue
            self._stopping.wait(pause)
            pause = min(pause * 2, RETRY_MAX_SECONDS)

    def _relist(self) -> str:
        began = time.monotonic()
        listed = self.api.list_namespaced_job(self.namespace, label_selector=self.selector)
        present = {job.metadata.name for job in listed.items}
        with self._changed:
            for job in listed.items:
                self._set(job.metadata.name, state_of(job))
            for name, created in self._expected.items():
                if created < began and name not in present:
                    self._set(name, JobState(Phase.GONE, reason="Deleted",
                                             message="the Job no longer exists"))
            self._changed.notify_all()
        return listed.metadata.resource_version

    def _follow(self, version: str) -> None:
        stream = watch.Watch()
        for event in stream.stream(self.api.list_namespaced_job, self.namespace,
                                   label_selector=self.selector, resource_version=version,
                                   timeout_seconds=WATCH_SECONDS,
                                   _request_timeout=WATCH_SECONDS + 10):
            job = event["object"]
            if event["type"] == "DELETED":
                state = JobState(Phase.GONE, reason="Deleted", message="the Job was deleted")
            else:
                state = state_of(job)
            with self._changed:
                self._set(job.metadata.name, state)
                self._changed.notify_all()
            if self._stopping.is_set():
                stream.stop()

    def _set(self, name: str, state: JobState) -> None:
        # A finished Job removed later (ttlSecondsAfterFinished, a clean-up) keeps its result.
        previous = self._states.get(name)
        if state.phase is Phase.GONE and previous is not None and previous.phase in (
                Phase.SUCCEEDED, Phase.FAILED):
            return
        self._states[name] = state
