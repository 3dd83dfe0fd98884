"""The network, the GBM and the quantile table, each trained and scored on the same folds.

In each fold the network trains on the fold's training orders and stops early on their
validation share; the two baselines, which have nothing to stop early, learn from all of the
fold's training orders. All of them (and the current champion, when there is one) are scored on
the fold's held-out orders. The GBM is given what the network is given: the work model's
progress and its scale (models/features.py), so the comparison is between the two learners of
the residual, not between a model that extrapolates and one that cannot. Beside the K folds,
two that ask what the K folds cannot (training/folds.py): an **extrapolation** fold (images up
to twice the pixels of any it trained on) and an **unseen-parameter** fold.

Each fold's network also gives the alarm statistics of its held-out runs (models/alarms.py):
what ``fit`` calibrates the thresholds on, runs no model trained on. The extrapolation and
unseen-parameter folds' runs count too: thresholds set on runs like the history alone would
be too tight for the larger images and new settings the model is asked about. And how far
its held-out samples lie outside its band (``misses``): ``fit`` sets the final network's band
edges on them, so that its P10-P90 holds 80 % of samples no network trained on, not 80 % of
its own validation share, which is like its training orders.
No MLflow here: each finished fold is handed to ``on_fold``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from models.alarms import alarm_statistics, half_width_floors
from models.expected_usage import ExpectedUsageModel
from models.features import usage_scale
from models.work import ExpectedWork, with_progress
from services.catalog import work_powers
from training import trainer
from training.baseline import QuantileTableBaseline
from training.folds import Fold
from training.gbm_baseline import GbmConfig, GradientBoostingBaseline
from training.metrics import score

logger = logging.getLogger(__name__)

NETWORK, GBM, TABLE, CHAMPION = "network", "gbm", "table", "champion"


@dataclass(frozen=True)
class FoldRun:
    """How one fold went, besides its scores."""

    number: int
    orders: dict[str, int]
    samples_test: int
    best_epoch: int
    epochs_run: int
    network_seconds: float
    gbm_seconds: float
    kind: str = "k-fold"  # or "extrapolation", "unseen-parameter" (training/folds.py)


@dataclass(frozen=True)
class CrossValidation:
    """Every fold's runs and its scores as long rows (fold, model, resource, n, pinball,
    mae_p50, coverage); models :data:`NETWORK`, :data:`GBM`, :data:`TABLE` and, when a champion
    was given, :data:`CHAMPION`."""

    folds: tuple[FoldRun, ...]
    metrics: pd.DataFrame
    seconds: float
    alarm_statistics: pd.DataFrame = field(default_factory=pd.DataFrame)  # every fold's held-out runs
    misses: dict[str, np.ndarray] = field(default_factory=dict)  # every fold's held-out samples (trainer.misses)

    def orders(self) -> int:
        return sum(run.orders["test"] for run in self.folds)

    def samples(self) -> int:
        return sum(run.samples_test for run in self.folds)


def cross_validate(folds: Sequence[Fold], config: trainer.TrainConfig, device: torch.device | str = "cpu",
                   champion: ExpectedUsageModel | None = None, gbm: GbmConfig | None = None,
                   progress: bool = True,
                   on_fold: Callable[[FoldRun, pd.DataFrame], None] | None = None) -> CrossValidation:
    """Train and score every model on every fold, in order; then each fold's alarm statistics,
    its network's bands set on the other folds' held-out samples as ``fit`` sets the final
    network's on all of them (the thresholds are calibrated on bands drawn as live ones are)."""
    began = time.monotonic()
    runs: list[FoldRun] = []
    parts: list[pd.DataFrame] = []
    trained: list[tuple[Fold, ExpectedUsageModel, dict[str, np.ndarray]]] = []
    gbm = gbm or GbmConfig(random_state=config.seed)
    for fold in folds:
        logger.info("fold %d/%d (%s): %s orders (train/validation/test)", fold.number, len(folds), fold.kind,
                    fold.orders())
        run, rows, network = _one_fold(fold, config, device, champion, gbm, progress)
        trained.append((fold, network, trainer.misses(network, fold.test)))
        runs.append(run)
        parts.append(rows)
        if on_fold is not None:
            on_fold(run, rows)
    statistics = []
    for fold, network, _ in trained:
        network.widen_to(_pooled([missed for other, _, missed in trained if other is not fold]))
        bands = network.predict(fold.test).assign(floor=network.floors(fold.test))
        statistics.append(alarm_statistics(fold.test, bands, network.work).assign(fold=fold.number,
                                                                                   fold_kind=fold.kind))
    metrics = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    stats = pd.concat(statistics, ignore_index=True) if statistics else pd.DataFrame()
    return CrossValidation(tuple(runs), metrics, time.monotonic() - began, stats,
                           _pooled([missed for _, _, missed in trained]))


def _pooled(misses: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per resource, the misses of several folds together."""
    resources = sorted({resource for missed in misses for resource in missed})
    return {resource: np.concatenate([missed[resource] for missed in misses if resource in missed])
            for resource in resources}


def _one_fold(fold: Fold, config: trainer.TrainConfig, device: torch.device | str,
              champion: ExpectedUsageModel | None, gbm: GbmConfig,
              progress: bool) -> tuple[FoldRun, pd.DataFrame, ExpectedUsageModel]:
    outcome = trainer.fit(fold.train, fold.validation, config, device, progress=progress)
    network = outcome.model.to("cpu")
    learning = fold.learning()
    began = time.monotonic()
    boosted = OnWork(GradientBoostingBaseline(gbm, features=GBM_FEATURES)).fit(learning)
    gbm_seconds = time.monotonic() - began
    predictions = {
        NETWORK: network.predict(fold.test),
        GBM: boosted.predict(fold.test),
        TABLE: QuantileTableBaseline().fit(learning).predict(fold.test),
    }
    if champion is not None:
        predictions[CHAMPION] = champion.predict(fold.test)
    rows = pd.concat([score(fold.test, predicted).rows(fold.number, name)
                      for name, predicted in predictions.items()], ignore_index=True).assign(kind=fold.kind)
    run = FoldRun(fold.number, fold.orders(), len(fold.test), outcome.best_epoch, len(outcome.history),
                  outcome.seconds, gbm_seconds, fold.kind)
    return run, rows, network


GBM_FEATURES = ("task", "resource", "position", "prev_task", "image_pixels", "node_cpu_pressure", "interval_s",
                "progress")
"""The GBM's inputs: the network's (models/features.py), progress included."""


class OnWork:
    """A baseline given what the network is given: the work model fitted on its training
    rows, each row's progress, and values divided by their usage scale (models/features.py)."""

    def __init__(self, base) -> None:
        self.base = base
        self.work = ExpectedWork()
        self.fill: dict[str, float] = {}

    def fit(self, frame: pd.DataFrame) -> "OnWork":
        self.work = ExpectedWork.fit(frame, work_powers())
        frame = with_progress(frame, self.work)
        scale = usage_scale(frame, self.work)
        resources = frame["resource"].astype(str).to_numpy()
        self.fill = {r: float(pd.Series(scale[resources == r]).median()) for r in set(resources)}
        self.base.fit(frame.assign(value=frame["value"].to_numpy(dtype="float64") / scale))
        return self

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = with_progress(frame, self.work)
        return self.base.predict(frame).mul(usage_scale(frame, self.work, self.fill), axis=0)

    def floors(self, frame: pd.DataFrame) -> np.ndarray:
        """The network's band floors (models.alarms.half_width_floors), on this work model."""
        return half_width_floors(frame["resource"].astype(str).to_numpy(), usage_scale(frame, self.work, self.fill))
