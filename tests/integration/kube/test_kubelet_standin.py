"""The kubelet stand-in against the real kube-apiserver: Jobs run as local processes.

No mocks: Jobs, ConfigMaps, Secrets, RBAC and tokens are real API objects; the status the
stand-in writes must pass the apiserver's Job status validation.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import kubernetes.client as k8s
import psutil
import pytest

from devkit.kube.apiserver import ApiServer
from devkit.kube.kubelet import KubeletStandIn

T = TypeVar("T")


def eventually(probe: Callable[[], T], timeout: float = 60, what: str = "condition") -> T:
    """``probe()``'s first truthy value, polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {timeout}s")


def python(code: str, **container: object) -> dict:
    return {"name": "main", "image": "local", "command": ["python", "-c", code], **container}


def job(name: str, *containers: dict, backoff_limit: int = 0, **pod_spec: object) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff_limit, "template": {
                "metadata": {"labels": {"app": "standin-test"}},
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                         "containers": list(containers), **pod_spec}}}}


@pytest.fixture
def api(kube_api: ApiServer):
    with kube_api.api_client() as client:
        yield k8s.CoreV1Api(client), k8s.BatchV1Api(client), k8s.RbacAuthorizationV1Api(client)


def run_job(api, namespace: str, manifest: dict, until: str = "finished", timeout: float = 60) -> dict:
    """Create the Job and return its status (a dict) once it is finished (or ``until``)."""
    batch = api[1]
    name = manifest["metadata"]["name"]
    batch.create_namespaced_job(namespace, manifest)

    def status() -> dict | None:
        raw = batch.read_namespaced_job_status(name, namespace)
        state = batch.api_client.sanitize_for_serialization(raw).get("status", {})
        conditions = {c["type"]: c for c in state.get("conditions", []) if c["status"] == "True"}
        done = "Complete" in conditions or "Failed" in conditions
        return state if (done if until == "finished" else state.get(until)) else None

    return eventually(status, timeout, f"Job {name} {until}")


def conditions(status: dict) -> dict[str, str]:
    return {c["type"]: c["reason"] for c in status.get("conditions", []) if c["status"] == "True"}


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid)


def test_job_that_exits_0_completes(api, kube_namespace: str, kubelet: KubeletStandIn) -> None:
    status = run_job(api, kube_namespace, job("ok", python("print('hello from the pod')")))

    assert conditions(status) == {"SuccessCriteriaMet": "CompletionsReached", "Complete": "CompletionsReached"}
    assert status["succeeded"] == 1 and not status.get("active") and not status.get("failed")
    assert status["startTime"] <= status["completionTime"]
    [pod] = kubelet.pods("ok")
    assert re.fullmatch(r"ok-[a-z0-9]{5}", pod.name) and pod.phase == "Succeeded"
    assert "hello from the pod" in kubelet.logs("ok")["main"].read_text()
    assert kubelet.logs("ok")["main"] == kubelet.log_dir / kube_namespace / pod.name / "main.log"


def test_failing_job_is_retried_until_the_backoff_limit(api, kube_namespace: str,
                                                        kubelet: KubeletStandIn) -> None:
    status = run_job(api, kube_namespace, job("fails", python("raise SystemExit(3)"), backoff_limit=1))

    assert conditions(status) == {"FailureTarget": "BackoffLimitExceeded", "Failed": "BackoffLimitExceeded"}
    assert status["failed"] == 2 and not status.get("active") and "completionTime" not in status
    pods = kubelet.pods("fails")
    assert len(pods) == 2 and pods[0].name != pods[1].name
    assert [p.exit_codes() for p in pods] == [{"main": 3}, {"main": 3}]


