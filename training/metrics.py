"""How good a P10/P50/P90 forecast is on one set of held-out orders, per resource.

Per resource, in the resource's own units: MAE of the median, mean pinball loss over the three
quantiles, and how often the value falls inside the P10-P90 band (nominal 80%). These are what
:mod:`training.verdict` compares across folds; a pooled figure over all resources would let the
resource with the largest numbers (or, on the log scale, the most samples) decide alone. The
pooled ``log1p`` pinball is still computed, as a figure for the MLflow history only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.expected_usage import QUANTILES

NOMINAL_COVERAGE = QUANTILES[2] - QUANTILES[0]
PER_RESOURCE = ("pinball", "mae_p50", "coverage")


@dataclass(frozen=True)
class Scores:
    """Per-resource table (index resource; n, mae_p50, pinball, coverage) and the overall."""

    per_resource: pd.DataFrame
    pinball_log: float
    coverage: float
    n: int

    def rows(self, fold: int, model: str) -> pd.DataFrame:
        """The per-resource table as long rows: fold, model, resource, n and :data:`PER_RESOURCE`."""
        table = self.per_resource.reset_index()
        table.insert(0, "model", model)
        table.insert(0, "fold", fold)
        return table[["fold", "model", "resource", "n", *PER_RESOURCE]]


def pinball(values: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pinball loss per row, averaged over the quantiles; ``predicted`` is (rows, 3)."""
    taus = np.asarray(QUANTILES)
    error = values[:, None] - predicted
    return np.maximum(taus * error, (taus - 1) * error).mean(axis=1)


def score(frame: pd.DataFrame, predicted: pd.DataFrame) -> Scores:
    """Score ``predicted`` (p10, p50, p90, same index) against ``frame``'s values."""
    values = frame["value"].to_numpy(dtype=np.float64)
    quantiles = predicted[["p10", "p50", "p90"]].to_numpy(dtype=np.float64)
    inside = (values >= quantiles[:, 0]) & (values <= quantiles[:, 2])
    rows = pd.DataFrame({
        "resource": frame["resource"].astype(str).to_numpy(),
        "abs_error": np.abs(values - quantiles[:, 1]),
        "pinball": pinball(values, quantiles),
        "inside": inside.astype(float),
    })
    per_resource = rows.groupby("resource").agg(
        n=("abs_error", "size"), mae_p50=("abs_error", "mean"),
        pinball=("pinball", "mean"), coverage=("inside", "mean"),
    )
    logged = pinball(np.log1p(values.clip(min=0)), np.log1p(quantiles.clip(min=0)))
    return Scores(per_resource, float(logged.mean()) if len(logged) else float("nan"),
                  float(inside.mean()) if len(inside) else float("nan"), len(values))
