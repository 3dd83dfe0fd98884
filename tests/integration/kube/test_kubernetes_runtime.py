"""Orders through the Kubernetes runtime, end to end, against a real kube-apiserver.

``python -m orchestrator submit`` (as a cluster admin) uploads the order and starts an
orchestrator Job; the kubelet stand-in runs it as a local process with a real token of the
``orchestrator`` service account, bound by the Role of ``k8s/rbac/``. That orchestrator
creates the task and monitor Jobs, which the stand-in runs too, against the real broker and
database. The API server's audit log then shows what the service account did.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml

from orchestrator.runtime.job_specs import COMPONENT, ORDER_LABEL, POSITION_LABEL, RUN_LABEL, TASK_LABEL
from pipeline.protocol import RESOURCES
from devkit.kube.cluster import apply_rbac, prepare_namespace
from devkit.kube.cluster import submit as submit_orders
from devkit.orders import REPO, stored_orders, write_order
from devkit.waiting import wait_for

def granted_verbs() -> set[tuple[str, str]]:
    """(resource, verb) pairs the orchestrator Role grants, read from k8s/rbac/role.yaml."""
    role = next(d for d in yaml.safe_load_all((REPO / "k8s/rbac/role.yaml").read_text()) if d["kind"] == "Role")
    return {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.fixture
def cluster(kube_api, kube_namespace, kubelet, infra_env, database_url, tmp_path):
    """The namespace set up as `python -m pipeline deploy` would, pointing at the test's
    broker and database."""
    admin = prepare_namespace(kube_api, kube_namespace, infra_env["KAFKA_BOOTSTRAP_SERVERS"],
                              database_url, tmp_path)
    return {"namespace": kube_namespace, "admin_kubeconfig": admin, "database_url": database_url,
            "kubelet": kubelet, "api": kube_api, "tmp": tmp_path}


def submit(cluster, *orders: Path) -> subprocess.CompletedProcess:
    return submit_orders(cluster["admin_kubeconfig"], cluster["namespace"], list(orders), cluster["tmp"])


def jobs(cluster) -> list[k8s.V1Job]:
    with cluster["api"].api_client() as client:
        return k8s.BatchV1Api(client).list_namespaced_job(cluster["namespace"]).items


def service_account_calls(cluster) -> list[dict]:
    user = f"system:serviceaccount:{cluster['namespace']}:orchestrator"
    return [e for e in cluster["api"].audit_events(user) if e.get("stage") == "ResponseComplete"]


def orchestrator_log(cluster, result) -> str:
    """What to show when an assertion fails: the submit output and the orchestrator pod's log."""
    logs = []
    for job in jobs(cluster):
        if job.metadata.labels.get(COMPONENT) == "orchestrator":
            for path in cluster["kubelet"].logs(job.metadata.name).values():
                logs.append(path.read_text()[-4000:])
    return f"submit: {result.stdout}\n{result.stderr}\norchestrator pod:\n" + "\n".join(logs)