def test_environment_volumes_and_mount_path_rewriting(api, kube_namespace: str,
                                                      kubelet: KubeletStandIn) -> None:
    core = api[0]
    core.create_namespaced_config_map(kube_namespace, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="settings"),
        data={"GREETING": "hello", "LEVEL": "debug", "app.ini": "[app]\nx = 1\n"}))
    core.create_namespaced_secret(kube_namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="creds"), string_data={"PASSWORD": "s3cret"}))
    code = ("import json, os, sys; json.dump({'env': dict(os.environ), 'argv': sys.argv[1:],"
            " 'ini': open(sys.argv[1]).read()}, open(sys.argv[2], 'w'))")
    container = python(code, args=["/etc/app/settings.ini", "/data/out/env.json"], envFrom=[
        {"configMapRef": {"name": "settings"}, "prefix": "CM_"},
        {"secretRef": {"name": "creds"}},
        {"configMapRef": {"name": "absent", "optional": True}},
    ], env=[
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LEVEL"}}},
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "PASSWORD"}}},
        {"name": "MSG", "value": "$(CM_GREETING) from $(POD), $$(POD) $(UNDEFINED)"},
        {"name": "OUT_DIR", "value": "/data/out"},
    ], volumeMounts=[{"name": "data", "mountPath": "/data"},
                     {"name": "config", "mountPath": "/etc/app"}])
    (kubelet.pvc_dir("shared") / "out").mkdir(parents=True)
    manifest = job("env", container, automountServiceAccountToken=False, volumes=[
        {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}},
        {"name": "config", "configMap": {"name": "settings", "items": [{"key": "app.ini", "path": "settings.ini"}]}},
    ])
    assert "Complete" in conditions(run_job(api, kube_namespace, manifest))

    seen = json.loads((kubelet.pvc_dir("shared") / "out" / "env.json").read_text())
    env, [pod] = seen["env"], kubelet.pods("env")
    assert {k: env.get(k) for k in ("CM_GREETING", "CM_LEVEL", "PASSWORD", "POD", "HOSTNAME", "NS", "SA",
                                    "APP", "LEVEL", "PW", "MSG")} == {
        "CM_GREETING": "hello", "CM_LEVEL": "debug", "PASSWORD": "s3cret", "POD": pod.name,
        "HOSTNAME": pod.name, "NS": kube_namespace, "SA": "default", "APP": "standin-test",
        "LEVEL": "debug", "PW": "s3cret", "MSG": f"hello from {pod.name}, $(POD) $(UNDEFINED)"}
    assert env["OUT_DIR"] == str(kubelet.pvc_dir("shared") / "out")
    assert seen["ini"] == "[app]\nx = 1\n" and seen["argv"][0].startswith(str(kubelet.root))
    assert "KUBECONFIG" not in env and "PYTEST_CURRENT_TEST" not in env  # nothing leaks in


def test_missing_config_map_fails_the_pod(api, kube_namespace: str, kubelet: KubeletStandIn) -> None:
    container = python("pass", env=[{"name": "X", "valueFrom": {
        "configMapKeyRef": {"name": "nowhere", "key": "X"}}}])
    status = run_job(api, kube_namespace, job("nocm", container))

    assert conditions(status)["Failed"] == "BackoffLimitExceeded" and status["failed"] == 1
    [pod] = kubelet.pods("nocm")
    assert "ConfigMap 'nowhere'" in pod.error and not pod.pids


def test_deleting_a_running_job_kills_its_process(api, kube_namespace: str,
                                                  kubelet: KubeletStandIn) -> None:
    run_job(api, kube_namespace, job("forever", python("import time; time.sleep(120)")), until="active")
    pid = eventually(lambda: kubelet.pods("forever") and kubelet.pods("forever")[0].pids.get("main"))
    assert psutil.pid_exists(pid)

    api[1].delete_namespaced_job("forever", kube_namespace, propagation_policy="Background")

    eventually(lambda: gone(pid), 30, f"end of pid {pid}")


def test_native_sidecar_is_stopped_after_the_main_container(api, kube_namespace: str,
                                                            kubelet: KubeletStandIn) -> None:
    # Paths reach the processes as args, where the mount path prefix is rewritten.
    init = python("import sys; open(sys.argv[1], 'w').close()", name="init", args=["/work/init-done"],
                  volumeMounts=[{"name": "work", "mountPath": "/work"}])
    # The sidecar says when it handles SIGTERM; the main container ends only after that.
    sidecar = python(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('sidecar got SIGTERM'), sys.exit(0)))\n"
        "print('sidecar up'); open(sys.argv[1], 'w').close(); time.sleep(60)", name="sidecar",
        restartPolicy="Always", args=["/work/sidecar-up"], volumeMounts=[{"name": "work", "mountPath": "/work"}])
    main = python("import os, sys, time\n"
                  "while not os.path.exists(sys.argv[2]): time.sleep(0.05)\n"
                  "raise SystemExit(0 if os.path.exists(sys.argv[1]) else 1)",
                  args=["/work/init-done", "/work/sidecar-up"], volumeMounts=[{"name": "work", "mountPath": "/work"}])
    manifest = job("sidecar", main, initContainers=[init, sidecar], volumes=[{"name": "work", "emptyDir": {}}])

    status = run_job(api, kube_namespace, manifest)

    assert "Complete" in conditions(status)
    [pod] = kubelet.pods("sidecar")
    assert pod.exit_codes() == {"init": 0, "sidecar": 0, "main": 0}
    assert "sidecar got SIGTERM" in pod.logs["sidecar"].read_text()


