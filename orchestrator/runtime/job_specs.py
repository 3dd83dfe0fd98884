"""The batch/v1 Jobs of the Kubernetes runtime, filled in from the templates in ``orchestrator/runtime/jobs/``.

The templates hold what a cluster operator may want to change (security context, default
requests and limits, deadlines, volumes, node selectors, tolerations); this module sets what
each Job must carry: a unique name, labels, images with explicit tags, commands and
arguments, the Secrets of each container's role and no other (:mod:`pipeline.cluster_roles`),
and the orchestrator's TOPIC_PREFIX (its tasks and monitors talk on the topics it created,
whatever the ConfigMap says). Nothing here talks to the API server.
"""

from __future__ import annotations

import copy
import math
import re
import secrets
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.cluster_roles import ALL_SECRETS, CONTAINER_SECRETS
from pipeline.invocation import TaskInvocation
from pipeline.settings import Settings
from services import catalog

# Package data (pyproject.toml), so an installed wheel has them too.
TEMPLATES_DIR = Path(str(resources.files(__package__) / "jobs"))

PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
RUN_LABEL = "image-pipeline/run"
ORDER_LABEL = "image-pipeline/order-id"
TASK_LABEL = "image-pipeline/task"
POSITION_LABEL = "image-pipeline/position"
ATTEMPT_LABEL = "image-pipeline/attempt"
ORDER_NAME_LABEL = "image-pipeline/order-name"

# The consumer's readiness probe (orchestrator/runtime/jobs/monitor.yaml) checks this file.
READY_FILE = "/tmp/ready"
# Past the order's own task timeout (which the orchestrator enforces), the cluster stops a
# task by itself: a backstop for an orchestrator that died.
TASK_DEADLINE_MARGIN = 120

_NAME_MAX = 63  # a Job's name becomes its pods' job-name label value: at most 63 characters
_SUFFIX_LENGTH = 5
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def job_name(*parts: object) -> str:
    """``ip-<parts>-<random>``: a valid, unique Job name (names never repeat across runs,
    even of the same order id on a reset database)."""
    base = "-".join(["ip", *(str(part) for part in parts)]).lower()
    base = re.sub(r"[^a-z0-9-]+", "-", base)
    base = re.sub(r"-{2,}", "-", base).strip("-")
    base = base[: _NAME_MAX - _SUFFIX_LENGTH - 1].rstrip("-")
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(_SUFFIX_LENGTH))
    return f"{base}-{suffix}"


