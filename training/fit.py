"""One fit, start to end: data, split, training, baseline, comparison, MLflow run, registry.

One MLflow run per fit: parameters first, a metric per epoch with its step, then the test
metrics of the model, of the baseline and of the current champion re-scored on the same test
orders, and the model with its signature at the end, registered as a new version of
``expected-usage``. The ``champion`` alias moves to it only when it beats the champion.

Why re-score the champion rather than compare with the figure it was registered with: each fit
draws its test orders from the history of its day, and a metric measured on other orders says
little. The champion, loaded from the registry, is scored on this fit's test orders, so both
models answer the same questions. (Those orders may have been training data of the champion,
which favours the champion: a challenger only wins with a clear margin.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime

import mlflow
import pandas as pd
from mlflow import MlflowClient

from models.expected_usage import ExpectedUsageModel
from models.features import FEATURE_COLUMNS
from pipeline.db import connect
from pipeline.settings import Settings
from training import data, trainer, tracking
from training.baseline import QuantileTableBaseline
from pipeline.errors import TrainingError
from training.metrics import Scores, beats, score, side_by_side, verdict
from training.registry import load_expected_usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitOptions:
    """What ``python -m training fit`` was asked for."""

    since: datetime | None = None
    until: datetime | None = None
    epochs: int = 200
    seed: int = 0
    device: str = "auto"
    experiment: str = "expected-usage"
    min_orders: int = 20


@dataclass(frozen=True)
class FitReport:
    """What a fit produced, for the command line to print."""

    table: str
    verdict: str
    champion: str
    run_id: str
    version: str
    beats_baseline: bool
    promoted: bool
    training_seconds: float
    predictions_per_second: float


def run_fit(settings: Settings, options: FitOptions, progress: bool = True) -> FitReport:
    """Train, evaluate and register one model; raises InsufficientDataError on too little data."""
    frame = data.load_measurements(connect(settings.database_url), options.since, options.until)
    data.require_enough(frame, options.min_orders)
    split = data.split_by_order(frame, options.seed)
    device = trainer.resolve_device(options.device)
    config = trainer.TrainConfig(epochs=options.epochs, seed=options.seed)
    logger.info("fitting on %s orders (train/validation/test), device=%s", split.orders(), device)

    tracking.use_store(settings.mlflow_tracking_uri)
    client = MlflowClient()
    experiment_id = tracking.ensure_experiment(client, options.experiment, settings.mlflow_tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"fit-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.log_params(_params(options, config, split, device))
        outcome = trainer.fit(split.train, split.validation, config, device, _log_epoch, progress)
        model = outcome.model.to("cpu")
        model_scores = score(split.test, model.predict(split.test))
        baseline_scores = score(split.test, QuantileTableBaseline().fit(split.train).predict(split.test))
        rate = predictions_per_second(model, split.test)
        mlflow.log_metrics({**model_scores.as_metrics("test"), **baseline_scores.as_metrics("baseline_test"),
                            "training_seconds": outcome.seconds, "best_epoch": outcome.best_epoch,
                            "epochs_run": len(outcome.history), "predictions_per_second": rate})
        table = side_by_side(model_scores, baseline_scores, split.orders()["test"])
        mlflow.log_text(table + "\n", "comparison.txt")
        champion = _current_champion(settings.mlflow_tracking_uri, split.test)
        info = tracking.log_model(model, split.test[FEATURE_COLUMNS].head(5))
        version = str(info.registered_model_version)
        promoted, line = _decide_champion(client, version, model_scores, champion)
        better = beats(model_scores, baseline_scores)
        mlflow.set_tags({"beats_baseline": str(better), "champion": str(promoted), "model_version": version})
    return FitReport(table, verdict(model_scores, baseline_scores), line, run.info.run_id, version,
                     better, promoted, outcome.seconds, rate)


def _log_epoch(result: trainer.EpochResult) -> None:
    mlflow.log_metrics({"train_loss": result.train_loss, "val_loss": result.val_loss,
                        "val_coverage": result.val_coverage, "learning_rate": result.learning_rate},
                       step=result.epoch)


def _params(options: FitOptions, config: trainer.TrainConfig, split: data.Split, device) -> dict:
    orders = split.orders()
    return {
        **{f"train_{k}": v for k, v in asdict(config).items()},
        "since": options.since.isoformat() if options.since else "",
        "until": options.until.isoformat() if options.until else "",
        "device": str(device), "min_orders": options.min_orders,
        "features": ",".join(FEATURE_COLUMNS), "target": "log1p(value), standardised per resource",
        "quantiles": "0.1,0.5,0.9", "split": "by order, seeded, 70/15/15",
        "orders_train": orders["train"], "orders_validation": orders["validation"],
        "orders_test": orders["test"], "rows_train": len(split.train),
        "rows_validation": len(split.validation), "rows_test": len(split.test),
    }


def _current_champion(tracking_uri: str, test: pd.DataFrame) -> tuple[str, float] | None:
    """The champion's version and its test metric re-scored on ``test``; None without one.

    A champion this code cannot load (an older format) is judged by the metric it was
    registered with instead.
    """
    try:
        loaded = load_expected_usage(tracking_uri)
    except TrainingError as exc:
        client = MlflowClient()
        version = tracking.champion_version(client)
        recorded = client.get_model_version(tracking.MODEL_NAME, version).tags.get("test_pinball_log") \
            if version else None
        logger.warning("%s; comparing with the test metric it was registered with (%s)", exc, recorded)
        return (version, float(recorded)) if recorded else None
    if loaded is None:
        return None
    model, version = loaded
    rescored = score(test, model.predict(test)).pinball_log
    mlflow.log_metrics({"champion_test_pinball_log": rescored})
    mlflow.log_param("champion_version_before", version)
    return version, rescored


def _decide_champion(client: MlflowClient, version: str, scores: Scores,
                     champion: tuple[str, float] | None) -> tuple[bool, str]:
    client.set_model_version_tag(tracking.MODEL_NAME, version, "test_pinball_log", f"{scores.pinball_log:.6f}")
    if not tracking.should_promote(scores.pinball_log, champion[1] if champion else None):
        return False, (f"{tracking.MODEL_NAME} version {version} registered; champion stays version "
                       f"{champion[0]} (test pinball {champion[1]:.4f} on these test orders, "
                       f"new {scores.pinball_log:.4f})")
    tracking.promote(client, version)
    before = (f", was version {champion[0]} with {champion[1]:.4f} on these test orders"
              if champion else ", the first one")
    return True, (f"{tracking.MODEL_NAME} version {version} registered and is now the champion "
                  f"(test pinball {scores.pinball_log:.4f}{before})")


def predictions_per_second(model: ExpectedUsageModel, frame: pd.DataFrame, rows: int = 16_384) -> float:
    """Batched throughput of ``model.predict`` on ``rows`` rows resampled from ``frame``."""
    sample = frame[FEATURE_COLUMNS].sample(n=rows, replace=True, random_state=0)
    model.predict(sample.head(64))  # warm-up
    began = time.perf_counter()
    model.predict(sample)
    return rows / max(time.perf_counter() - began, 1e-9)
