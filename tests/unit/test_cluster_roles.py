"""Least privilege in the cluster, read from the manifests in k8s/ and the rendered Jobs: every
workload holds the Secrets of its role and no other, the Secrets ``deploy`` makes are the ones
the workloads ask for, and the NetworkPolicies let in exactly the pods that hold a service's
credentials. (tests/integration/kube/ sends the same objects to a real API server, runs the
Kafka scripts against a real broker and the MLflow script against a real server.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.runtime.job_specs import COMPONENT, JobTemplates
from ops import deploy
from pipeline.cluster_roles import (
    ALL_SECRETS, CONTAINER_SECRETS, DATABASE_SECRET, KAFKA_USERS, MLFLOW_USERS, kafka_secret, mlflow_secret,
)
from pipeline.invocation import TaskInvocation
from pipeline.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "k8s"
URL_SAFE = re.compile(r"[A-Za-z0-9_-]{24,}")


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in deploy.render(K8S)}


def _secrets_named(node: Any) -> set[str]:
    """Every Secret a spec refers to: envFrom, env, volumes (projected ones too)."""
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


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]


@pytest.fixture(scope="module")
def rendered_jobs(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The Jobs the orchestrator creates, by their component label."""
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path_factory.mktemp("state"))})
    templates = JobTemplates(settings, run_id="r1")
    launch = TaskInvocation(order_id=7, required_tasks=("blur",), task_name="blur", progress=(),
                            image=Path("/artifacts/inputs/x.jpg"), params={}, attempt=1)
    jobs = [templates.task_job(launch, 60), templates.monitor_job("consumer", 7),
            templates.monitor_job("producer", 7, mode="stop-only"),
            templates.orchestrator_job("o", "ip-order-o-x1y2z", "order.json")]
    return {job["metadata"]["labels"][COMPONENT]: job for job in jobs}


@pytest.fixture(scope="module")
def workloads(rendered_jobs) -> dict[str, dict[str, Any]]:
    """Every pod template of the pipeline: the deployed workloads and the rendered Jobs."""
    deployed = {f"{kind}/{name}": obj for (kind, name), obj in _objects().items()
                if kind in ("Deployment", "StatefulSet", "Job")}
    return {**deployed, **{f"Job/{component}": job for component, job in rendered_jobs.items()}}


# ------------------------------------------------------------------ who holds which Secret

def test_every_workload_holds_the_secrets_of_its_role_and_no_other(workloads):
    held = {name: _secrets_named(_pod(workload)) for name, workload in workloads.items()}
    assert held == {
        # the services
        "StatefulSet/kafka": {kafka_secret(user) for user in KAFKA_USERS},  # its users, at format time
        "Job/kafka-acls": {"kafka-admin"},
        "StatefulSet/postgres": {DATABASE_SECRET},
        "Deployment/mlflow": {"mlflow-admin"},
        "Job/mlflow-users": {"mlflow-admin", "mlflow-training", "mlflow-scorer"},
        # the pipeline
        "Deployment/monitor-consumer": {DATABASE_SECRET, "kafka-consumer", "mlflow-scorer"},
        "Job/monitor-consumer": {DATABASE_SECRET, "kafka-consumer", "mlflow-scorer"},
        "Job/monitor-producer": {"kafka-sampler"},
        "Job/task": {"kafka-task", "kafka-sampler"},  # the task's and its sampler's (next test)
        "Job/orchestrator": {DATABASE_SECRET, "kafka-orchestrator"},
    }
    # The broker itself needs only the admin's; the other users' only its format step.
    kafka = _pod(workloads["StatefulSet/kafka"])["spec"]
    assert _container_secrets(kafka, "kafka") == {"kafka-admin"}
    assert _container_secrets(kafka, "format") == {kafka_secret(user) for user in KAFKA_USERS}


def _container_secrets(pod: dict[str, Any], name: str) -> set[str]:
    """The Secrets one container of a pod sees: its env and the volumes it mounts."""
    container = next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)
    mounted = {m["name"] for m in container.get("volumeMounts", [])}
    volumes = [v for v in pod.get("volumes", []) if v["name"] in mounted]
    return _secrets_named(container) | _secrets_named(volumes)


def test_task_and_sampler_have_no_database_no_mlflow_and_only_their_kafka_user(rendered_jobs):
    pod = _pod(rendered_jobs["task"])["spec"]
    task = next(c for c in pod["containers"] if c["name"] == "task")
    sampler = next(c for c in pod["initContainers"] if c["name"] == "sampler")
    assert _secrets_named(task) == {"kafka-task"}
    assert _secrets_named(sampler) == {"kafka-sampler"}
    for container in (task, sampler):
        assert DATABASE_SECRET not in _secrets_named(container)
        assert not any(name.startswith("mlflow-") for name in _secrets_named(container))
        assert container["envFrom"][0] == {"configMapRef": {"name": "pipeline-settings"}}


