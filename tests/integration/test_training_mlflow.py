"""`python -m training fit` on real orders, tracked and registered in MLflow, and the MLflow UI.

Real orders run through the real broker into a fresh PostgreSQL database; the fit runs as the
user runs it, on a SQLite MLflow store of its own; the registered model is loaded back in a
fresh process that does not have this checkout on its path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
from mlflow import MlflowClient

from devkit.orders import REPO, child_env, run_orchestrator, write_order
from devkit.servers import free_port
from models import registry
from models.registry import load_expected_usage
from pipeline.settings import Settings

EXPERIMENT = "expected-usage-it"
SAMPLE = {"task": "blur", "resource": "cpu", "seconds": 1.5, "position": 1.0, "prev_task": "grayscale",
          "image_pixels": 640.0 * 480.0}


def _fit(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", "fit", "--experiment", EXPERIMENT, "--min-orders", "8",
         "--epochs", "80", *args],
        cwd=REPO, env=child_env(settings), capture_output=True, text=True, timeout=300)


def _write_orders(folder: Path) -> list[str]:
    files = [
        write_order(folder, "edges", [{"name": "resize", "params": {"width": 320}}, "grayscale", "edge_detect"],
                    image="china.jpg"),
        write_order(folder, "soften", ["blur", "sharpen"], image="scene-640x480.jpg"),
        write_order(folder, "stamp", ["watermark", "jpeg"], image="pattern-320x320.png"),
        write_order(folder, "heavy", [{"name": "median", "params": {"size": 5, "passes": 2}}, "grayscale"],
                    image="scene-1024x768.jpg"),
    ]
    return [str(path) for path in files]


def test_fit_on_real_orders_logs_registers_and_promotes_only_a_better_model(settings, tmp_path):
    too_early = _fit(settings)
    assert too_early.returncode == 2, too_early.stderr[-2000:]
    assert too_early.stderr.strip().splitlines()[-1].startswith("error: not enough history to train: 0 order(s)")

    ran = run_orchestrator(settings, *_write_orders(tmp_path), "--repeat", "3", timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]

    first = _fit(settings)
    assert first.returncode == 0, first.stderr[-3000:]
    print(first.stdout)
    assert "MAE of P50" in first.stdout and "pinball" in first.stdout
    assert "3 folds by whole order" in first.stdout and "GBM" in first.stdout and "quantile table" in first.stdout
    assert ("Overall the network beats the GBM" in first.stdout) != \
        ("Overall the network does NOT beat the GBM" in first.stdout)
    assert "version 1 registered and is now the champion" in first.stdout
    assert "training:" in first.stderr  # the progress bar

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert experiment.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train_seed"] == "0" and run.data.params["folds"] == "3"
    assert int(run.data.params["fold1_orders_test"]) >= 1
    for name in ("fold1_network_pinball_cpu", "fold3_gbm_coverage_memory", "fold2_table_mae_p50_cpu",
                 "cv_network_pinball_cpu_mean", "cv_gbm_pinball_cpu_std", "cv_table_mae_p50_memory_mean",
                 "cv_network_gbm_pinball_ratio", "cv_network_wins_over_gbm", "training_seconds"):
        assert name in run.data.metrics, name
    assert {"comparison.txt", "fold_metrics.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    val_loss = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(val_loss) >= 3 and [m.step for m in val_loss] == list(range(1, len(val_loss) + 1))
    (version,) = client.search_model_versions(f"name='{registry.MODEL_NAME}'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert str(client.get_model_version_by_alias(registry.MODEL_NAME, "champion").version) == "1"

    predicted = _predict_in_fresh_process(settings, tmp_path)
    assert 0 <= predicted["p10"] <= predicted["p50"] <= predicted["p90"]

    model, loaded_version = load_expected_usage(settings.mlflow_tracking_uri)
    assert loaded_version == "1"
    direct = model.predict(pd.DataFrame([SAMPLE])).iloc[0]
    assert abs(direct["p50"] - predicted["p50"]) <= 1e-6 * max(1.0, predicted["p50"])
    assert load_expected_usage(settings.mlflow_tracking_uri, version=42) is None
    assert load_expected_usage(f"sqlite:///{tmp_path / 'no-store-yet.db'}") is None
    assert not (tmp_path / "no-store-yet.db").exists()

    # Same data, same seed: the same networks over the folds, which do not beat the champion
    # re-scored on orders it trained on (nor, perhaps, the GBM): the champion stays where it is.
    second = _fit(settings)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "version 2 registered; champion stays version 1" in second.stdout
    assert str(client.get_model_version_by_alias(registry.MODEL_NAME, "champion").version) == "1"
    assert len(client.search_runs([experiment.experiment_id])) == 2


def _predict_in_fresh_process(settings: Settings, tmp_path: Path) -> dict:
    """Load models:/expected-usage@champion in a process without this checkout on its path."""
    script = (
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/expected-usage@champion')\n"
        f"print(json.dumps(model.predict(pd.DataFrame([{SAMPLE!r}])).iloc[0].to_dict()))\n"
    )
    env = {k: v for k, v in child_env(settings).items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mlflow_ui_serves_the_default_store_over_http(tmp_path):
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state")})
    store = settings.mlflow_tracking_uri
    assert store == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"  # the project's default store
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment_id = registry.ensure_experiment(client, "expected-usage", store)
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "test_pinball_log", 0.25, step=0)
    client.set_terminated(run.info.run_id)
    assert load_expected_usage(store) is None  # a store without a registered model

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(server, f"{base}/health", timeout=90)
        found = json.loads(_get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=expected-usage"))
        assert found["experiment"]["experiment_id"] == experiment_id
        runs = json.loads(_post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]}))
        assert runs["runs"][0]["data"]["metrics"][0]["key"] == "test_pinball_log"
        page = _get(f"{base}/")
        assert "<html" in page.lower()
    finally:
        _stop_group(server)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(port) in (p.info["cmdline"] or [])]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def _post(url: str, body: dict) -> str:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def _wait_until_up(server: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow ui exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow ui not answering on {url} after {timeout:.0f}s")


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it forks workers), SIGKILL what is left after 20 s;
    returns once every process of the group is gone."""
    try:
        members = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        members = []
    _signal_group(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        _signal_group(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    _, alive = psutil.wait_procs(members, timeout=10)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=10)
    server.stderr.close()


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # started with start_new_session: the group id is its pid
    except ProcessLookupError:
        pass
