"""The network, the GBM and the quantile table, each trained and scored on the same K folds.

In each fold the network trains on the fold's training orders and stops early on their
validation share; the two baselines, which have nothing to stop early, learn from all of the
fold's training orders. All of them (and the current champion, when there is one) are scored on
the fold's held-out orders. No MLflow here: each finished fold is handed to ``on_fold``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from models.expected_usage import ExpectedUsageModel
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


@dataclass(frozen=True)
class CrossValidation:
    """Every fold's runs and its scores as long rows (fold, model, resource, n, pinball,
    mae_p50, coverage); models :data:`NETWORK`, :data:`GBM`, :data:`TABLE` and, when a champion
    was given, :data:`CHAMPION`."""

    folds: tuple[FoldRun, ...]
    metrics: pd.DataFrame
    seconds: float

    def orders(self) -> int:
        return sum(run.orders["test"] for run in self.folds)

    def samples(self) -> int:
        return sum(run.samples_test for run in self.folds)


def cross_validate(folds: Sequence[Fold], config: trainer.TrainConfig, device: torch.device | str = "cpu",
                   champion: ExpectedUsageModel | None = None, gbm: GbmConfig | None = None,
                   progress: bool = True,
                   on_fold: Callable[[FoldRun, pd.DataFrame], None] | None = None) -> CrossValidation:
    """Train and score every model on every fold, in order."""
    began = time.monotonic()
    runs: list[FoldRun] = []
    parts: list[pd.DataFrame] = []
    gbm = gbm or GbmConfig(random_state=config.seed)
    for fold in folds:
        logger.info("fold %d/%d: %s orders (train/validation/test)", fold.number, len(folds), fold.orders())
        run, rows = _one_fold(fold, config, device, champion, gbm, progress)
        runs.append(run)
        parts.append(rows)
        if on_fold is not None:
            on_fold(run, rows)
    metrics = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return CrossValidation(tuple(runs), metrics, time.monotonic() - began)


def _one_fold(fold: Fold, config: trainer.TrainConfig, device: torch.device | str,
              champion: ExpectedUsageModel | None, gbm: GbmConfig, progress: bool) -> tuple[FoldRun, pd.DataFrame]:
    outcome = trainer.fit(fold.train, fold.validation, config, device, progress=progress)
    network = outcome.model.to("cpu")
    learning = fold.learning()
    began = time.monotonic()
    boosted = GradientBoostingBaseline(gbm).fit(learning)
    gbm_seconds = time.monotonic() - began
    predictions = {
        NETWORK: network.predict(fold.test),
        GBM: boosted.predict(fold.test),
        TABLE: QuantileTableBaseline().fit(learning).predict(fold.test),
    }
    if champion is not None:
        predictions[CHAMPION] = champion.predict(fold.test)
    rows = pd.concat([score(fold.test, predicted).rows(fold.number, name)
                      for name, predicted in predictions.items()], ignore_index=True)
    run = FoldRun(fold.number, fold.orders(), len(fold.test), outcome.best_epoch, len(outcome.history),
                  outcome.seconds, gbm_seconds)
    return run, rows