def test_an_order_runs_as_jobs_created_by_the_orchestrator_service_account(cluster):
    order = write_order(cluster["tmp"], "k8s-three", ["grayscale", "blur", "edge_detect"])
    result = submit(cluster, order)
    assert result.returncode == 0, orchestrator_log(cluster, result)
    assert "succeeded" in result.stdout

    stored = stored_orders_for(cluster)["k8s-three"]
    assert stored.status == "SUCCEEDED"
    assert [(r["task"], r["status"]) for r in stored.runs] == [
        ("grayscale", "SUCCEEDED"), ("blur", "SUCCEEDED"), ("edge_detect", "SUCCEEDED")]
    # Every task was sampled by the sidecar in its own pod: every resource, per task.
    for task in ("grayscale", "blur", "edge_detect"):
        assert {s["resource"] for s in stored.samples if s["task"] == task} == set(RESOURCES), task
    outputs = cluster["kubelet"].pvc_dir("pipeline-artifacts") / f"order-{stored.id}"
    assert sorted(p.name for p in outputs.iterdir()) == ["00-grayscale.png", "01-blur.png", "02-edge_detect.png"]

    by_component: dict[str, list[k8s.V1Job]] = {}
    for job in jobs(cluster):
        by_component.setdefault(job.metadata.labels[COMPONENT], []).append(job)
    assert sorted(by_component) == ["monitor-consumer", "orchestrator", "task"]
    tasks = sorted(by_component["task"], key=lambda j: int(j.metadata.labels[POSITION_LABEL]))
    assert [j.metadata.labels[TASK_LABEL] for j in tasks] == ["grayscale", "blur", "edge_detect"]
    assert {j.metadata.labels[ORDER_LABEL] for j in tasks} == {str(stored.id)}
    assert len({j.metadata.labels[RUN_LABEL] for j in tasks + by_component["monitor-consumer"]}) == 1
    # Owned by the orchestrator's pod, so that deleting it (or its Job) removes them too.
    orchestrator_job = by_component["orchestrator"][0].metadata.name
    orchestrator_pod = cluster["kubelet"].pods(orchestrator_job)[-1]
    for job in tasks + by_component["monitor-consumer"]:
        assert [(o.kind, o.name, o.uid) for o in job.metadata.owner_references] == [
            ("Pod", orchestrator_pod.name, orchestrator_pod.uid)]
    for job in tasks + by_component["monitor-consumer"]:
        assert job.spec.backoff_limit == 0 and job.spec.ttl_seconds_after_finished > 0
        assert job.spec.active_deadline_seconds > 0
        pod = job.spec.template.spec
        for container in (pod.init_containers or []) + pod.containers:
            image = container.image
            assert ":" in image and not image.endswith(":latest"), image
        assert all(c.type == "Complete" for c in job.status.conditions if c.status == "True"
                   and c.type in ("Complete", "Failed"))

    calls = service_account_calls(cluster)
    assert calls, "the orchestrator pod must act as the orchestrator service account"
    assert all(e["responseStatus"]["code"] < 400 for e in calls), [
        (e["verb"], e["objectRef"], e["responseStatus"]) for e in calls if e["responseStatus"]["code"] >= 400]


def test_a_failing_and_a_stalled_task_fail_their_orders_cleanly_and_the_role_is_exactly_enough(cluster):
    failing = write_order(cluster["tmp"], "k8s-failing", ["grayscale", {"name": "blur", "fault": "raise"}],
                          retry={"max_attempts": 2, "backoff_seconds": 0.2})
    stalled = write_order(cluster["tmp"], "k8s-stalled", [{"name": "sepia", "fault": "stall"}],
                          retry={"max_attempts": 1, "task_timeout_seconds": 4})
    result = submit(cluster, failing, stalled)
    assert result.returncode == 1, orchestrator_log(cluster, result)

    stored = stored_orders_for(cluster)
    assert stored["k8s-failing"].status == "FAILED"
    assert [(r["task"], r["attempt"], r["status"]) for r in stored["k8s-failing"].runs] == [
        ("grayscale", 1, "SUCCEEDED"), ("blur", 1, "FAILED"), ("blur", 2, "FAILED")]
    assert "RuntimeError" in stored["k8s-failing"].runs[-1]["error"] or stored["k8s-failing"].runs[-1]["error"]
    assert stored["k8s-stalled"].status == "FAILED"
    assert "no PROGRESS within 4s" in stored["k8s-stalled"].runs[0]["error"]

    all_jobs = jobs(cluster)
    failed_blur = [j for j in all_jobs if j.metadata.labels.get(TASK_LABEL) == "blur"]
    assert len(failed_blur) == 2, "every attempt is a Job of its own"
    assert all(any(c.type == "Failed" and c.status == "True" for c in j.status.conditions) for j in failed_blur)
    # The stalled task's Job was deleted by the orchestrator (its pod stopped with it).
    assert not [j for j in all_jobs if j.metadata.labels.get(TASK_LABEL) == "sepia"]
    # The failed orders' monitors completed the STOP/TERMINATE handshake and ended.
    monitors = [j for j in all_jobs if j.metadata.labels.get(COMPONENT, "").startswith("monitor-")]
    assert sorted(j.metadata.labels[COMPONENT] for j in monitors) == [
        "monitor-consumer", "monitor-consumer", "monitor-producer", "monitor-producer"]
    for job in monitors:
        assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or []), \
            job.metadata.name
    for name, order in stored.items():
        assert order.samples, f"{name}: the samples taken before the failure are stored"

    # Sufficient: nothing the orchestrator asked for was refused. Minimal: it used every verb
    # the Role grants, and the Role grants nothing else (the 403 test covers the rest).
    calls = service_account_calls(cluster)
    assert all(e["responseStatus"]["code"] < 400 for e in calls)
    used = {(e["objectRef"]["resource"], e["verb"]) for e in calls}
    assert used == granted_verbs(), f"used {sorted(used)}, granted {sorted(granted_verbs())}"


