"""A long-lived (shared) monitor-consumer outlives many fits: its scorer follows the
``champion`` alias of a real MLflow registry (a SQLite store in a temporary folder)."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from models import registry
from models.registry import load_expected_usage
from analysis.scoring import model_detector
from monitor.live_scoring import LiveScorer
from pipeline.db import connect, create_schema
from pipeline.settings import Settings
from training import synthetic, tracking
from training.data import split_by_order
from training.trainer import TrainConfig, fit


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'pipeline.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    registry.use_store(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = registry.ensure_experiment(client, "follow-test", uri)
    frame = synthetic.generate(30, seed=1)
    split = split_by_order(frame, seed=0)
    model = fit(split.train, split.validation, TrainConfig(epochs=2, seed=0), progress=False).model

    def register() -> str:
        with mlflow.start_run(experiment_id=experiment):
            version = str(tracking.log_model(model, split.test.head(5)).registered_model_version)
        registry.promote(client, version)
        return version

    return Settings.from_env(), register


def test_the_scorer_loads_the_new_champion_when_the_alias_moves(store):
    settings, register = store
    assert register() == "1"
    engine = connect(settings.database_url)
    create_schema(engine)
    scorer = LiveScorer(settings, engine, None, "test")
    # As start() leaves it (without the broker, where it creates the anomalies topic).
    model, scorer.model_version = load_expected_usage(settings.mlflow_tracking_uri)
    scorer.detector = model_detector(model, settings)
    assert scorer.model_version == "1"

    scorer._follow_champion()  # nothing moved
    assert scorer.model_version == "1"
    assert register() == "2"
    scorer._follow_champion()
    assert scorer.model_version == "2"
