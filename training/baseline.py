"""The yardstick: a table of historical quantiles per (task, resource, time-since-start bucket).

What an operator would build by hand from the same training orders. A bucket with too few
samples falls back to (task, resource), then to the resource, then to everything.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.expected_usage import PREDICTION_COLUMNS, QUANTILES

# Seconds since the task started; finer at the start, where usage changes fastest.
BUCKET_EDGES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0, 89.0, 144.0, np.inf)
MIN_SAMPLES = 5


def time_bucket(seconds: pd.Series) -> np.ndarray:
    """The bucket index of each ``seconds`` value (see :data:`BUCKET_EDGES`)."""
    values = pd.to_numeric(seconds, errors="coerce").fillna(0).clip(lower=0).to_numpy()
    return np.searchsorted(np.asarray(BUCKET_EDGES[1:-1]), values, side="right")


class QuantileTableBaseline:
    """Historical P10/P50/P90 looked up by (task, resource, bucket) with fallbacks."""

    LEVELS = (("task", "resource", "bucket"), ("task", "resource"), ("resource",))

    def __init__(self, min_samples: int = MIN_SAMPLES) -> None:
        self.min_samples = min_samples
        self.tables: list[pd.DataFrame] = []
        self.overall: np.ndarray | None = None

    def fit(self, frame: pd.DataFrame) -> "QuantileTableBaseline":
        """Learn the tables from ``frame`` (task, resource, seconds, value)."""
        keyed = _keyed(frame).assign(value=frame["value"].to_numpy(dtype=np.float64))
        self.tables = []
        for keys in self.LEVELS:
            grouped = keyed.groupby(list(keys), observed=True)["value"]
            table = grouped.quantile(list(QUANTILES)).unstack()
            table.columns = PREDICTION_COLUMNS
            counts = grouped.size()
            self.tables.append(table[counts.reindex(table.index) >= self.min_samples])
        self.overall = np.quantile(keyed["value"].to_numpy(), QUANTILES)
        return self

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """p10, p50, p90 for every row of ``frame``; the index is ``frame``'s."""
        keyed = _keyed(frame)
        result = np.full((len(frame), 3), np.nan)
        for keys, table in zip(self.LEVELS, self.tables):
            todo = np.isnan(result[:, 0])
            if not todo.any():
                break
            index = pd.MultiIndex.from_frame(keyed.loc[todo, list(keys)]) if len(keys) > 1 \
                else pd.Index(keyed.loc[todo, keys[0]])
            result[todo] = table.reindex(index).to_numpy(dtype=np.float64)
        todo = np.isnan(result[:, 0])
        result[todo] = self.overall
        return pd.DataFrame(result, columns=PREDICTION_COLUMNS, index=frame.index)


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "task": frame["task"].astype(str).to_numpy(),
        "resource": frame["resource"].astype(str).to_numpy(),
        "bucket": time_bucket(frame["seconds"]),
    })