def test_the_orchestrator_service_account_is_refused_everything_the_role_does_not_grant(
        kube_api, kube_namespace, tmp_path):
    apply_rbac(kube_api, kube_namespace)
    with kube_api.api_client() as admin:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "existing"},
               "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
                   {"name": "c", "image": "image-pipeline-blur:0.6.0", "command": ["true"]}]}}}}
        k8s.BatchV1Api(admin).create_namespaced_job(kube_namespace, job)
        k8s.CoreV1Api(admin).create_namespaced_secret(kube_namespace, k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="pipeline-credentials"), string_data={"DATABASE_URL": "x"}))
    token = kube_api.service_account_token(kube_namespace, "orchestrator")
    with kube_api.api_client(token) as client:
        batch, core = k8s.BatchV1Api(client), k8s.CoreV1Api(client)
        new_job = {**job, "metadata": {"name": "new"}}
        granted = {
            "create jobs": lambda: batch.create_namespaced_job(kube_namespace, new_job, dry_run="All"),
            "list jobs": lambda: batch.list_namespaced_job(kube_namespace),
            "watch jobs": lambda: batch.list_namespaced_job(kube_namespace, watch=True, timeout_seconds=1,
                                                            _preload_content=False).read(),
            "delete jobs": lambda: batch.delete_namespaced_job("existing", kube_namespace, dry_run="All"),
        }
        refused = {
            "get a job": lambda: batch.read_namespaced_job("existing", kube_namespace),
            "patch a job": lambda: batch.patch_namespaced_job("existing", kube_namespace, {"spec": {"suspend": False}}),
            "update job status": lambda: batch.patch_namespaced_job_status(
                "existing", kube_namespace, {"status": {"active": 1}}),
            "delete all jobs": lambda: batch.delete_collection_namespaced_job(kube_namespace),
            "create pods": lambda: core.create_namespaced_pod(kube_namespace, {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}),
            "list pods": lambda: core.list_namespaced_pod(kube_namespace),
            "read the credentials secret": lambda: core.read_namespaced_secret("pipeline-credentials", kube_namespace),
            "list configmaps": lambda: core.list_namespaced_config_map(kube_namespace),
            "create configmaps": lambda: core.create_namespaced_config_map(kube_namespace, k8s.V1ConfigMap(
                metadata=k8s.V1ObjectMeta(name="c"))),
            "jobs in another namespace": lambda: batch.list_namespaced_job("default"),
            "jobs cluster-wide": lambda: batch.list_job_for_all_namespaces(),
            "cron jobs": lambda: k8s.BatchV1Api(client).list_namespaced_cron_job(kube_namespace),
            "change its own role": lambda: k8s.RbacAuthorizationV1Api(client).patch_namespaced_role(
                "orchestrator", kube_namespace, {"rules": []}),
        }
        for what, call in granted.items():
            call()  # raises on 403
        for what, call in refused.items():
            with pytest.raises(k8s.ApiException) as refusal:
                call()
            assert refusal.value.status == 403, f"{what}: HTTP {refusal.value.status}"


def stored_orders_for(cluster):
    from pipeline.settings import Settings

    return stored_orders(Settings.from_env({"DATABASE_URL": cluster["database_url"],
                                            "PIPELINE_STATE_DIR": str(cluster["tmp"] / "state")}))


