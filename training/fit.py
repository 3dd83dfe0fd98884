"""One fit, start to end: data, K folds, the verdict, the final model, MLflow run, registry.

The yardstick is honest only when it is measured more than once and per resource: over K folds
of whole orders the network, gradient-boosted quantile trees (the GBM) and the quantile table
are trained and scored side by side, and :mod:`training.verdict` says whether the network beats
the GBM. The model that is registered is then trained once on all orders (a validation share
for early stopping): the folds judge the recipe, the final fit uses all the history.

One MLflow run per fit: parameters first, then every fold's metrics per model and resource
(``fold{k}_{model}_{metric}_{resource}``) and their means and spreads
(``cv_{model}_{metric}_{resource}_mean``/``_std``), the comparison table (``comparison.txt``)
and the per-fold rows (``fold_metrics.csv``); then the final training's metric per epoch and
the model with its signature, registered as a new version of ``expected-usage``. Whether the
``champion`` alias moves is :mod:`training.champion`'s rule.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime

import mlflow
import pandas as pd
from mlflow import MlflowClient

from models import registry
from models.alarms import DEFAULT_RATE, AlarmCalibration
from models.expected_usage import ExpectedUsageModel
from models.features import FEATURE_COLUMNS
from models.registry import RegistryError, load_expected_usage
from pipeline.db import connect
from pipeline.db.retry import retrying
from pipeline.settings import Settings
from training import champion as champion_rule
from training import crossval, data, folds, tracking, trainer, verdict
from training.gbm_baseline import GbmConfig

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
    folds: int = 3


@dataclass(frozen=True)
class FitReport:
    """What a fit produced, for the command line to print."""

    table: str
    verdict: str
    champion: str
    run_id: str
    version: str
    beats_baseline: bool  # the network beats the GBM by the rule of training.verdict
    promoted: bool
    training_seconds: float  # the final model's training
    evaluation_seconds: float  # the K folds, every model
    predictions_per_second: float
    alarms: str = ""  # the calibrated thresholds, in a sentence


@dataclass(frozen=True)
class _Champion:
    """The registered champion before this fit: its model, or why it cannot be loaded."""

    version: str
    model: ExpectedUsageModel | None
    problem: str | None = None


def run_fit(settings: Settings, options: FitOptions, progress: bool = True) -> FitReport:
    """Evaluate over folds, train on everything, register; raises InsufficientDataError on too
    little data."""
    engine = connect(settings.database_url)
    frame = retrying(lambda: data.load_measurements(engine, options.since, options.until),
                     "reading the measurements", settings.db_retry_seconds)
    data.require_enough(frame, options.min_orders)
    parts = folds.all_folds(frame, options.folds, options.seed)
    final_train, final_validation = folds.hold_out(frame, options.seed)
    device = trainer.resolve_device(options.device)
    config = trainer.TrainConfig(epochs=options.epochs, seed=options.seed)
    gbm = GbmConfig(random_state=options.seed)
    logger.info("fitting on %d orders: %d folds, then all of them; device=%s",
                frame["order_id"].nunique(), options.folds, device)

    registry.use_store(settings.mlflow_tracking_uri)
    client = MlflowClient()
    experiment_id = registry.ensure_experiment(client, options.experiment, settings.mlflow_tracking_uri)
    current = _current_champion(client, settings.mlflow_tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"fit-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.log_params(_params(options, config, gbm, frame, parts, final_train, final_validation,
                                  device, current))
        cv = crossval.cross_validate(parts, config, device, current.model if current else None, gbm,
                                     progress, on_fold=_log_fold)
        judged = _judge(cv, int(frame["order_id"].nunique()), options.seed)
        _log_comparison(cv, judged)

        outcome = trainer.fit(final_train, final_validation, config, device, _log_epoch, progress)
        model = outcome.model.to("cpu")
        model.alarms = AlarmCalibration.fit(cv.alarm_statistics) if len(cv.alarm_statistics) else None
        model.work = model.work.with_heldout(cv.alarm_statistics)
        widened = model.widen_to(cv.misses)
        logger.info("P10-P90 bands set on the folds' held-out samples: %s",
                    ", ".join(f"{name} {w:+.3f}" for name, w in widened.items()) or "no change")
        alarms = _log_alarms(model.alarms)
        rate = predictions_per_second(model, frame)
        mlflow.log_metrics({"training_seconds": outcome.seconds, "best_epoch": outcome.best_epoch,
                            "epochs_run": len(outcome.history), "predictions_per_second": rate})
        version, decision = _register(client, model, frame, judged, current)
    return FitReport(judged.table, judged.text, decision.line, run.info.run_id, version,
                     judged.against_gbm.wins, decision.promote, outcome.seconds, cv.seconds, rate, alarms)


@dataclass(frozen=True)
class _Judged:
    """The comparison over the folds: printed, and as the judgements behind it."""

    table: str
    text: str
    against_gbm: verdict.Judgement
    others: tuple[verdict.Judgement, ...]  # against the table, and the champion when re-scored
    against_champion: verdict.Judgement | None


def _judge(cv: crossval.CrossValidation, orders: int, seed: int) -> _Judged:
    against_gbm = verdict.judge(cv.metrics, crossval.NETWORK, crossval.GBM)
    others = [verdict.judge(cv.metrics, crossval.NETWORK, crossval.TABLE)]
    against_champion = None
    if crossval.CHAMPION in set(cv.metrics["model"]):
        against_champion = verdict.judge(cv.metrics, crossval.NETWORK, crossval.CHAMPION)
        others.append(against_champion)
    return _Judged(verdict.table(cv.metrics, orders, seed), verdict.sentences(against_gbm, tuple(others)),
                   against_gbm, tuple(others), against_champion)


def _log_comparison(cv: crossval.CrossValidation, judged: _Judged) -> None:
    metrics = {**verdict.summary_metrics(cv.metrics), "cv_seconds": cv.seconds,
               "cv_network_wins_over_gbm": float(judged.against_gbm.wins),
               "cv_network_resources_lost_to_gbm": float(len(judged.against_gbm.losses))}
    for judgement in (judged.against_gbm, *judged.others):
        metrics[f"cv_network_{judgement.reference}_pinball_ratio"] = judgement.ratio
    mlflow.log_metrics(_finite(metrics))
    mlflow.log_text(f"{judged.table}\n\n{judged.text}\n", "comparison.txt")
    mlflow.log_text(cv.metrics.to_csv(index=False), "fold_metrics.csv")


def _register(client: MlflowClient, model: ExpectedUsageModel, frame: pd.DataFrame, judged: _Judged,
              current: _Champion | None) -> tuple[str, champion_rule.Decision]:
    """Log and register ``model``; move the alias when the champion rule says so."""
    info = tracking.log_model(model, frame.head(5))
    version = str(info.registered_model_version)
    wins, ratio = judged.against_gbm.wins, judged.against_gbm.ratio
    decision = champion_rule.decide(version, wins, ratio, _rescored(current, judged.against_champion))
    client.set_model_version_tag(registry.MODEL_NAME, version, "cv_pinball_ratio_vs_gbm", f"{ratio:.6f}")
    client.set_model_version_tag(registry.MODEL_NAME, version, "beats_gbm", str(wins))
    if decision.promote:
        registry.promote(client, version)
    mlflow.set_tags({"beats_gbm": str(wins), "champion": str(decision.promote), "model_version": version})
    return version, decision


def _log_alarms(calibration: AlarmCalibration | None) -> str:
    """Log the thresholds at the default rate; the sentence that says them."""
    if calibration is None:
        return "alarm thresholds: not calibrated (no held-out run); ANOMALY_THRESHOLD applies to samples"
    thresholds = calibration.thresholds(DEFAULT_RATE)
    mlflow.log_metrics({f"alarm_threshold_{verdict.metric_name(kind)}": t for kind, t in thresholds.items()
                        if math.isfinite(t)})
    mlflow.log_text(json.dumps(calibration.to_dict(), indent=1), "alarm_calibration.json")
    runs = max((tail.runs for tail in calibration.tails.values()), default=0)
    missing = [kind for kind in thresholds if kind not in calibration.tails]
    said = ", ".join(f"{kind} {t:.1f}" for kind, t in thresholds.items())
    note = f" ({', '.join(missing)}: too few held-out runs, fallback)" if missing else ""
    return (f"alarm thresholds for {DEFAULT_RATE * 1000:g} false alarm per 1,000 healthy runs, calibrated on "
            f"{runs} held-out runs: {said}{note}")


def _log_fold(run: crossval.FoldRun, rows: pd.DataFrame) -> None:
    prefix = f"fold{run.number}"
    mlflow.log_metrics({**verdict.fold_metrics(rows),
                        f"{prefix}_orders_test": run.orders["test"], f"{prefix}_samples_test": run.samples_test,
                        f"{prefix}_network_best_epoch": run.best_epoch,
                        f"{prefix}_network_epochs_run": run.epochs_run,
                        f"{prefix}_network_training_seconds": run.network_seconds,
                        f"{prefix}_gbm_training_seconds": run.gbm_seconds})


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without infinite or NaN values (a ratio to a perfect forecast), which a
    metric store cannot hold faithfully; the comparison text still shows them."""
    return {name: value for name, value in metrics.items() if math.isfinite(value)}


