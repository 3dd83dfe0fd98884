"""A long-lived (shared) monitor-consumer outlives many fits: its scorer follows the
``champion`` alias of a real MLflow registry (a SQLite store in a temporary folder), and an
order started after a fit is scored with the model that fit registered."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient
from sqlalchemy import update

from models import registry
from models.registry import load_expected_usage
from analysis.scoring import model_detector
from monitor import live_scoring
from monitor.live_scoring import LiveScorer
from pipeline.db import connect, create_schema
from pipeline.db.orders import OrderStore
from pipeline.db.schema import orders as orders_table
from pipeline.protocol import ANOMALIES_TOPIC, Sample
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


def _sample(order_id: int) -> Sample:
    return Sample((), "blur", order_id, "cpu", 50.0, 0, 0, 1)


def test_an_order_created_after_a_fit_is_scored_with_the_model_that_fit_registered(store, monkeypatch):
    """The rule of monitor/live_scoring.py: the alias is looked up again before the first
    samples of an order created after the last look-up, also by a scorer that started with no
    champion at all (a shared consumer started before the first fit)."""
    settings, register = store
    topics = []
    monkeypatch.setattr(live_scoring, "TopicAdmin", lambda _settings: SimpleNamespace(create=topics.extend))
    monkeypatch.setattr(live_scoring, "FOLLOW_CHAMPION_SECONDS", 3600.0)  # no periodic look-up here
    engine = connect(settings.database_url)
    create_schema(engine)
    orders = OrderStore(engine)
    scorer = LiveScorer(settings, engine, None, "test").start()
    try:
        assert scorer.detector is None  # nothing registered: samples are stored, not scored
        before = orders.create("before", "a.jpg", "blur")
        scorer._follow_new_orders([_sample(before)])
        assert scorer.detector is None

        assert register() == "1"  # `python -m training fit` returns
        after = orders.create("after", "a.jpg", "blur")
        scorer._follow_new_orders([_sample(before), _sample(after)])
        assert scorer.model_version == "1" and scorer.detector is not None
        assert topics == [ANOMALIES_TOPIC]  # created with the first model

        assert register() == "2"
        scorer._follow_new_orders([_sample(after)])  # seen already: its model is the one in use
        assert scorer.model_version == "1"
        old = orders.create("old", "a.jpg", "blur")
        with engine.begin() as conn:  # created long before the last look-up
            conn.execute(update(orders_table).where(orders_table.c.id == old)
                         .values(created_at=datetime.now(timezone.utc) - timedelta(hours=1)))
        scorer._follow_new_orders([_sample(old)])
        assert scorer.model_version == "1"
        newer = orders.create("newer", "a.jpg", "blur")
        scorer._follow_new_orders([_sample(after), _sample(newer)])
        assert scorer.model_version == "2" and topics == [ANOMALIES_TOPIC]
    finally:
        scorer.close()