def test_readiness_follows_the_ready_line(api, kube_namespace: str, kubelet: KubeletStandIn) -> None:
    signals = kubelet.pvc_dir("signals")
    signals.mkdir(parents=True)
    code = ("import os, sys, time\n"
            "def wait(f):\n    while not os.path.exists(f): time.sleep(0.05)\n"
            "print('not ready yet', flush=True); wait(sys.argv[1]); print('READY'); wait(sys.argv[2])")
    container = python(code, args=["/s/ready-now", "/s/exit-now"], readinessProbe={"tcpSocket": {"port": 8080}},
                       volumeMounts=[{"name": "s", "mountPath": "/s"}])
    manifest = job("ready", container, volumes=[{"name": "s", "persistentVolumeClaim": {"claimName": "signals"}}])
    run_job(api, kube_namespace, manifest, until="active")
    [pod] = eventually(lambda: kubelet.pods("ready") and kubelet.pods("ready")[0].pids and kubelet.pods("ready"))
    # Not ready once the stand-in has read the container's first line, which is not READY.
    eventually(lambda: pod.containers["main"]._seen > 0, 30, "the stand-in reading the container's output")
    assert api[1].read_namespaced_job_status("ready", kube_namespace).status.ready == 0

    (signals / "ready-now").touch()
    eventually(lambda: api[1].read_namespaced_job_status("ready", kube_namespace).status.ready == 1, 30, "ready=1")
    (signals / "exit-now").touch()
    status = eventually(lambda: api[1].read_namespaced_job_status("ready", kube_namespace).status.succeeded,
                        30, "succeeded")
    assert status == 1 and not api[1].read_namespaced_job_status("ready", kube_namespace).status.ready


def test_active_deadline_kills_the_pod(api, kube_namespace: str, kubelet: KubeletStandIn) -> None:
    manifest = job("slow", python("import time; print('started', flush=True); time.sleep(120)"),
                   backoff_limit=3)
    manifest["spec"]["activeDeadlineSeconds"] = 2

    status = run_job(api, kube_namespace, manifest)

    # The deadline, not the 120 s sleep, ended it: one failed pod, no retry despite backoffLimit.
    assert conditions(status) == {"FailureTarget": "DeadlineExceeded", "Failed": "DeadlineExceeded"}
    assert status["failed"] == 1
    [pod] = kubelet.pods("slow")
    assert gone(pod.pids["main"]) and pod.phase == "Failed"


def test_service_account_kubeconfig_carries_the_accounts_rights(api, kube_api: ApiServer, kube_namespace: str,
                                                                 kubelet: KubeletStandIn) -> None:
    core, _, rbac = api
    core.create_namespaced_service_account(kube_namespace, k8s.V1ServiceAccount(
        metadata=k8s.V1ObjectMeta(name="orchestrator")))
    rbac.create_namespaced_role(kube_namespace, k8s.V1Role(
        metadata=k8s.V1ObjectMeta(name="read-config"),
        rules=[k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])]))
    rbac.create_namespaced_role_binding(kube_namespace, k8s.V1RoleBinding(
        metadata=k8s.V1ObjectMeta(name="read-config"),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="read-config"),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="orchestrator", namespace=kube_namespace)]))
    code = ("import os, kubernetes as k\n"
            "k.config.load_config(); v1 = k.client.CoreV1Api(); ns = os.environ['NS']\n"
            "v1.list_namespaced_config_map(ns); print('configmaps ok')\n"
            "try:\n    v1.list_namespaced_secret(ns)\nexcept k.client.ApiException as e:\n"
            "    print('secrets', e.status)\n")
    container = python(code, env=[{"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}])

    status = run_job(api, kube_namespace, job("sa", container, serviceAccountName="orchestrator"), timeout=30)

    log = kubelet.logs("sa")["main"].read_text()
    assert "Complete" in conditions(status), log
    assert "configmaps ok" in log and "secrets 403" in log
    user = f"system:serviceaccount:{kube_namespace}:orchestrator"
    calls = eventually(lambda: {(e["verb"], e["objectRef"]["resource"], e["responseStatus"]["code"])
                                for e in kube_api.audit_events(user)} or None, 5, "audit events")
    assert calls == {("list", "configmaps", 200), ("list", "secrets", 403)}


def test_jobs_listed_at_start_run_unless_already_finished(api, kube_api: ApiServer, kube_namespace: str,
                                                          tmp_path: Path) -> None:
    batch = api[1]
    batch.create_namespaced_job(kube_namespace, job("done-before", python("raise SystemExit(9)")))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = [{"type": t, "status": "True", "reason": "CompletionsReached", "message": "earlier"}
            for t in ("SuccessCriteriaMet", "Complete")]
    batch.patch_namespaced_job_status("done-before", kube_namespace, {"status": {
        "startTime": now, "completionTime": now, "succeeded": 1, "conditions": done}})
    batch.create_namespaced_job(kube_namespace, job("waiting", python("pass")))

    with KubeletStandIn(kube_api, kube_namespace, tmp_path / "logs", tmp_path / "root") as late:
        status = run_job(api, kube_namespace, job("after", python("pass")))
        eventually(lambda: "Complete" in conditions(batch.api_client.sanitize_for_serialization(
            batch.read_namespaced_job_status("waiting", kube_namespace).status)), 10, "waiting Job complete")

    assert "Complete" in conditions(status)
    assert late.pods("done-before") == [] and len(late.pods("waiting")) == 1