def _samples_stored_of(cluster, task: str) -> bool:
    """Whether any sample of ``task`` is stored (of the test's one order)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return any(s["task"] == task for order in stored_orders_for(cluster).values() for s in order.samples)
    except SQLAlchemyError:  # the tables are not there yet
        return False


def test_a_task_job_deleted_behind_the_orchestrators_back_is_a_failed_attempt_and_retried(cluster):
    import threading
    import time

    order = write_order(cluster["tmp"], "k8s-vanishing", [{"name": "sepia", "fault": "stall"}],
                        retry={"max_attempts": 2, "backoff_seconds": 0.2, "task_timeout_seconds": 120})
    deleted: list[str] = []

    def delete_each_attempt_once_it_runs() -> None:
        deadline = time.monotonic() + 120
        with cluster["api"].api_client() as client:
            batch = k8s.BatchV1Api(client)
            while len(deleted) < 2 and time.monotonic() < deadline:
                for job in batch.list_namespaced_job(cluster["namespace"],
                                                     label_selector=f"{TASK_LABEL}=sepia").items:
                    if job.metadata.name not in deleted and (job.status.active or 0) > 0:
                        batch.delete_namespaced_job(job.metadata.name, cluster["namespace"],
                                                    propagation_policy="Background")
                        deleted.append(job.metadata.name)
                time.sleep(0.3)

    intruder = threading.Thread(target=delete_each_attempt_once_it_runs)
    intruder.start()
    result = submit(cluster, order)
    intruder.join()
    assert result.returncode == 1, orchestrator_log(cluster, result)
    assert len(deleted) == 2
    runs = stored_orders_for(cluster)["k8s-vanishing"].runs
    assert [(r["attempt"], r["status"]) for r in runs] == [(1, "FAILED"), (2, "FAILED")]
    for run in runs:
        assert "vanished: its Job was deleted outside the orchestrator" in run["error"], run["error"]


def test_deleting_the_orchestrator_job_cancels_the_order_and_leaves_nothing_running(cluster):
    import threading
    import time

    order = write_order(cluster["tmp"], "k8s-cancelled", ["grayscale", {"name": "sepia", "fault": "stall"}],
                        retry={"max_attempts": 1, "task_timeout_seconds": 120})
    stopped: list[str] = []

    def delete_the_orchestrator_once_the_stalled_task_runs() -> None:
        deadline = time.monotonic() + 120
        with cluster["api"].api_client() as client:
            batch = k8s.BatchV1Api(client)
            while not stopped and time.monotonic() < deadline:
                stalled = batch.list_namespaced_job(cluster["namespace"], label_selector=f"{TASK_LABEL}=sepia").items
                # Once its sampler's samples are stored (the order's samples must include them).
                if stalled and (stalled[0].status.active or 0) > 0 and _samples_stored_of(cluster, "sepia"):
                    for job in batch.list_namespaced_job(
                            cluster["namespace"], label_selector=f"{COMPONENT}=orchestrator").items:
                        batch.delete_namespaced_job(job.metadata.name, cluster["namespace"],
                                                    propagation_policy="Background")
                        stopped.append(job.metadata.name)
                time.sleep(0.3)

    intruder = threading.Thread(target=delete_the_orchestrator_once_the_stalled_task_runs)
    intruder.start()
    result = submit(cluster, order)
    intruder.join()
    assert stopped and result.returncode == 1, orchestrator_log(cluster, result)
    assert "deleted before it finished" in result.stdout

    # The orchestrator got SIGTERM like a pod being deleted, and wound the order down within
    # its termination grace period: the task stopped, the monitors' handshake completed.
    wait_for(lambda: stored_orders_for(cluster)["k8s-cancelled"].status == "CANCELLED",
             lambda: orchestrator_log(cluster, result), every=0.5)
    stored = stored_orders_for(cluster)["k8s-cancelled"]
    assert [(r["task"], r["status"]) for r in stored.runs] == [("grayscale", "SUCCEEDED"), ("sepia", "FAILED")]
    assert {s["task"] for s in stored.samples} == {"grayscale", "sepia"}
    remaining = {j.metadata.labels[COMPONENT]: j for j in jobs(cluster)}
    assert "task" not in remaining or remaining["task"].metadata.labels[TASK_LABEL] == "grayscale"
    for component in ("monitor-consumer", "monitor-producer"):
        conditions = remaining[component].status.conditions or []
        assert any(c.type == "Complete" and c.status == "True" for c in conditions), component
    # Every process of every pod has ended (the orchestrator's last: it prints its summary).
    kubelet = cluster["kubelet"]
    pods = [pod for job in jobs(cluster) for pod in kubelet.pods(job.metadata.name)]
    pods += [pod for name in stopped for pod in kubelet.pods(name)]
    wait_for(lambda: not any(None in pod.exit_codes().values() for pod in pods),
             lambda: f"still running: {[pod.name for pod in pods if None in pod.exit_codes().values()]}", every=0.2)