def _log_epoch(result: trainer.EpochResult) -> None:
    mlflow.log_metrics({"train_loss": result.train_loss, "val_loss": result.val_loss,
                        "val_coverage": result.val_coverage, "learning_rate": result.learning_rate},
                       step=result.epoch)


def _params(options: FitOptions, config: trainer.TrainConfig, gbm: GbmConfig, frame: pd.DataFrame,
            parts: list[folds.Fold], final_train: pd.DataFrame, final_validation: pd.DataFrame,
            device, current: _Champion | None) -> dict:
    return {
        **{f"train_{k}": v for k, v in asdict(config).items()},
        **{f"gbm_{k}": v for k, v in asdict(gbm).items()},
        "since": options.since.isoformat() if options.since else "",
        "until": options.until.isoformat() if options.until else "",
        "device": str(device), "min_orders": options.min_orders,
        "features": ",".join(FEATURE_COLUMNS), "target": ("log1p(value / usage scale), standardised per resource; the scale: the run's expected "
                   "total for memory and storage (models/features.py usage_scale), 1 for CPU"),
        "quantiles": "0.1,0.5,0.9", "folds": options.folds,
        "split": (f"{options.folds} folds by order, seeded; the network stops early on "
                  f"{folds.VALIDATION_SHARE:.0%} of each fold's training orders; the final model trains "
                  f"on all orders with {folds.VALIDATION_SHARE:.0%} for early stopping"),
        "verdict": (f"network beats GBM: mean per-resource pinball ratio < {1 - verdict.TIE_MARGIN:.2f} "
                    f"and no resource lost by more than its fold spread"),
        "orders": int(frame["order_id"].nunique()), "rows": len(frame),
        **{f"fold{p.number}_orders_test": p.orders()["test"] for p in parts},
        "orders_final_train": int(final_train["order_id"].nunique()),
        "orders_final_validation": int(final_validation["order_id"].nunique()),
        "champion_version_before": current.version if current else "",
    }