def label_value(text: str) -> str:
    """``text`` as a valid label value (63 characters of [A-Za-z0-9_.-], alphanumeric ends)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.") or "none"


def merged_resources(*layers: Mapping[str, Mapping[str, str]] | None) -> dict[str, dict[str, str]]:
    """Requests and limits, each later layer overriding single values of the earlier ones."""
    result: dict[str, dict[str, str]] = {}
    for layer in layers:
        for kind, values in (layer or {}).items():
            result.setdefault(kind, {}).update({name: str(value) for name, value in values.items()})
    return result


class JobTemplates:
    """Builds the Jobs of one orchestrator process (its Jobs share the ``run`` label)."""

    def __init__(self, settings: Settings, run_id: str, directory: Path = TEMPLATES_DIR,
                 owner_pod: tuple[str, str] | None = None) -> None:
        self.settings = settings
        self.run_id = run_id
        self.directory = directory
        # In a cluster, the orchestrator's own pod (name, uid) owns the Jobs it creates: if the
        # pod goes, the garbage collector removes its tasks and monitors too.
        self.owner = ({"apiVersion": "v1", "kind": "Pod", "name": owner_pod[0], "uid": owner_pod[1]}
                      if owner_pod else None)

    def task_job(self, launch: TaskInvocation, deadline_seconds: float,
                 resources: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
        """One attempt of one task, with its sampler sidecar in the same pod."""
        name = job_name(launch.order_id, launch.position, launch.task_name, f"a{launch.attempt}")
        labels = self._labels("task", launch.order_id) | {
            TASK_LABEL: label_value(launch.task_name),
            POSITION_LABEL: str(launch.position),
            ATTEMPT_LABEL: str(launch.attempt),
        }
        job = self._load("task.yaml", name, labels)
        job["spec"]["activeDeadlineSeconds"] = int(math.ceil(deadline_seconds)) + TASK_DEADLINE_MARGIN
        pod = job["spec"]["template"]["spec"]
        sampler = _container(pod, "sampler", init=True)
        sampler["image"] = self.settings.image("monitor")
        sampler["command"] = ["python", "-m", "monitor"]
        sampler["args"] = ["producer", str(launch.order_id), "--mode", "sidecar"]
        task = _container(pod, "task")
        task["image"] = self.settings.image(launch.task_name)
        task["command"] = ["python", "-m", catalog.task_module(launch.task_name)]
        task["args"] = launch.to_args()
        task["resources"] = merged_resources(
            task.get("resources"), catalog.get_task(launch.task_name).resources, resources)
        for container in (sampler, task):
            _set_env(container, "TOPIC_PREFIX", self.settings.topic_prefix)
        set_by_template = {item["name"] for item in task.get("env", [])}
        for name, value in catalog.TASK_ENVIRONMENT.items():
            if name not in set_by_template:
                _set_env(task, name, value)
        _set_secrets(sampler, "sampler")
        _set_secrets(task, "task")
        return job

    def monitor_job(self, kind: str, order_id: int, mode: str | None = None) -> dict[str, Any]:
        """The monitor-consumer, or a producer in ``mode``, of one order."""
        name = job_name(order_id, f"monitor-{kind}")
        job = self._load("monitor.yaml", name, self._labels(f"monitor-{kind}", order_id))
        pod = job["spec"]["template"]["spec"]
        monitor = _container(pod, "monitor")
        monitor["image"] = self.settings.image("monitor")
        monitor["command"] = ["python", "-m", "monitor"]
        monitor["args"] = [kind, str(order_id), *(["--mode", mode] if mode else [])]
        _set_env(monitor, "READY_FILE", READY_FILE)
        _set_env(monitor, "TOPIC_PREFIX", self.settings.topic_prefix)
        _set_secrets(monitor, f"monitor-{kind}")
        return job

    def orchestrator_job(self, order_name: str, config_map: str, order_file: str) -> dict[str, Any]:
        """The in-cluster orchestrator of one submitted order (its file in ``config_map``)."""
        name = job_name("orchestrator", order_name)
        labels = {PART_OF: "image-pipeline", COMPONENT: "orchestrator", RUN_LABEL: self.run_id,
                  ORDER_NAME_LABEL: label_value(order_name)}
        job = self._load("orchestrator.yaml", name, labels)
        pod = job["spec"]["template"]["spec"]
        orchestrator = _container(pod, "orchestrator")
        orchestrator["image"] = self.settings.image("orchestrator")
        orchestrator["command"] = ["python", "-m", "orchestrator"]
        order_mount = next(m for m in orchestrator.get("volumeMounts", []) if m["name"] == "order")
        orchestrator["args"] = ["run", f"{order_mount['mountPath'].rstrip('/')}/{order_file}"]
        volume = next(v for v in pod.get("volumes", []) if v["name"] == "order")
        volume["configMap"]["name"] = config_map
        _set_secrets(orchestrator, "orchestrator")
        return job

    def _labels(self, component: str, order_id: int) -> dict[str, str]:
        return {PART_OF: "image-pipeline", COMPONENT: component, RUN_LABEL: self.run_id,
                ORDER_LABEL: str(order_id)}

    def _load(self, template: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
        job = copy.deepcopy(_read(self.directory / template))
        job["metadata"] = {"name": name, "namespace": self.settings.k8s_namespace,
                           "labels": {**job.get("metadata", {}).get("labels", {}), **labels}}
        if self.owner:
            job["metadata"]["ownerReferences"] = [self.owner]
        template_meta = job["spec"]["template"].setdefault("metadata", {})
        template_meta["labels"] = {**template_meta.get("labels", {}), **labels}
        return job


def _read(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def _container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    containers = pod.get("initContainers" if init else "containers", [])
    for container in containers:
        if container["name"] == name:
            return container
    raise LookupError(f"the Job template has no {'init ' if init else ''}container named {name!r}")


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [item for item in container.get("env", []) if item["name"] != name]
    container["env"] = [*env, {"name": name, "value": value}]


def _set_secrets(container: dict[str, Any], role: str) -> None:
    """The container gets the Secrets of ``role`` through envFrom, and no other Secret of the
    pipeline, whatever the template says (a Secret of the operator's own is kept)."""
    wanted = CONTAINER_SECRETS[role]
    kept = [source for source in container.get("envFrom", [])
            if (source.get("secretRef") or {}).get("name") not in ALL_SECRETS]
    container["envFrom"] = [*kept, *({"secretRef": {"name": name}} for name in wanted)]
    refused = set(ALL_SECRETS) - set(wanted)
    if "env" in container:
        container["env"] = [item for item in container["env"] if _secret_of(item) not in refused]


def _secret_of(item: Mapping[str, Any]) -> str | None:
    """The Secret an ``env`` entry takes its value from, if any."""
    return ((item.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
