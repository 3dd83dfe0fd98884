"""The manifests in k8s/ and ``python -m pipeline deploy`` against a real kube-apiserver.

The server is the upstream kube-apiserver built by ``k8s/testenv/build-apiserver.sh``, on a
local etcd: the session's ``kube_api`` (conftest.py). There is no scheduler or kubelet: objects are validated, admitted
and stored, nothing runs.

kubectl is taken from PATH, else built like the apiserver; the kubectl tests never skip
(they are part of what this file proves: that the documented kubectl steps work).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from devkit.servers import free_port
from orchestrator.runtime.job_specs import COMPONENT, TEMPLATES_DIR, JobTemplates
from ops import deploy
from pipeline.cluster_roles import ALL_SECRETS, CONTAINER_SECRETS
from pipeline.invocation import TaskInvocation
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "k8s"
JOB_TEMPLATES = sorted(TEMPLATES_DIR.glob("*.yaml"))
assert [p.name for p in JOB_TEMPLATES] == ["monitor.yaml", "orchestrator.yaml", "task.yaml"], TEMPLATES_DIR
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.37.2")
# What the orchestrator's Role grants: batch/jobs with these verbs, nothing else. (The runtime
# watches its Jobs and never reads one alone, so "get" is not granted; tests/integration/kube/
# checks that the runtime uses exactly these.)
ROLE_VERBS = ["create", "list", "watch", "delete"]
BIN_CACHE = Path(os.environ.get("K8S_BIN_CACHE") or Path.home() / ".cache" / "image-pipeline" / "k8s")


class KubeApi(NamedTuple):
    url: str
    token: str
    kubeconfig: Path


# ------------------------------------------------------------------ the server (local fixture)

def _built(component: str) -> Path:
    """``component`` of Kubernetes K8S_VERSION from the build script's cache, built when
    missing (k8s/testenv/build-apiserver.sh; minutes with cold Go caches)."""
    binary = BIN_CACHE / K8S_VERSION / component
    if not os.access(binary, os.X_OK):
        if not shutil.which("go"):
            pytest.fail(f"no {binary}, and no Go to build it with k8s/testenv/build-apiserver.sh")
        print(f"building {component} {K8S_VERSION} with k8s/testenv/build-apiserver.sh", flush=True)
        subprocess.run([str(K8S / "testenv" / "build-apiserver.sh"), K8S_VERSION], check=True,
                       env={**os.environ, "K8S_COMPONENTS": component})
    return binary


@pytest.fixture(scope="module")
def kube(kube_api, tmp_path_factory) -> KubeApi:
    """(url, admin token, admin kubeconfig) of the session's real kube-apiserver."""
    path = tmp_path_factory.mktemp("manifests") / "admin.kubeconfig"
    return KubeApi(kube_api.url, kube_api.admin_token, kube_api.kubeconfig(kube_api.admin_token, path))


# ------------------------------------------------------------------ helpers

def _env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("KUBECONFIG", "K8S_", "IMAGE_", "KAFKA_", "DATABASE_"))}
    environ["PYTHONPATH"] = str(REPO)
    return environ


def pipeline_deploy(kube: KubeApi, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "deploy", "--kubeconfig",
                           str(kube.kubeconfig), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)


def kubectl_binary() -> str:
    """kubectl from PATH, else the one k8s/testenv/build-apiserver.sh builds (never a skip:
    the documented kubectl steps are part of what this file checks)."""
    found = shutil.which("kubectl")
    if found:
        return found
    if not shutil.which("go") and not os.access(BIN_CACHE / K8S_VERSION / "kubectl", os.X_OK):
        pytest.fail("kubectl is not on PATH: install it (1.27 or later, for kustomize's labels "
                    "field), or Go to build it with K8S_COMPONENTS=kubectl "
                    "k8s/testenv/build-apiserver.sh")
    return str(_built("kubectl"))


