"""K folds of whole orders, each with a validation share of its training orders.

Samples of one order are alike (same image, same tasks, same machine state), so a model judged
on rows of orders it trained on looks better than it is: every split here is by order, never by
row. Each order is held out in exactly one fold, so every sample is scored once, and a figure
over K folds comes with its spread, which one random test split cannot show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.errors import InsufficientDataError
from training.data import COLLECT_HINT

logger = logging.getLogger(__name__)

VALIDATION_SHARE = 0.15  # of a fold's training orders: early stopping of the network only


@dataclass(frozen=True)
class Fold:
    """One fold: the network trains on ``train`` and stops early on ``validation``; all models
    are scored on ``test``. The baselines, which need no early stopping, learn from both."""

    number: int  # 1-based
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    def learning(self) -> pd.DataFrame:
        """Every training order of the fold (train and validation)."""
        return pd.concat([self.train, self.validation], ignore_index=True)

    def orders(self) -> dict[str, int]:
        return {name: int(part["order_id"].nunique())
                for name, part in (("train", self.train), ("validation", self.validation), ("test", self.test))}


def order_folds(order_ids: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """The order ids held out by each of ``k`` folds: a seeded shuffle cut into near-equal parts."""
    unique = np.sort(np.unique(order_ids))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {k}")
    if len(unique) < k + 1:  # each fold: at least one test order and two to learn from
        raise InsufficientDataError(f"{len(unique)} order(s) cannot be split into {k} folds "
                                    f"(at least {k + 1} needed); {COLLECT_HINT}")
    shuffled = np.random.default_rng(seed).permutation(unique)
    return [np.sort(part) for part in np.array_split(shuffled, k)]


def hold_out(frame: pd.DataFrame, seed: int, share: float = VALIDATION_SHARE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``frame`` split by order into (train, validation), ``share`` of the orders (at least one)
    in validation and at least one left to train on."""
    order_ids = np.sort(frame["order_id"].unique())
    if len(order_ids) < 2:
        raise InsufficientDataError(f"{len(order_ids)} order(s) cannot be split into train and "
                                    f"validation; {COLLECT_HINT}")
    n_val = min(max(1, round(len(order_ids) * share)), len(order_ids) - 1)
    validation_ids = np.random.default_rng(seed).permutation(order_ids)[:n_val]
    in_validation = frame["order_id"].isin(validation_ids)
    return frame[~in_validation].reset_index(drop=True), frame[in_validation].reset_index(drop=True)


def k_folds(frame: pd.DataFrame, k: int, seed: int) -> list[Fold]:
    """``k`` folds of ``frame`` by whole order (seeded); each order is in exactly one test part."""
    folds = []
    for number, test_ids in enumerate(order_folds(frame["order_id"].to_numpy(), k, seed), start=1):
        in_test = frame["order_id"].isin(test_ids)
        train, validation = hold_out(frame[~in_test], seed + number)
        folds.append(Fold(number, train, validation, frame[in_test].reset_index(drop=True)))
    return folds
