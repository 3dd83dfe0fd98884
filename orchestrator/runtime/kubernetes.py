"""The Kubernetes runtime: every task attempt and every monitor is a batch/v1 Job.

The orchestrator only creates, watches (list + watch) and deletes Jobs in its namespace:
exactly what the ``orchestrator`` Role of ``k8s/rbac/role.yaml`` grants. A task's pod also
runs its sampler (a native sidecar sharing the pod's process namespace, see
:mod:`monitor.producer`), so the order has a monitor-consumer Job but no producer Job.

Inside a pod the client authenticates as the pod's service account (in-cluster config);
elsewhere it uses the kubeconfig (``KUBECONFIG`` or ``~/.kube/config``).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from orchestrator.runtime.base import Handle, Runtime, RuntimeFailure, TaskLaunch
from orchestrator.runtime.job_specs import RUN_LABEL, JobTemplates
from orchestrator.runtime.job_watcher import JobState, JobWatcher, Phase
from pipeline.kube import api_message, load_api_client
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

EXIT_FAILED = 1


class JobHandle(Handle):
    """A Job, followed through the runtime's watch."""

    def __init__(self, runtime: "KubernetesRuntime", name: str, description: str) -> None:
        self.runtime = runtime
        self.job_name = name
        self.name = f"{description} [Job {name}]"
        self._deleted_by_us = False

    def _state(self) -> JobState | None:
        return self.runtime.watcher.state(self.job_name)

    def exit_code(self) -> int | None:
        state = self._state()
        if state is None or not state.finished:
            return None
        return 0 if state.phase is Phase.SUCCEEDED else EXIT_FAILED

    def wait(self, timeout: float) -> int | None:
        self.runtime.watcher.wait_for(self.job_name, lambda s: s.finished, timeout)
        return self.exit_code()

    def wait_ready(self, timeout: float) -> None:
        state = self.runtime.watcher.wait_for(self.job_name, lambda s: s.finished or s.ready > 0, timeout)
        if state is not None and state.phase is Phase.ACTIVE and state.ready > 0:
            return
        why = self.end_reason() if state is not None and state.finished else \
            f"not ready within {timeout:g}s (its pod may be unschedulable or its image missing)"
        raise RuntimeFailure(f"{self.name}: {why}; see kubectl -n {self.runtime.namespace} "
                             f"describe job {self.job_name}")

    def stop(self, grace: float = 10.0) -> int | None:
        """Delete the Job unless it has finished (a finished one stays for its logs until its
        ttlSecondsAfterFinished); its pods get SIGTERM, then SIGKILL after their grace period."""
        state = self._state()
        if state is not None and state.finished:
            return self.exit_code()
        self._deleted_by_us = True
        try:
            self.runtime.api.delete_namespaced_job(
                self.job_name, self.runtime.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                logger.error("could not delete Job %s: HTTP %s %s", self.job_name, exc.status, exc.reason)
                return self.exit_code()
        except HTTPError as exc:
            logger.error("could not delete Job %s: %s", self.job_name, exc)
            return self.exit_code()
        self.runtime.watcher.wait_for(self.job_name, lambda s: s.finished, grace)
        return self.exit_code()

    def end_reason(self) -> str:
        state = self._state()
        if state is None or state.phase is Phase.ACTIVE:
            return "still running"
        if state.phase is Phase.SUCCEEDED:
            return "completed"
        if state.phase is Phase.GONE:
            return "was stopped" if self._deleted_by_us else \
                "vanished: its Job was deleted outside the orchestrator"
        detail = f": {state.message}" if state.message else ""
        return f"its Job failed ({state.reason or 'no reason given'}){detail}"


class KubernetesRuntime(Runtime):
    """Creates the Jobs of one orchestrator process in ``settings.k8s_namespace``."""

    samples_in_task_pods = True
    monitor_ready_timeout = 300.0

    def __init__(self, settings: Settings, api_client: client.ApiClient | None = None,
                 templates_dir: Path | None = None) -> None:
        self.settings = settings
        self.namespace = settings.k8s_namespace
        self.api = client.BatchV1Api(api_client or load_api_client())
        # Every Job of this process carries the run label; the watch follows only those.
        self.run_id = secrets.token_hex(6)
        kwargs = {"directory": templates_dir} if templates_dir else {}
        self.templates = JobTemplates(settings, self.run_id, owner_pod=_own_pod(), **kwargs)
        self.watcher = JobWatcher(self.api, self.namespace, f"{RUN_LABEL}={self.run_id}").start()

    def start_task(self, launch: TaskLaunch,
                   resources: Mapping[str, Mapping[str, str]] | None = None,
                   timeout_seconds: float = 300.0) -> Handle:
        job = self.templates.task_job(launch, timeout_seconds, resources)
        description = (f"task {launch.task_name} (order {launch.order_id}, position {launch.position}, "
                       f"attempt {launch.attempt})")
        return JobHandle(self, self._create(job), description)

    def start_monitor(self, kind: str, order_id: int) -> Handle:
        # Sampling happens in the task pods; an order's own producer only ever relays STOP.
        mode = "stop-only" if kind == "producer" else None
        job = self.templates.monitor_job(kind, order_id, mode)
        return JobHandle(self, self._create(job), f"monitor-{kind} (order {order_id})")

    def stage_input(self, image: Path, order_id: int) -> Path:
        """Copy the input image onto the shared artifacts volume, where task pods read it."""
        artifacts = self.settings.artifact_dir
        if image.is_relative_to(artifacts):
            return image
        target = artifacts / "inputs" / f"order-{order_id}" / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        return target

    def close(self) -> None:
        self.watcher.stop()

    def _create(self, job: dict[str, Any]) -> str:
        name = job["metadata"]["name"]
        try:
            self.api.create_namespaced_job(self.namespace, job)
        except ApiException as exc:
            raise RuntimeFailure(f"cannot create Job {name} in namespace {self.namespace}: "
                                 f"{_api_problem(exc)}") from None
        except HTTPError as exc:
            raise RuntimeFailure(f"cannot reach the Kubernetes API server to create Job {name}: {exc}") from None
        self.watcher.expect(name)
        logger.info("created Job %s/%s", self.namespace, name)
        return name


def _own_pod() -> tuple[str, str] | None:
    """(name, uid) of the pod this process runs in, from the downward API (orchestrator.yaml)."""
    name, uid = os.environ.get("POD_NAME"), os.environ.get("POD_UID")
    return (name, uid) if name and uid else None


def _api_problem(exc: ApiException) -> str:
    """One line for an API error, with the usual fix for the usual causes."""
    hint = {
        401: "the credentials were refused",
        403: "forbidden: the service account needs the orchestrator Role (k8s/rbac/role.yaml)",
        404: "the namespace does not exist (python -m pipeline deploy creates it)",
    }.get(exc.status, "")
    return "; ".join(part for part in (f"HTTP {exc.status}", api_message(exc), hint) if part)
