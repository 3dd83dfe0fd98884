"""The second yardstick: gradient-boosted quantile trees per resource, on the network's features.

A table of historical quantiles is easy to beat: it ignores the image size, the position and
the previous task. Boosted trees on the same features as the network are what a careful
engineer would try before a network, so a network that does not beat them is not worth its
cost. One :class:`~sklearn.ensemble.HistGradientBoostingRegressor` per quantile and resource,
fit like the network on ``log1p(value)`` (quantiles survive the monotone transform), predicted
back with ``expm1``; the three quantiles are sorted per row so they never cross.

The feature matrix is built from :data:`models.features.FEATURE_COLUMNS` and
:data:`~models.features.CATEGORICAL` as they are when the baseline is made, never from a list
of its own: a column added there is used here. Categories become integer codes learnt at fit
(an unseen one is "missing", which the trees route like missing values); every other column is
numeric (trees need no scaling or logs). The ``resource`` column selects the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from models.expected_usage import PREDICTION_COLUMNS, QUANTILES
from models.features import CATEGORICAL, FEATURE_COLUMNS

logger = logging.getLogger(__name__)

RESOURCE = "resource"
MAX_CATEGORIES = 250  # the trees bin a category per code, at most 255 bins; rarer ones are "missing"


@dataclass(frozen=True)
class GbmConfig:
    """Sizes of the trees; small enough for a few seconds on ~50k rows on 2 cores."""

    max_iter: int = 150
    learning_rate: float = 0.1
    # Small trees with large leaves: a leaf's value is a quantile of its residuals, noisy in a
    # small leaf. On generated data (training/synthetic.py) 31 leaves of 20 rows gave held-out
    # bands covering 67% instead of 80% and a worse pinball loss than 7 leaves of 50 rows (73%).
    max_leaf_nodes: int = 7
    min_samples_leaf: int = 50
    min_rows: int = 40  # fewer rows of a resource: its empirical quantiles instead of trees
    random_state: int = 0
    # OpenMP threads of the trees. One: on a machine shared with running orders (2 cores and a
    # busy neighbour) two spinning OpenMP threads made a fit 8 times slower, not faster.
    threads: int = 1


@dataclass(frozen=True)
class _Trees:
    """One resource's three models and the matrix columns they read (those with any value)."""

    columns: np.ndarray
    models: tuple[HistGradientBoostingRegressor, ...]

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return np.column_stack([m.predict(matrix[:, self.columns]) for m in self.models])


@dataclass(frozen=True)
class _Fitted:
    """What :meth:`GradientBoostingBaseline.fit` learnt."""

    vocabularies: dict[str, dict[str, int]]
    models: dict[str, _Trees]
    constants: dict[str, np.ndarray]  # log1p quantiles of resources with too few rows
    overall: np.ndarray  # log1p quantiles of everything: for a resource never seen