def kubectl(kube: KubeApi, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = kubectl_binary()
    result = subprocess.run([binary, "--kubeconfig", str(kube.kubeconfig), *args], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def api(kube: KubeApi, method: str, path: str, body: Any = None,
        query: str = "") -> tuple[int, dict[str, Any]]:
    """One request as the admin; returns (status, JSON body)."""
    context = ssl.create_default_context(cadata=_ca(kube))
    request = urllib.request.Request(
        f"{kube.url}{path}{'?' + query if query else ''}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {kube.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _ca(kube: KubeApi) -> str:
    cluster = yaml.safe_load(kube.kubeconfig.read_text())["clusters"][0]["cluster"]
    if "certificate-authority-data" in cluster:
        return base64.b64decode(cluster["certificate-authority-data"]).decode()
    return Path(cluster["certificate-authority"]).read_text()


def names(kube: KubeApi, path: str) -> list[str]:
    status, body = api(kube, "GET", path)
    assert status == 200, body
    return sorted(item["metadata"]["name"] for item in body["items"])


def new_namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def create_namespace(kube: KubeApi, name: str) -> None:
    status, body = api(kube, "POST", "/api/v1/namespaces",
                       {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    assert status in (201, 409), body


def secret_password(kube: KubeApi, namespace: str) -> str:
    status, secret = api(kube, "GET", f"/api/v1/namespaces/{namespace}/secrets/pipeline-credentials")
    assert status == 200, secret
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["DATABASE_URL"] == deploy.database_url(data["POSTGRES_PASSWORD"])
    return data["POSTGRES_PASSWORD"]


def secret_data(kube: KubeApi, namespace: str) -> dict[str, dict[str, str]]:
    """The data of every Secret of the pipeline's roles in the namespace."""
    found = {}
    for name in ALL_SECRETS:
        status, secret = api(kube, "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        assert status == 200, secret
        found[name] = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    return found


# Where each kind of the manifests is listed (namespaced paths, {ns} filled in).
_COLLECTIONS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "PersistentVolumeClaim": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    "Service": "/api/v1/namespaces/{ns}/services",
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
}


def stored(kube: KubeApi, namespace: str) -> dict[str, list[str]]:
    """Names of the objects of every kind above that the namespace holds."""
    return {kind: found for kind, path in _COLLECTIONS.items()
            if (found := names(kube, path.format(ns=namespace)))}


def manifest_objects() -> list[dict[str, Any]]:
    return deploy.render(K8S)


# ------------------------------------------------------------------ (1) deploy --dry-run

def test_deploy_dry_run_is_accepted_for_every_manifest_and_stores_nothing(kube):
    namespace = new_namespace("dry")
    objects = deploy.render(K8S, namespace)

    # A namespace that does not exist: only the Namespace can be checked, and it says so.
    result = pipeline_deploy(kube, "--dry-run", "--namespace", namespace)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"namespace/{namespace} created (dry run)" in result.stdout
    assert f"configmap/pipeline-settings not checked: namespace {namespace} does not exist yet" \
        in result.stdout
    assert "--create-namespace" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert api(kube, "GET", f"/api/v1/namespaces/{namespace}")[0] == 404

    # --create-namespace: the namespace for real, then every object checked by the server.
    result = pipeline_deploy(kube, "--dry-run", "--create-namespace", "--namespace", namespace)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"namespace/{namespace} created (for real: --create-namespace; the dry run's only change)" in lines
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert f"{deploy.ref(obj)} created (dry run)" in lines, result.stdout
    for name in ALL_SECRETS:
        assert f"secret/{name} created with a random password (dry run)" in lines, result.stdout
    assert "nothing was stored" in lines[-1]
    assert stored(kube, namespace) == {}

    # Again, with the namespace there: the same, and still nothing stored.
    result = pipeline_deploy(kube, "--dry-run", "--namespace", namespace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"namespace/{namespace} unchanged (dry run)" in result.stdout
    assert "configmap/pipeline-settings created (dry run)" in result.stdout
    assert stored(kube, namespace) == {}


def test_a_manifest_the_server_refuses_fails_the_dry_run_with_its_reason(kube, tmp_path):
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    broken = (k8s / "postgres.yaml").read_text().replace("port: 5432", "port: 99999", 1)
    (k8s / "postgres.yaml").write_text(broken)
    namespace = new_namespace("bad")
    create_namespace(kube, namespace)
    lines: list[str] = []
    with pytest.raises(deploy.DeployIncomplete, match="1 object"):
        deploy.deploy(deploy.DeployOptions(namespace=namespace, image_tag="0.6.0", image_registry="",
                                           kubeconfig=str(kube.kubeconfig), dry_run=True),
                      k8s_dir=k8s, out=lines.append)
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith("service/postgres FAILED") and "99999" in failed[0]
    assert stored(kube, namespace) == {}


# ------------------------------------------------------------------ (2) kubectl apply -k

def test_kubectl_apply_k_server_dry_run(kube):
    rendered = kubectl(kube, "kustomize", str(K8S)).stdout
    # The deploy command renders exactly what kustomize renders.
    from_kustomize = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered) if o}
    from_deploy = {(o["kind"], o["metadata"]["name"]): o for o in manifest_objects()}
    assert from_deploy == from_kustomize

    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    create_namespace(kube, namespace)  # a server dry run needs the namespace to exist
    result = kubectl(kube, "apply", "-k", str(K8S), "--dry-run=server")
    printed = result.stdout
    for group in (".apps/", ".rbac.authorization.k8s.io/", ".batch/", ".networking.k8s.io/"):
        printed = printed.replace(group, "/")
    for kind, name in from_kustomize:
        assert f"{kind.lower()}/{name}" in printed, result.stdout
    assert stored(kube, namespace) == {}


# ------------------------------------------------------------------ (3) deploy for real

def test_deploy_creates_everything_and_keeps_the_password(kube):
    namespace = new_namespace("real")
    result = pipeline_deploy(kube, "--namespace", namespace, "--image-tag", "1.2.3",
                             "--image-registry", "registry.example.com/team/")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for obj in deploy.render(K8S, namespace):
        assert f"{deploy.ref(obj)} created" in lines, result.stdout
    for name in ALL_SECRETS:
        assert f"secret/{name} created with a random password" in lines, result.stdout
    assert "python -m orchestrator submit" in result.stdout

    expected: dict[str, list[str]] = {}
    for obj in deploy.render(K8S, namespace):
        if obj["kind"] != "Namespace":
            expected.setdefault(obj["kind"], []).append(obj["metadata"]["name"])
    expected["Secret"] = list(ALL_SECRETS)
    assert stored(kube, namespace) == {kind: sorted(v) for kind, v in expected.items()}

    status, settings = api(kube, "GET", f"/api/v1/namespaces/{namespace}/configmaps/pipeline-settings")
    assert settings["data"] == {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RUNTIME": "kubernetes", "ARTIFACT_DIR": "/artifacts", "K8S_NAMESPACE": namespace,
        "IMAGE_TAG": "1.2.3", "IMAGE_REGISTRY": "registry.example.com/team", "LIVE_SCORING": "on",
        "TOPIC_PREFIX": ""}
    assert settings["metadata"]["labels"]["app.kubernetes.io/part-of"] == "image-pipeline"
    assert any(m["manager"] == "image-pipeline" and m["operation"] == "Apply"
               for m in settings["metadata"]["managedFields"])
    status, binding = api(kube, "GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
                                           "/rolebindings/orchestrator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "orchestrator", "namespace": namespace}]
    password = secret_password(kube, namespace)
    assert len(password) >= 24 and password not in result.stdout + result.stderr
    credentials = secret_data(kube, namespace)
    assert credentials["kafka-task"]["KAFKA_SASL_USERNAME"] == "task"
    assert credentials["mlflow-scorer"]["MLFLOW_TRACKING_USERNAME"] == "scorer"
    for data in credentials.values():
        for key, value in data.items():
            if "PASSWORD" in key or "SECRET" in key:
                assert len(value) >= 24 and value not in result.stdout + result.stderr, key

    # Again: nothing changes, the password stays.
    result = pipeline_deploy(kube, "--namespace", namespace, "--image-tag", "1.2.3",
                             "--image-registry", "registry.example.com/team")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ALL_SECRETS:
        assert f"secret/{name} unchanged (exists; its password is kept)" in result.stdout
    assert "configmap/pipeline-settings unchanged" in result.stdout
    assert "statefulset/kafka unchanged" in result.stdout
    assert "job/kafka-acls unchanged" in result.stdout
    assert "networkpolicy/kafka unchanged" in result.stdout
    assert secret_password(kube, namespace) == password
    assert secret_data(kube, namespace) == credentials

    # A new image tag: the ConfigMap changes, the password still stays.
    result = pipeline_deploy(kube, "--namespace", namespace, "--image-tag", "1.2.4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configmap/pipeline-settings configured" in result.stdout
    assert secret_password(kube, namespace) == password


# ------------------------------------------------------------------ (4) Job templates

@pytest.mark.parametrize("template", JOB_TEMPLATES, ids=lambda p: p.name)
def test_job_template_passes_a_server_dry_run_create(kube, template):
    job = yaml.safe_load(template.read_text())
    namespace = new_namespace("jobs")
    create_namespace(kube, namespace)
    job["metadata"]["name"] = f"placeholder-{template.stem}"
    status, body = api(kube, "POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job,
                       query="dryRun=All")
    assert status == 201, body.get("message", body)
    pod = body["spec"]["template"]["spec"]
    assert body["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert stored(kube, namespace) == {}


@pytest.mark.parametrize("template", JOB_TEMPLATES, ids=lambda p: p.name)
def test_job_template_contract(template):
    """What the runtime (orchestrator/runtime/) relies on."""
    job = yaml.safe_load(template.read_text())
    spec = job["spec"]
    pod = spec["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    # The Secrets each container's role gets (the runtime enforces it on the rendered Jobs;
    # the monitor's depend on its kind, so its template names none).
    roles = {"task": "task", "sampler": "sampler", "orchestrator": "orchestrator", "monitor": None}
    for container in containers:
        image = container["image"]
        assert ":" in image and not image.endswith(":latest"), image
        assert container["envFrom"][0] == {"configMapRef": {"name": "pipeline-settings"}}
        role = roles[container["name"]]
        assert container["envFrom"][1:] == [{"secretRef": {"name": name}}
                                            for name in (CONTAINER_SECRETS[role] if role else ())]
        assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} \
            in container["env"]
        assert {"name": "artifacts", "mountPath": "/artifacts"} in container["volumeMounts"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "pipeline-artifacts"}} \
        in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert job["metadata"]["labels"]["app.kubernetes.io/part-of"] == "image-pipeline"
    deadlines = {"task": 3600, "monitor": 7200, "orchestrator": 86400}
    assert spec["activeDeadlineSeconds"] == deadlines[template.stem]
    by_name = {c["name"]: c for c in containers}
    if template.stem == "task":
        assert pod["shareProcessNamespace"] is True and pod["automountServiceAccountToken"] is False
        sampler = pod["initContainers"][0]
        assert sampler["name"] == "sampler" and sampler["restartPolicy"] == "Always"
        assert sampler["command"] == ["python", "-m", "monitor", "producer"]
        assert by_name["task"]["command"] == ["python", "-m"]
        assert by_name["task"]["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                                "limits": {"cpu": "1", "memory": "1Gi"}}
    elif template.stem == "monitor":
        assert pod["automountServiceAccountToken"] is False
        assert by_name["monitor"]["command"] == ["python", "-m", "monitor"]
        assert by_name["monitor"]["readinessProbe"]["exec"]["command"] == ["test", "-f", "/tmp/ready"]
    else:
        assert pod["serviceAccountName"] == "orchestrator"
        assert by_name["orchestrator"]["command"] == ["python", "-m", "orchestrator"]
        assert {"name": "order", "mountPath": "/etc/order", "readOnly": True} \
            in by_name["orchestrator"]["volumeMounts"]
        assert any(v["name"] == "order" and "configMap" in v for v in pod["volumes"])


def _secret_refs(container: dict[str, Any]) -> list[str]:
    return [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]


def test_rendered_jobs_pass_a_server_dry_run_with_their_roles_secrets_only(kube, tmp_path):
    """The Jobs as the orchestrator creates them: accepted, and each container, as the server
    stores it, holds the Secrets of its role and nothing else of the pipeline's."""
    namespace = new_namespace("roles")
    create_namespace(kube, namespace)
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "K8S_NAMESPACE": namespace})
    templates = JobTemplates(settings, run_id="roles1")
    launch = TaskInvocation(order_id=7, required_tasks=("blur",), task_name="blur", progress=(),
                            image=Path("/artifacts/inputs/x.jpg"), params={}, attempt=1)
    jobs = [templates.task_job(launch, 60), templates.monitor_job("consumer", 7),
            templates.monitor_job("producer", 7, mode="stop-only"),
            templates.orchestrator_job("o", "ip-order-o-x1y2z", "order.json")]
    seen = {}
    for job in jobs:
        status, body = api(kube, "POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job, query="dryRun=All")
        assert status == 201, body.get("message", body)
        pod = body["spec"]["template"]["spec"]
        component = body["spec"]["template"]["metadata"]["labels"][COMPONENT]
        for container in pod["containers"] + pod.get("initContainers", []):
            role = "sampler" if container["name"] == "sampler" else component
            seen[role] = _secret_refs(container)
            assert not any("secretKeyRef" in (e.get("valueFrom") or {}) for e in container.get("env", []))
        assert not any("secret" in v or "projected" in v for v in pod.get("volumes", []))
    assert seen == {role: list(names) for role, names in CONTAINER_SECRETS.items()}
    assert "pipeline-credentials" not in seen["task"] + seen["sampler"] + seen["monitor-producer"]
    assert not [n for n in seen["task"] + seen["sampler"] + seen["orchestrator"] if n.startswith("mlflow-")]
    assert stored(kube, namespace) == {}


def test_network_policies_are_accepted_with_their_selectors(kube):
    namespace = new_namespace("netpol")
    create_namespace(kube, namespace)
    policies = [o for o in deploy.render(K8S, namespace) if o["kind"] == "NetworkPolicy"]
    assert {p["metadata"]["name"] for p in policies} == {"services-default-deny", "kafka", "postgres", "mlflow"}
    path = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"
    for policy in policies:
        status, body = api(kube, "POST", path, policy, query="dryRun=All")
        assert status == 201, body.get("message", body)
        # As the server keeps it: nothing dropped or widened by defaulting.
        assert body["spec"]["podSelector"] == policy["spec"]["podSelector"]
        assert body["spec"]["policyTypes"] == ["Ingress"]
        assert body["spec"].get("ingress", []) == policy["spec"]["ingress"]
        assert "egress" not in body["spec"]  # egress is not restricted
        for rule in body["spec"].get("ingress", []):
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "pods of this namespace only"
    # The server does check them: a selector with an unknown operator is refused.
    broken = yaml.safe_load(yaml.safe_dump(policies[1]))
    broken["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["operator"] = "in"
    status, body = api(kube, "POST", path, broken, query="dryRun=All")
    assert status == 422, body
    assert stored(kube, namespace) == {}


def test_no_manifest_uses_a_latest_or_untagged_image():
    for path in sorted(K8S.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            for image in _images(document):
                name, _, tag = image.rpartition(":")
                assert name and "/" not in tag and tag != "latest", f"{path}: {image}"


def _images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images(item)


# ------------------------------------------------------------------ (5) the manual RBAC steps

def test_manual_rbac_steps_work_on_a_fresh_namespace(kube):
    namespace = new_namespace("manual")
    create_namespace(kube, namespace)
    kubectl(kube, "create", "serviceaccount", "orchestrator", "-n", namespace)
    kubectl(kube, "apply", "-f", str(K8S / "rbac" / "role.yaml"), "-n", namespace)
    assert names(kube, f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles") == ["orchestrator"]

    account = f"system:serviceaccount:{namespace}:orchestrator"

    def can(verb: str, resource: str, group: str = "", ns: str = namespace) -> bool:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": account,
                           "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                           "resourceAttributes": {"namespace": ns, "verb": verb, "group": group,
                                                  "resource": resource}}}
        status, body = api(kube, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        assert status == 201, body
        return body["status"]["allowed"]

    for verb in ("create", "get", "list", "watch", "delete", "update", "patch", "deletecollection"):
        assert can(verb, "jobs", "batch") == (verb in ROLE_VERBS), verb
    assert not can("create", "pods")
    assert not can("get", "secrets")
    assert not can("create", "configmaps")
    assert not can("create", "jobs", "batch", ns="default")  # its own namespace only

    # kubectl's own check, as the docs show it.
    result = kubectl(kube, "auth", "can-i", "create", "jobs.batch", "-n", namespace, "--as", account)
    assert result.stdout.strip() == "yes"


# ------------------------------------------------------------------ (6) the Role and its binding

def test_role_grants_exactly_job_management_and_is_bound_to_the_service_account():
    documents = [d for d in yaml.safe_load_all((K8S / "rbac" / "role.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"Role", "RoleBinding"}
    role, binding = by_kind["Role"], by_kind["RoleBinding"]
    assert role["metadata"]["name"] == "orchestrator"
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ROLE_VERBS}]
    assert binding["metadata"]["name"] == "orchestrator"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "orchestrator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "orchestrator"}]
    # No object in the files pins a namespace: `-n NS` and the kustomization decide.
    for path in sorted(K8S.glob("**/*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") not in (None, "Kustomization"):
                assert "namespace" not in document["metadata"], path
    account = yaml.safe_load((K8S / "rbac" / "serviceaccount.yaml").read_text())
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "orchestrator")
    # ... and the orchestrator Job runs as that account.
    job = yaml.safe_load((TEMPLATES_DIR / "orchestrator.yaml").read_text())
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "orchestrator"


def test_kustomization_lists_every_manifest_and_no_secret():
    kustomization = deploy.read_kustomization(K8S)
    assert kustomization.namespace == "image-pipeline"
    assert kustomization.labels == {"app.kubernetes.io/part-of": "image-pipeline"}
    listed = {path.relative_to(K8S).as_posix() for path in kustomization.resources}
    on_disk = {p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")
               if p.name != "kustomization.yaml"}
    assert listed == on_disk == {"namespace.yaml", "rbac/serviceaccount.yaml", "rbac/role.yaml",
                                 "settings.yaml", "artifacts-pvc.yaml", "kafka.yaml",
                                 "postgres.yaml", "mlflow.yaml", "monitor-consumer.yaml",
                                 "network-policies.yaml"}
    kinds = {(o["kind"], o["metadata"]["name"]) for o in manifest_objects()}
    assert not any(kind == "Secret" for kind, _ in kinds)
    assert {("StatefulSet", "kafka"), ("Service", "kafka"), ("Service", "kafka-headless"),
            ("StatefulSet", "postgres"), ("Service", "postgres"), ("Deployment", "mlflow"),
            ("Deployment", "monitor-consumer"), ("Service", "mlflow"), ("PersistentVolumeClaim", "mlflow-data"),
            ("PersistentVolumeClaim", "pipeline-artifacts"), ("ConfigMap", "pipeline-settings"),
            ("ServiceAccount", "orchestrator"), ("Role", "orchestrator"),
            ("RoleBinding", "orchestrator"), ("Namespace", "image-pipeline"),
            ("ConfigMap", "kafka-config"), ("Job", "kafka-acls"), ("ConfigMap", "mlflow-auth"),
            ("Job", "mlflow-users"), ("NetworkPolicy", "services-default-deny"),
            ("NetworkPolicy", "kafka"), ("NetworkPolicy", "postgres"), ("NetworkPolicy", "mlflow")} == kinds


# ------------------------------------------------------------------ errors: one line, status 2

def test_unreachable_cluster_and_forbidden_are_one_line_with_status_2(kube, tmp_path):
    config = yaml.safe_load(kube.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    unreachable = tmp_path / "unreachable"
    unreachable.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "pipeline", "deploy", "--kubeconfig", str(unreachable)],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: cannot reach the Kubernetes API at https://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1

    # A service account with no rights at all: 403 on the first object.
    namespace = new_namespace("nobody")
    create_namespace(kube, namespace)
    status, body = api(kube, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                       {"metadata": {"name": "nobody"}})
    assert status == 201, body
    status, body = api(kube, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/nobody/token",
                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}})
    assert status == 201, body
    config = yaml.safe_load(kube.kubeconfig.read_text())
    config["users"][0]["user"]["token"] = body["status"]["token"]
    nobody = tmp_path / "nobody"
    nobody.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "pipeline", "deploy", "--kubeconfig", str(nobody),
                             "--namespace", namespace], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: namespace/{namespace}: 403 forbidden: ")
    assert "system:serviceaccount:" + namespace + ":nobody" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    missing = subprocess.run([sys.executable, "-m", "pipeline", "deploy", "--kubeconfig",
                              str(tmp_path / "none")], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip() == \
        f"error: kubeconfig {tmp_path / 'none'} does not exist"
