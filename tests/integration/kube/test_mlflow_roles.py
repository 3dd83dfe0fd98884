"""The cluster's MLflow as ``k8s/mlflow.yaml`` runs it, on this machine: the server's own command
line with its basic-auth app and ``basic_auth.ini`` (only the address and the folders changed),
the admin from the Secret ``deploy`` makes, and ``setup_users.py`` run as the Job
``mlflow-users`` runs it. Then training registers a version and moves the champion alias, the
scorer loads the champion and may change nothing, and nobody gets in without a password.

The basic-auth app needs Flask-WTF (``mlflow[auth]``, which the server image has; requirements.txt
installs it here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.servers import free_port
from ops import deploy

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

K8S = Path(__file__).resolve().parents[3] / "k8s"


@pytest.fixture(scope="module")
def cluster_mlflow(tmp_path_factory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("cluster-mlflow")
    objects = {(o["kind"], o["metadata"]["name"]): o for o in deploy.render(K8S)}
    config = objects[("ConfigMap", "mlflow-auth")]["data"]
    (folder / "basic_auth.ini").write_text(config["basic_auth.ini"].replace("sqlite:////mlflow/", f"sqlite:///{folder}/"))
    (folder / "setup_users.py").write_text(config["setup_users.py"])
    secrets = {s["metadata"]["name"]: s["stringData"] for s in deploy.role_secrets("ns", {})}

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    container = objects[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    command = [arg.replace("--host=0.0.0.0", "--host=127.0.0.1").replace("--port=5000", f"--port={port}")
               .replace("/mlflow/", f"{folder}/") for arg in container["command"]]
    assert command[:2] == ["mlflow", "server"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"].replace("/etc/mlflow-auth/", f"{folder}/")
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    with open(folder / "server.log", "wb") as log:
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), *command[1:]], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"uri": uri, "folder": folder, "secrets": secrets, "objects": objects}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run_setup(mlflow: dict) -> subprocess.CompletedProcess:
    """setup_users.py with the environment of the Job mlflow-users."""
    job = mlflow["objects"][("Job", "mlflow-users")]["spec"]["template"]["spec"]["containers"][0]
    env = {"PATH": os.environ["PATH"], "WAIT_SECONDS": "30"}
    for item in job["env"]:
        source = item["valueFrom"]
        if "configMapKeyRef" in source:
            assert source["configMapKeyRef"]["key"] == "MLFLOW_TRACKING_URI"
            env[item["name"]] = mlflow["uri"]
        else:
            ref = source["secretKeyRef"]
            env[item["name"]] = mlflow["secrets"][ref["name"]][ref["key"]]
    assert job["command"] == ["python", "/etc/mlflow-auth/setup_users.py"]
    return subprocess.run([sys.executable, str(mlflow["folder"] / "setup_users.py")], env=env,
                          capture_output=True, text=True, timeout=120)


def client_as(mlflow: dict, user: str, monkeypatch, password: str | None = None) -> MlflowClient:
    """A client with the environment a pod with the Secret mlflow-<user> has."""
    data = mlflow["secrets"][f"mlflow-{user}"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", data["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password or data["MLFLOW_TRACKING_PASSWORD"])
    return MlflowClient(tracking_uri=mlflow["uri"], registry_uri=mlflow["uri"])


def test_training_registers_and_moves_the_alias_the_scorer_only_reads(cluster_mlflow, monkeypatch, tmp_path):
    first = run_setup(cluster_mlflow)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "training has MANAGE on registered_model expected-usage" in first.stdout
    assert "scorer has READ on registered_model expected-usage" in first.stdout
    assert "registered model expected-usage created" in first.stdout
    again = run_setup(cluster_mlflow)  # the Job runs again after every change: nothing breaks
    assert again.returncode == 0, again.stdout + again.stderr
    assert "user scorer exists; its password is the Secret's" in again.stdout

    training = client_as(cluster_mlflow, "training", monkeypatch)
    experiment = training.get_experiment_by_name("expected-usage").experiment_id
    run = training.create_run(experiment)
    (tmp_path / "model.txt").write_text("weights")
    training.log_artifact(run.info.run_id, str(tmp_path / "model.txt"), "model")
    training.set_terminated(run.info.run_id)
    scorer = client_as(cluster_mlflow, "scorer", monkeypatch)
    with pytest.raises(MlflowException) as nothing_yet:  # as live scoring finds it before a training
        scorer.get_model_version_by_alias("expected-usage", "champion")
    assert nothing_yet.value.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
    with pytest.raises(MlflowException) as taken:  # made by the Job, so nobody else can own it
        scorer.create_registered_model("expected-usage")
    assert taken.value.error_code == "RESOURCE_ALREADY_EXISTS"

    training = client_as(cluster_mlflow, "training", monkeypatch)
    version = training.create_model_version("expected-usage", f"runs:/{run.info.run_id}/model", run.info.run_id)
    training.set_registered_model_alias("expected-usage", "champion", version.version)

    scorer = client_as(cluster_mlflow, "scorer", monkeypatch)
    champion = scorer.get_model_version_by_alias("expected-usage", "champion")
    assert champion.version == version.version
    downloaded = scorer.download_artifacts(run.info.run_id, "model", str(tmp_path / "down"))
    assert (Path(downloaded) / "model.txt").read_text() == "weights"
    refused = {
        "move the alias": lambda: scorer.set_registered_model_alias("expected-usage", "champion", version.version),
        "register a version": lambda: scorer.create_model_version(
            "expected-usage", f"runs:/{run.info.run_id}/model", run.info.run_id),
        "delete the model": lambda: scorer.delete_registered_model("expected-usage"),
        "log to training's run": lambda: scorer.log_param(run.info.run_id, "x", "1"),
    }
    for what, call in refused.items():
        with pytest.raises(MlflowException) as refusal:
            call()
        assert refusal.value.error_code == "PERMISSION_DENIED", what

    for user, password in (("scorer", "not-the-password-of-scorer"), ("training", "x" * 16)):
        with pytest.raises(MlflowException) as refusal:
            client_as(cluster_mlflow, user, monkeypatch, password=password).search_experiments()
        assert refusal.value.error_code == "UNAUTHENTICATED", user
    request = urllib.request.Request(f"{cluster_mlflow['uri']}/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(request, timeout=10)
    assert anonymous.value.code == 401


def test_a_new_password_in_the_secret_takes_over_when_the_job_runs_again(cluster_mlflow, monkeypatch):
    scorer = cluster_mlflow["secrets"]["mlflow-scorer"]
    old = scorer["MLFLOW_TRACKING_PASSWORD"]
    scorer["MLFLOW_TRACKING_PASSWORD"] = old[::-1] + "-rotated"
    result = run_setup(cluster_mlflow)
    assert result.returncode == 0, result.stdout + result.stderr
    client_as(cluster_mlflow, "scorer", monkeypatch).search_experiments()
    with pytest.raises(MlflowException) as refusal:
        client_as(cluster_mlflow, "scorer", monkeypatch, password=old).search_experiments()
    assert refusal.value.error_code == "UNAUTHENTICATED"