def _current_champion(client: MlflowClient, tracking_uri: str) -> _Champion | None:
    """The champion before this fit, None without one.

    One this code cannot load (saved by an older version of the features) is returned without
    its model: it cannot be re-scored, and live scoring cannot use it either.
    """
    try:
        loaded = load_expected_usage(tracking_uri)
    except RegistryError as exc:
        version = registry.champion_version(client)
        if version is None:
            raise
        logger.warning("%s; it cannot be re-scored", exc)
        return _Champion(version, None, str(exc))
    if loaded is None:
        return None
    model, version = loaded
    return _Champion(version, model)


def _rescored(current: _Champion | None,
              against: verdict.Judgement | None) -> champion_rule.CurrentChampion | None:
    if current is None:
        return None
    if against is None:
        return champion_rule.CurrentChampion(current.version, None, current.problem or "not re-scored")
    return champion_rule.CurrentChampion(current.version, against.ratio, losses=tuple(against.losses))


def predictions_per_second(model: ExpectedUsageModel, frame: pd.DataFrame, rows: int = 16_384) -> float:
    """Batched throughput of ``model.predict`` on ``rows`` rows resampled from ``frame``."""
    sample = tracking.input_example(frame.sample(n=rows, replace=True, random_state=0))
    model.predict(sample.head(64))  # warm-up
    began = time.perf_counter()
    model.predict(sample)
    return rows / max(time.perf_counter() - began, 1e-9)