def test_the_monitor_consumer_deployment_and_its_job_hold_the_same_secrets(workloads):
    deployment = _pod(workloads["Deployment/monitor-consumer"])["spec"]["containers"][0]
    job = _pod(workloads["Job/monitor-consumer"])["spec"]["containers"][0]
    assert [s for s in deployment["envFrom"] if "secretRef" in s] == \
        [{"secretRef": {"name": name}} for name in CONTAINER_SECRETS["monitor-consumer"]]
    assert _secrets_named(deployment) == _secrets_named(job)


def test_training_and_the_admins_are_held_by_no_pipeline_pod(workloads):
    pipeline_pods = {name: w for name, w in workloads.items()
                     if _pod(w)["metadata"]["labels"].get(COMPONENT) in CONTAINER_SECRETS}
    assert len(pipeline_pods) == 5
    for name, workload in pipeline_pods.items():
        held = _secrets_named(_pod(workload))
        assert not held & {"kafka-admin", "mlflow-admin", "mlflow-training"}, name


# ------------------------------------------------------------------ the Secrets deploy makes

def test_deploy_makes_every_secret_the_workloads_ask_for(workloads):
    made = {s["metadata"]["name"]: s for s in deploy.role_secrets("ns", {"a": "b"})}
    assert tuple(made) == ALL_SECRETS
    asked = set().union(*(_secrets_named(_pod(w)) for w in workloads.values()))
    assert asked == set(made)
    passwords = []
    for user in KAFKA_USERS:
        data = made[kafka_secret(user)]["stringData"]
        assert set(data) == {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"}
        assert data["KAFKA_SASL_USERNAME"] == user  # acls.txt and super.users name these
        passwords.append(data["KAFKA_SASL_PASSWORD"])
    for user in MLFLOW_USERS:
        data = made[mlflow_secret(user)]["stringData"]
        extra = {"MLFLOW_FLASK_SERVER_SECRET_KEY"} if user == "admin" else set()
        assert set(data) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} | extra
        assert data["MLFLOW_TRACKING_USERNAME"] == user
        passwords.append(data["MLFLOW_TRACKING_PASSWORD"])
    database = made[DATABASE_SECRET]["stringData"]
    assert database["DATABASE_URL"] == deploy.database_url(database["POSTGRES_PASSWORD"])
    passwords.append(database["POSTGRES_PASSWORD"])
    # Fit for SCRAM's and JAAS's syntax and MLflow's 12 characters; never shared between users.
    assert all(URL_SAFE.fullmatch(p) for p in passwords) and len(set(passwords)) == len(passwords)
    assert all(s["metadata"]["namespace"] == "ns" and s["metadata"]["labels"] == {"a": "b"} for s in made.values())


def test_every_secret_key_a_workload_reads_is_one_deploy_makes(workloads):
    made = {s["metadata"]["name"]: set(s["stringData"]) for s in deploy.role_secrets("ns", {})}

    def keys(node: Any) -> set[tuple[str, str]]:
        found = set()
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                found.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            volume = node.get("secret")  # a secret volume, or a projected volume's source
            if isinstance(volume, dict) and "items" in volume:
                name = volume.get("name") or volume.get("secretName")
                found |= {(name, item["key"]) for item in volume["items"]}
            for value in node.values():
                found |= keys(value)
        elif isinstance(node, list):
            for item in node:
                found |= keys(item)
        return found

    for name, workload in workloads.items():
        for secret, key in keys(_pod(workload)):
            assert key in made[secret], f"{name} reads {secret}/{key}"


# ------------------------------------------------------------------ Kafka and MLflow settings