@dataclass
class GradientBoostingBaseline:
    """P10/P50/P90 per resource from boosted quantile trees; ``fit(frame)`` then ``predict(frame)``."""

    config: GbmConfig = field(default_factory=GbmConfig)
    features: tuple[str, ...] = field(default_factory=lambda: tuple(FEATURE_COLUMNS))
    categorical: tuple[str, ...] = field(default_factory=lambda: tuple(CATEGORICAL))
    _fitted: _Fitted | None = field(default=None, init=False, repr=False)

    @property
    def inputs(self) -> list[str]:
        """The columns of the feature matrix: every feature but the resource."""
        return [c for c in self.features if c != RESOURCE]

    def fit(self, frame: pd.DataFrame) -> "GradientBoostingBaseline":
        """Learn from ``frame`` (the feature columns, ``resource`` and ``value``)."""
        inputs = self.inputs
        vocabularies = {c: _vocabulary(frame, c) for c in inputs if c in self.categorical}
        mask = np.array([c in vocabularies for c in inputs], dtype=bool)
        matrix = _matrix(frame, inputs, vocabularies)
        target = np.log1p(frame["value"].to_numpy(dtype=np.float64).clip(min=0))
        resources = frame[RESOURCE].astype(str).to_numpy()
        models: dict[str, _Trees] = {}
        constants: dict[str, np.ndarray] = {}
        with threadpool_limits(self.config.threads):
            self._fit_resources(matrix, target, resources, mask, models, constants)
        overall = np.quantile(target, QUANTILES) if len(target) else np.zeros(len(QUANTILES))
        self._fitted = _Fitted(vocabularies, models, constants, overall)
        logger.debug("GBM baseline: %d resource(s) with trees, %d with constants", len(models), len(constants))
        return self

    def _fit_resources(self, matrix: np.ndarray, target: np.ndarray, resources: np.ndarray,
                       mask: np.ndarray, models: dict[str, _Trees], constants: dict[str, np.ndarray]) -> None:
        for resource in sorted(set(resources)):
            rows = resources == resource
            # A column with no value for this resource (a feature not measured yet) tells
            # nothing, and the trees cannot bin it.
            columns = np.flatnonzero(~np.isnan(matrix[rows]).all(axis=0))
            if rows.sum() < self.config.min_rows or not len(columns):
                constants[resource] = np.quantile(target[rows], QUANTILES)
                continue
            x = matrix[rows][:, columns]
            models[resource] = _Trees(columns, tuple(self._tree(q, mask[columns]).fit(x, target[rows])
                                                     for q in QUANTILES))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """p10, p50, p90 for every row of ``frame``, in original units; the index is ``frame``'s."""
        if self._fitted is None:
            raise RuntimeError("GradientBoostingBaseline.predict before fit")
        fitted = self._fitted
        matrix = _matrix(frame, self.inputs, fitted.vocabularies)
        resources = frame[RESOURCE].astype(str).to_numpy()
        logged = np.tile(fitted.overall, (len(frame), 1))
        with threadpool_limits(self.config.threads):
            for resource in set(resources):
                rows = resources == resource
                if resource in fitted.models:
                    logged[rows] = fitted.models[resource].predict(matrix[rows])
                elif resource in fitted.constants:
                    logged[rows] = fitted.constants[resource]
        values = np.expm1(np.sort(logged, axis=1)).clip(min=0.0)
        return pd.DataFrame(values, columns=PREDICTION_COLUMNS, index=frame.index)

    def _tree(self, quantile: float, categorical: np.ndarray) -> HistGradientBoostingRegressor:
        config = self.config
        return HistGradientBoostingRegressor(
            loss="quantile", quantile=quantile, max_iter=config.max_iter,
            learning_rate=config.learning_rate, max_leaf_nodes=config.max_leaf_nodes,
            min_samples_leaf=config.min_samples_leaf, early_stopping=False,
            categorical_features=categorical if categorical.any() else None,
            random_state=config.random_state)


def _vocabulary(frame: pd.DataFrame, column: str) -> dict[str, int]:
    """Codes of the most frequent categories of ``column`` (sorted, for repeatable codes)."""
    if column not in frame:
        return {}
    counts = frame[column].astype(str).value_counts()
    kept = sorted(counts.index[:MAX_CATEGORIES])
    return {name: code for code, name in enumerate(kept)}


def _matrix(frame: pd.DataFrame, inputs: list[str], vocabularies: dict[str, dict[str, int]]) -> np.ndarray:
    """Float matrix, one column per input; unknown categories and absent columns are NaN."""
    columns = []
    for name in inputs:
        if name not in frame:
            columns.append(np.full(len(frame), np.nan))
        elif name in vocabularies:
            codes = frame[name].astype(str).map(vocabularies[name])
            columns.append(codes.to_numpy(dtype=np.float64, na_value=np.nan))
        else:
            columns.append(pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64,
                                                                                 na_value=np.nan))
    return np.column_stack(columns) if columns else np.empty((len(frame), 0))
