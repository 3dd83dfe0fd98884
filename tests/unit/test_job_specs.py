"""The Jobs the Kubernetes runtime creates, built from orchestrator/runtime/jobs/ (no API server needed here;
tests/integration/kube/ sends them to a real one)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from orchestrator.runtime.job_specs import (
    ATTEMPT_LABEL, ORDER_LABEL, POSITION_LABEL, RUN_LABEL, TASK_DEADLINE_MARGIN, TASK_LABEL,
    TEMPLATES_DIR, JobTemplates, job_name, merged_resources,
)
from pipeline import __version__
from pipeline.cluster_roles import CONTAINER_SECRETS, DATABASE_SECRET
from pipeline.errors import SettingsError
from pipeline.invocation import TaskInvocation
from pipeline.settings import Settings

DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@pytest.fixture
def templates(tmp_path) -> JobTemplates:
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "K8S_NAMESPACE": "pipelines",
                                  "IMAGE_REGISTRY": "registry.example:5000/team", "IMAGE_TAG": "1.2.3"})
    return JobTemplates(settings, run_id="abc123")


def _launch(task="median", progress=(), attempt=1) -> TaskInvocation:
    return TaskInvocation(order_id=42, required_tasks=("grayscale", "median", "edge_detect"),
                          task_name=task, progress=progress, image=Path("/artifacts/inputs/x.jpg"),
                          params={"size": 5}, attempt=attempt)


def _containers(job, init=False):
    spec = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers" if init else "containers", [])}


def _sources(container):
    """The names of the ConfigMaps and Secrets of a container's envFrom, in order."""
    return [next(iter(s.values()))["name"] for s in container["envFrom"]]


def test_job_names_are_valid_and_never_repeat():
    names = {job_name(123456789, 14, "edge_detect", "a3") for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert len(name) <= 63 and DNS_1123.fullmatch(name), name
        assert name.startswith("ip-123456789-14-edge-detect-a3-")
    long = job_name("x" * 100, "order.name_with.dots")
    assert len(long) <= 63 and DNS_1123.fullmatch(long)


def test_a_task_job_runs_the_task_and_its_sampler_in_one_pod(templates):
    launch = _launch(progress=("/artifacts/order-42/00-grayscale.png",), attempt=2)
    job = templates.task_job(launch, deadline_seconds=300)
    assert job["metadata"]["namespace"] == "pipelines"
    labels = job["metadata"]["labels"]
    assert labels[ORDER_LABEL] == "42" and labels[TASK_LABEL] == "median"
    assert labels[POSITION_LABEL] == "1" and labels[ATTEMPT_LABEL] == "2" and labels[RUN_LABEL] == "abc123"
    assert job["spec"]["template"]["metadata"]["labels"] == labels  # kubectl logs -l works too
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] == 300 + TASK_DEADLINE_MARGIN
    pod = spec["template"]["spec"]
    assert pod["shareProcessNamespace"] is True and pod["restartPolicy"] == "Never"

    task = _containers(job)["task"]
    assert task["image"] == "registry.example:5000/team/image-pipeline-median:1.2.3"
    assert task["command"] == ["python", "-m", "services.median.main"]
    assert TaskInvocation.from_args(task["args"]) == launch
    # one BLAS thread: no OpenBLAS worker spinning beside the task (services/catalog.py)
    assert {e["name"]: e.get("value") for e in task["env"]}["OPENBLAS_NUM_THREADS"] == "1"

    sampler = _containers(job, init=True)["sampler"]
    assert sampler["restartPolicy"] == "Always", "a native sidecar: stopped when the task ends"
    assert sampler["image"] == "registry.example:5000/team/image-pipeline-monitor:1.2.3"
    assert sampler["args"] == ["producer", "42", "--mode", "sidecar"]
    pod_name = {e["name"]: e for e in sampler["env"]}["POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert _sources(task) == ["pipeline-settings", "kafka-task"]
    assert _sources(sampler) == ["pipeline-settings", "kafka-sampler"]


def test_resources_come_from_the_template_then_the_task_then_the_order(templates):
    light = _containers(templates.task_job(_launch(task="grayscale"), 60))["task"]["resources"]
    heavy = _containers(templates.task_job(_launch(), 60))["task"]["resources"]
    ordered = _containers(templates.task_job(
        _launch(), 60, {"limits": {"memory": "3Gi"}, "requests": {"cpu": "1500m"}}))["task"]["resources"]
    assert light == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert heavy == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    assert ordered == {"requests": {"cpu": "1500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "3Gi"}}
    assert merged_resources(None, {}, None) == {}


def test_a_monitor_job_signals_readiness_through_its_probe_file(templates):
    job = templates.monitor_job("consumer", 42)
    monitor = _containers(job)["monitor"]
    assert monitor["args"] == ["consumer", "42"]
    ready_file = {e["name"]: e.get("value") for e in monitor["env"]}["READY_FILE"]
    assert monitor["readinessProbe"]["exec"]["command"][-1] == ready_file
    relay = _containers(templates.monitor_job("producer", 42, mode="stop-only"))["monitor"]
    assert relay["args"] == ["producer", "42", "--mode", "stop-only"]
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_the_orchestrator_job_runs_the_mounted_order_as_the_orchestrator_account(templates):
    job = templates.orchestrator_job("holiday.photos", "ip-order-holiday-x1y2z", "order.json")
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "orchestrator"
    container = _containers(job)["orchestrator"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["order"]
    assert container["args"] == ["run", f"{mount.rstrip('/')}/order.json"]
    assert {v["name"]: v for v in pod["volumes"]}["order"]["configMap"]["name"] == "ip-order-holiday-x1y2z"
    assert container["image"].endswith(":1.2.3")


def test_images_always_carry_an_explicit_tag(tmp_path):
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path)})
    assert settings.image("blur") == f"image-pipeline-blur:{__version__}"
    with pytest.raises(SettingsError, match="IMAGE_TAG='latest'"):
        Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "IMAGE_TAG": "latest"})
    with pytest.raises(SettingsError, match="K8S_NAMESPACE"):
        Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "K8S_NAMESPACE": "Not_A_Namespace"})


