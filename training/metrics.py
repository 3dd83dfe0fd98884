"""How good a P10/P50/P90 forecast is, per resource and overall.

Per resource, in the resource's own units: MAE of the median, mean pinball loss over the three
quantiles, and how often the value falls inside the P10-P90 band (nominal 80%). Overall, the
**test metric** that decides between models: the mean pinball loss on the ``log1p`` scale over
every sample. Resources differ by orders of magnitude (KiB/s against percent), so a sum in
original units would let one resource decide; on the log scale each counts, and it is the
scale the model is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.expected_usage import QUANTILES

NOMINAL_COVERAGE = QUANTILES[2] - QUANTILES[0]
TEST_METRIC = "pinball_log"
TIE_MARGIN = 0.01  # closer than 1% to the baseline is a tie, not a win


@dataclass(frozen=True)
class Scores:
    """Per-resource table (index resource; n, mae_p50, pinball, coverage) and the overall."""

    per_resource: pd.DataFrame
    pinball_log: float
    coverage: float
    n: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat ``{prefix}_{name}`` metrics for MLflow."""
        metrics = {f"{prefix}_pinball_log": self.pinball_log, f"{prefix}_coverage": self.coverage}
        for resource, row in self.per_resource.iterrows():
            for name in ("mae_p50", "pinball", "coverage"):
                metrics[f"{prefix}_{name}_{resource}"] = float(row[name])
        return metrics


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


def side_by_side(model: Scores, baseline: Scores, orders: int) -> str:
    """The printable comparison table, model first, baseline after each ``|``."""
    head = (f"test split: {orders} orders, {model.n} samples; each cell is model | baseline "
            f"(lower is better, coverage should be near {NOMINAL_COVERAGE:.0%})")
    header = f"{'resource':<11} {'n':>6}  {'MAE of P50':>21}  {'pinball loss':>21}  {'P10-P90 coverage':>17}"
    lines = [head, header, "-" * len(header)]
    for resource, row in model.per_resource.iterrows():
        base = baseline.per_resource.loc[resource]
        lines.append(f"{resource:<11} {int(row['n']):>6}  {_pair(row['mae_p50'], base['mae_p50'])}  "
                     f"{_pair(row['pinball'], base['pinball'])}  "
                     f"{row['coverage']:>7.1%} | {base['coverage']:>7.1%}")
    lines.append(f"{'all':<11} {model.n:>6}  {'':>21}  {_pair(model.pinball_log, baseline.pinball_log)}  "
                 f"{model.coverage:>7.1%} | {baseline.coverage:>7.1%}   (pinball on the log1p scale)")
    return "\n".join(lines)


def verdict(model: Scores, baseline: Scores, margin: float = TIE_MARGIN) -> str:
    """One plain sentence: does the model beat the baseline on the test metric?

    Within ``margin`` (relative) of the baseline counts as level, not as a win.
    """
    worse_mae = [str(r) for r, row in model.per_resource.iterrows()
                 if row["mae_p50"] > baseline.per_resource.loc[r, "mae_p50"]]
    note = f"; its median is worse than the baseline's for: {', '.join(worse_mae)}" if worse_mae else ""
    figures = (f"mean pinball loss (log1p scale) {model.pinball_log:.5f} against the baseline's "
               f"{baseline.pinball_log:.5f}")
    if beats(model, baseline, margin):
        return f"The model beats the baseline on the test orders: {figures}{note}."
    level = abs(model.pinball_log - baseline.pinball_log) <= margin * abs(baseline.pinball_log)
    how = f"it is level with it (within {margin:.0%})" if level else "it is worse"
    return (f"The model does NOT beat the baseline on the test orders: {figures}, {how}; "
            f"collect more varied history before relying on it{note}.")


def beats(model: Scores, baseline: Scores, margin: float = TIE_MARGIN) -> bool:
    """Whether the model's test metric is lower than the baseline's by more than ``margin``."""
    return model.pinball_log < baseline.pinball_log * (1 - margin)


def _pair(model: float, baseline: float) -> str:
    return f"{_num(model):>9} | {_num(baseline):>9}"


def _num(value: float) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