def test_the_settings_make_every_kafka_client_a_scram_user():
    data = _objects()[("ConfigMap", "pipeline-settings")]["data"]
    assert data["KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
    assert data["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    secret = next(s for s in deploy.role_secrets("ns", {}) if s["metadata"]["name"] == "kafka-task")
    settings = Settings.from_env({**data, **secret["stringData"], "PIPELINE_STATE_DIR": "/tmp/x"})
    assert settings.kafka_options == {
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "task", "sasl.password": secret["stringData"]["KAFKA_SASL_PASSWORD"]}


def test_the_broker_admits_scram_users_only_and_denies_what_no_acl_allows():
    config = _objects()[("ConfigMap", "kafka-config")]["data"]
    properties = dict(line.split("=", 1) for line in config["server.properties"].splitlines()
                      if line and not line.startswith("#"))
    protocols = dict(pair.split(":") for pair in properties["listener.security.protocol.map"].split(","))
    assert protocols == {"CLIENT": "SASL_PLAINTEXT", "CONTROLLER": "SASL_PLAINTEXT"}  # no PLAINTEXT at all
    assert properties["listeners"] == "CLIENT://:9092,CONTROLLER://:9093"
    assert properties["listener.name.client.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert properties["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert "super.users=User:%s" in config["broker.sh"] and "super.users" not in properties
    # Every role but the admin has ACLs, and nobody else does.
    acl_users = {line.split()[0] for line in config["acls.txt"].splitlines()
                 if line.strip() and not line.lstrip().startswith("#")}
    assert acl_users == set(KAFKA_USERS) - {"admin"}


def test_mlflow_runs_its_basic_auth_app_with_read_as_the_default():
    objects = _objects()
    server = _pod(objects[("Deployment", "mlflow")])["spec"]["containers"][0]
    assert "--app-name=basic-auth" in server["command"]
    assert server["image"].endswith("-full")  # the variant with mlflow[auth]
    ini = objects[("ConfigMap", "mlflow-auth")]["data"]["basic_auth.ini"]
    assert "default_permission = READ" in ini.splitlines()
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"


# ------------------------------------------------------------------ NetworkPolicies

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions In/NotIn/Exists) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
    return True


def _admitted(policies, target: dict[str, str], source: dict[str, str], port: int) -> bool:
    """Whether ``source``'s pod may open ``port`` of ``target``'s pod (same namespace)."""
    applying = [p for p in policies if _selects(p["spec"]["podSelector"], target)
                and "Ingress" in p["spec"]["policyTypes"]]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress") or []:
            ports = {p["port"] for p in rule.get("ports") or []}
            if ports and port not in ports:
                continue
            if any(_selects(peer["podSelector"], source) for peer in rule.get("from") or []
                   if set(peer) == {"podSelector"}):
                return True
    return False


def test_only_the_pods_holding_a_service_s_credentials_reach_it(workloads):
    policies = [o for (kind, _), o in _objects().items() if kind == "NetworkPolicy"]
    labels = {name: _pod(w)["metadata"]["labels"] for name, w in workloads.items()}
    held = {name: _secrets_named(_pod(w)) for name, w in workloads.items()}
    services = {"kafka": ("StatefulSet/kafka", 9092, lambda s: any(n.startswith("kafka-") for n in s)),
                "postgres": ("StatefulSet/postgres", 5432, lambda s: DATABASE_SECRET in s),
                "mlflow": ("Deployment/mlflow", 5000, lambda s: any(n.startswith("mlflow-") for n in s))}
    for service, (workload, port, uses) in services.items():
        target = labels[workload]
        admitted = {name for name in workloads if name != workload
                    and _admitted(policies, target, labels[name], port)}
        expected = {name for name in workloads if name != workload and uses(held[name])}
        assert admitted == expected, service
    # A pod of the pipeline's roles in no role, and any other pod, get nowhere.
    for workload, port, _ in services.values():
        for stranger in ({"app": "x"}, {"app.kubernetes.io/part-of": "image-pipeline"},
                         {"app.kubernetes.io/component": "orchestrator"}):  # not part of the pipeline
            assert not _admitted(policies, labels[workload], stranger, port)
    # Training (outside the cluster, or a pod labelled so) reaches MLflow and nothing else.
    training = {"app.kubernetes.io/part-of": "image-pipeline", "app.kubernetes.io/component": "training"}
    assert _admitted(policies, labels["Deployment/mlflow"], training, 5000)
    assert not _admitted(policies, labels["StatefulSet/postgres"], training, 5432)
    # The controller listener: the broker itself only.
    kafka = labels["StatefulSet/kafka"]
    assert _admitted(policies, kafka, kafka, 9093)
    assert not _admitted(policies, kafka, labels["Job/orchestrator"], 9093)


def test_the_default_deny_policy_covers_the_three_services_and_lets_nothing_in():
    deny = _objects()[("NetworkPolicy", "services-default-deny")]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and deny["spec"]["ingress"] == []
    for name in ("kafka", "postgres", "mlflow"):
        assert _selects(deny["spec"]["podSelector"], {"app.kubernetes.io/name": name})
    assert not _selects(deny["spec"]["podSelector"], {"app.kubernetes.io/component": "task"})