def test_the_package_version_is_the_default_image_tag():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject


def test_jobs_created_from_a_pod_are_owned_by_it(tmp_path):
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path)})
    inside = JobTemplates(settings, "run1", owner_pod=("ip-orchestrator-x-abcde-12345", "0f1e-uid"))
    for job in (inside.task_job(_launch(), 60), inside.monitor_job("consumer", 42)):
        assert job["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Pod", "name": "ip-orchestrator-x-abcde-12345", "uid": "0f1e-uid"}]
    outside = JobTemplates(settings, "run1")
    assert "ownerReferences" not in outside.task_job(_launch(), 60)["metadata"]


# ------------------------------------------------------------------ credentials: only the role's

def _secrets_named(node) -> set[str]:
    """Every Secret a spec refers to anywhere: envFrom, env, volumes (projected ones too)."""
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretRef", "secretKeyRef", "secret") and isinstance(value, dict):
                found.add(value.get("name") or value.get("secretName"))
            found |= _secrets_named(value)
    elif isinstance(node, list):
        for item in node:
            found |= _secrets_named(item)
    return found


def _rendered(templates) -> dict[str, dict]:
    """Each container role of the rendered Jobs -> its container."""
    task = templates.task_job(_launch(), 60)
    return {
        "task": _containers(task)["task"],
        "sampler": _containers(task, init=True)["sampler"],
        "monitor-consumer": _containers(templates.monitor_job("consumer", 42))["monitor"],
        "monitor-producer": _containers(templates.monitor_job("producer", 42, mode="stop-only"))["monitor"],
        "orchestrator": _containers(templates.orchestrator_job("o", "ip-order-o-x1y2z", "order.json"))["orchestrator"],
    }


def test_every_container_gets_the_secrets_of_its_role_and_no_other(templates):
    containers = _rendered(templates)
    secrets = {role: _secrets_named(container) for role, container in containers.items()}
    assert secrets == {
        "task": {"kafka-task"},
        "sampler": {"kafka-sampler"},
        "monitor-consumer": {"pipeline-credentials", "kafka-consumer", "mlflow-scorer"},
        "monitor-producer": {"kafka-sampler"},
        "orchestrator": {"pipeline-credentials", "kafka-orchestrator"},
    }
    assert secrets == {role: set(names) for role, names in CONTAINER_SECRETS.items()}
    # Said the other way round: the database only where it is used, MLflow only for the scorer,
    # and one Kafka user each, its own.
    assert {role for role, names in secrets.items() if DATABASE_SECRET in names} == \
        {"orchestrator", "monitor-consumer"}
    assert {role for role, names in secrets.items() if any(n.startswith("mlflow-") for n in names)} == \
        {"monitor-consumer"}
    for role, names in secrets.items():
        assert len([n for n in names if n.startswith("kafka-")]) == 1, role
        assert "kafka-admin" not in names and "mlflow-admin" not in names and "mlflow-training" not in names
    # The whole Job too, not only the containers: no other Secret in a volume or elsewhere.
    task = templates.task_job(_launch(), 60)
    assert _secrets_named(task) == {"kafka-task", "kafka-sampler"}
    assert _secrets_named(templates.monitor_job("producer", 42, mode="stop-only")) == {"kafka-sampler"}


def test_the_pipeline_s_secrets_of_another_role_in_a_template_are_dropped(tmp_path, templates):
    """An operator's edited (or an old) template cannot hand a task the database's password;
    a Secret of the operator's own stays."""
    folder = tmp_path / "jobs"
    shutil.copytree(TEMPLATES_DIR, folder)
    job = yaml.safe_load((folder / "task.yaml").read_text())
    task = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "task")
    task["envFrom"] += [{"secretRef": {"name": "pipeline-credentials"}}, {"secretRef": {"name": "proxy-credentials"}},
                        {"secretRef": {"name": "mlflow-training"}}]
    task["env"] += [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "pipeline-credentials",
                                                                             "key": "DATABASE_URL"}}}]
    (folder / "task.yaml").write_text(yaml.safe_dump(job))
    edited = JobTemplates(templates.settings, "abc123", directory=folder)
    rendered = _containers(edited.task_job(_launch(), 60))["task"]
    assert _sources(rendered) == ["pipeline-settings", "proxy-credentials", "kafka-task"]
    assert "DATABASE_URL" not in {e["name"] for e in rendered["env"]}
