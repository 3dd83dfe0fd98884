"""Whether the network beats a reference model over K folds, and the printed comparison.

The rule, per resource and in the resource's own units (resources differ by orders of
magnitude, so no pooled figure may let one of them decide):

- **per resource**: the mean over folds of its per-fold pinball loss, with the standard
  deviation over folds as its spread. The network *loses* a resource when the mean of its
  per-fold difference to the reference is larger than the standard deviation of that
  difference over the folds (the fold-to-fold noise) and than a tenth of the resource's
  resolution (below), *wins* it when smaller than minus that, and is *level* otherwise. With
  one fold the spread is 0.
- **overall**: the network wins when its pinball loss relative to the reference, averaged over
  resources (the mean of the per-resource ratios of fold means), is below 1 by more than
  :data:`TIE_MARGIN`, **and** it loses no resource. Better on average but clearly worse on
  one resource is not a win: that resource's deviations would be flagged wrongly.

A ratio of two losses far below what a sample can resolve means nothing (a resource that is
nearly always 0, like ``disk_read`` from the page cache, gives 0.1 KiB/s against 0.03 KiB/s:
"3.6 times"), so each loss is counted on top of a tenth of the resource's resolution, the
band's smallest half-width (models/alarms.py ``MIN_HALF_WIDTH``: 5 % of a core, 2 MiB,
64 KiB/s). A resource the reference forecasts perfectly and without a resolution has no
ratio; it is left out of the average and judged by the per-resource rule alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.alarms import MIN_HALF_WIDTH
from training.crossval import CHAMPION, GBM, NETWORK, TABLE
from training.metrics import NOMINAL_COVERAGE

logger = logging.getLogger(__name__)

RESOLUTION_SHARE = 0.1  # of a resource's MIN_HALF_WIDTH, added to each loss of a ratio
TIE_MARGIN = 0.01  # closer than 1% to the reference on average is a tie, not a win
LABELS = {NETWORK: "network", GBM: "GBM", TABLE: "quantile table", CHAMPION: "champion"}


@dataclass(frozen=True)
class ResourceVerdict:
    """One resource's mean pinball loss of the challenger and the reference over the folds."""

    resource: str
    challenger: float
    challenger_spread: float
    reference: float
    reference_spread: float
    difference: float  # mean over folds of (challenger - reference)
    spread: float  # standard deviation over folds of that difference
    folds: int
    resolution: float = 0.0  # added to both losses in the ratio (module docstring)

    @property
    def outcome(self) -> str:
        """``worse``, ``better`` or ``level``: the challenger's, beyond the spread (and beyond
        a tenth of the resource's resolution: a smaller difference is no difference) or not."""
        margin = max(self.spread, self.resolution)
        if self.difference > margin:
            return "worse"
        if self.difference < -margin:
            return "better"
        return "level"

    @property
    def ratio(self) -> float:
        """(challenger + resolution) / (reference + resolution); NaN when that divides by 0
        (1 when both are 0)."""
        if self.reference + self.resolution > 0:
            return (self.challenger + self.resolution) / (self.reference + self.resolution)
        return 1.0 if self.challenger == 0 else float("nan")


@dataclass(frozen=True)
class Judgement:
    """The challenger against the reference: per resource and overall."""

    challenger: str
    reference: str
    resources: tuple[ResourceVerdict, ...]
    margin: float = TIE_MARGIN

    @property
    def ratio(self) -> float:
        """Mean over resources of the pinball ratio; inf when no resource has one."""
        ratios = [r.ratio for r in self.resources if np.isfinite(r.ratio)]
        return float(np.mean(ratios)) if ratios else float("inf")

    @property
    def losses(self) -> list[str]:
        """Resources the challenger loses by more than their spread."""
        return [r.resource for r in self.resources if r.outcome == "worse"]

    @property
    def wins(self) -> bool:
        """The rule of the module docstring."""
        return bool(self.resources) and self.ratio < 1 - self.margin and not self.losses


def judge(metrics: pd.DataFrame, challenger: str = NETWORK, reference: str = GBM,
          margin: float = TIE_MARGIN) -> Judgement:
    """``challenger`` against ``reference`` on ``metrics`` (long rows: fold, model, resource,
    pinball, ...), over the folds where both were scored on the resource."""
    wide = metrics.pivot_table(index=["resource", "fold"], columns="model", values="pinball", aggfunc="first")
    verdicts = []
    for resource, per_fold in wide.groupby(level="resource", sort=True):
        if challenger not in per_fold or reference not in per_fold:
            continue
        both = per_fold[[challenger, reference]].dropna()
        if both.empty:
            continue
        difference = both[challenger] - both[reference]
        verdicts.append(ResourceVerdict(
            str(resource), float(both[challenger].mean()), _std(both[challenger]),
            float(both[reference].mean()), _std(both[reference]),
            float(difference.mean()), _std(difference), len(both), _resolution(str(resource))))
    return Judgement(challenger, reference, tuple(verdicts), margin)


def sentences(judgement: Judgement, others: tuple[Judgement, ...] = ()) -> str:
    """The verdict in plain sentences: one per resource, then the overall one; ``others``
    (the network against other references) add one sentence each."""
    name = LABELS.get(judgement.challenger, judgement.challenger)
    ref = LABELS.get(judgement.reference, judgement.reference)
    folds = max((r.folds for r in judgement.resources), default=0)
    lines = [f"Mean pinball loss per resource over {folds} folds (mean ± std over the folds, in the "
             f"resource's units; lower is better):"]
    for r in judgement.resources:
        outcome = {"worse": f"{ref} better", "better": f"{name} better",
                   "level": "level (the difference is within the fold-to-fold spread)"}[r.outcome]
        lines.append(f"  {r.resource}: {name} {_pm(r.challenger, r.challenger_spread)}, "
                     f"{ref} {_pm(r.reference, r.reference_spread)}: {outcome}")
    lines.append(_overall(judgement, name, ref))
    for other in others:
        lines.append(_against(other, name))
    return "\n".join(lines)


def _overall(judgement: Judgement, name: str, ref: str) -> str:
    count = len(judgement.resources)
    figure = (f"its pinball loss is {_ratio(judgement.ratio)} times the {ref}'s on average over "
              f"{count} resource{'' if count == 1 else 's'} (a win needs below {1 - judgement.margin:.2f})")
    if judgement.wins:
        return (f"Overall the {name} beats the {ref}: {figure}, and it loses no resource by more than "
                f"the spread.")
    reasons = [figure]
    if judgement.losses:
        reasons.append(f"it loses {', '.join(judgement.losses)} by more than the spread")
    return (f"Overall the {name} does NOT beat the {ref}: {' and '.join(reasons)}; the {ref} is the "
            f"better forecast for now.")


def _against(other: Judgement, name: str) -> str:
    ref = LABELS.get(other.reference, other.reference)
    losses = f", worse on {', '.join(other.losses)}" if other.losses else ""
    figure = f"the {name}'s pinball loss is {_ratio(other.ratio)} times the {ref}'s on average{losses}"
    if other.reference == CHAMPION:  # judged by the champion rule (training/champion.py), not this one
        return f"Against the current champion, re-scored on the same held-out orders: {figure}."
    return f"Against the {ref}: {figure}; it {'beats' if other.wins else 'does NOT beat'} it."


def table(metrics: pd.DataFrame, orders: int, seed: int) -> str:
    """The printable comparison: per resource, each model's mean ± std over the K folds; then
    a line per special fold (extrapolation, unseen parameters) with the network's pinball
    loss relative to the GBM's per resource."""
    special = metrics[metrics["kind"] != "k-fold"] if "kind" in metrics else metrics.iloc[:0]
    metrics = metrics[metrics["kind"] == "k-fold"] if "kind" in metrics else metrics
    return "\n".join([_kfold_table(metrics, orders, seed), *_special_lines(special)])


def _special_lines(special: pd.DataFrame) -> list[str]:
    lines = []
    for (fold, kind), part in special.groupby(["fold", "kind"], sort=True):
        wide = part.pivot_table(index="resource", columns="model", values=["pinball", "coverage"], aggfunc="first")
        if NETWORK not in wide["pinball"] or GBM not in wide["pinball"]:
            continue
        ratios = [f"{r} {_ratio(_resolved(wide['pinball'][NETWORK][r], wide['pinball'][GBM][r], r))}x"
                  for r in wide.index if wide["pinball"][GBM][r] + _resolution(r) > 0]
        coverage = ", ".join(f"{r} {wide['coverage'][NETWORK][r]:.0%}" for r in wide.index)
        lines.append(f"{kind} fold (fold {fold}, {int(part['n'].max())} samples): network pinball / GBM's: "
                     f"{', '.join(ratios)}; network P10-P90 coverage: {coverage}")
    return lines


def _resolution(resource: str) -> float:
    return RESOLUTION_SHARE * MIN_HALF_WIDTH.get(str(resource), 0.0)


def _resolved(challenger: float, reference: float, resource: str) -> float:
    """The ratio of two losses as the verdict counts it (module docstring)."""
    return (challenger + _resolution(resource)) / (reference + _resolution(resource))


def _kfold_table(metrics: pd.DataFrame, orders: int, seed: int) -> str:
    folds = int(metrics["fold"].nunique()) if len(metrics) else 0
    models = [m for m in (NETWORK, GBM, TABLE, CHAMPION) if m in set(metrics["model"])]
    stats = metrics.groupby(["resource", "model"]).agg(
        n=("n", "sum"), **{f"{m}_{a}": (m, "mean" if a == "mean" else _std)
                           for m in ("pinball", "mae_p50", "coverage") for a in ("mean", "std")})
    samples = int(stats.xs(models[0], level="model")["n"].sum()) if models else 0
    head = (f"{folds} folds by whole order (seed {seed}): {orders} orders, {samples} samples, each held "
            f"out once; mean ± std over the folds, in each resource's units (lower is better, "
            f"coverage should be near {NOMINAL_COVERAGE:.0%})")
    header = (f"{'resource':<11} {'model':<14} {'n':>7}  {'pinball loss':^20}  {'MAE of P50':^20}  "
              f"{'P10-P90 coverage':^17}").rstrip()
    lines = [head, header, "-" * len(header)]
    for resource in sorted(stats.index.get_level_values("resource").unique()):
        for i, model in enumerate(m for m in models if (resource, m) in stats.index):
            row = stats.loc[(resource, model)]
            lines.append(f"{resource if i == 0 else '':<11} {LABELS[model]:<14} "
                         f"{int(row['n']) if i == 0 else '':>7}  "
                         f"{_num(row['pinball_mean']):>9} ± {_num(row['pinball_std']):<8}  "
                         f"{_num(row['mae_p50_mean']):>9} ± {_num(row['mae_p50_std']):<8}  "
                         f"{_pm_percent(row['coverage_mean'], row['coverage_std'])}".rstrip())
    if CHAMPION in models:
        lines.append("(champion: the registered champion re-scored on these orders, some of which it "
                     "may have trained on)")
    return "\n".join(lines)


def summary_metrics(metrics: pd.DataFrame) -> dict[str, float]:
    """``cv_{model}_{metric}_{resource}_mean`` and ``_std`` for MLflow."""
    result: dict[str, float] = {}
    for (model, resource), part in metrics.groupby(["model", "resource"]):
        for name in ("pinball", "mae_p50", "coverage"):
            result[f"cv_{model}_{name}_{metric_name(resource)}_mean"] = float(part[name].mean())
            result[f"cv_{model}_{name}_{metric_name(resource)}_std"] = _std(part[name])
    return result


def fold_metrics(metrics: pd.DataFrame) -> dict[str, float]:
    """``fold{k}_{model}_{metric}_{resource}`` for MLflow."""
    return {f"fold{int(row.fold)}_{row.model}_{name}_{metric_name(row.resource)}": float(getattr(row, name))
            for row in metrics.itertuples(index=False) for name in ("pinball", "mae_p50", "coverage")}


def metric_name(text: str) -> str:
    """``text`` with what MLflow refuses in a metric name replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(text))


def _std(values: pd.Series) -> float:
    """Sample standard deviation over folds; 0 with a single fold."""
    std = float(pd.Series(values).std(ddof=1)) if len(values) > 1 else 0.0
    return std if np.isfinite(std) else 0.0


def _pm(mean: float, std: float) -> str:
    return f"{_num(mean)} ± {_num(std)}"


def _pm_percent(mean: float, std: float) -> str:
    return f"{mean:>6.1%} ± {std:<5.1%}" if np.isfinite(mean) else f"{'-':>6}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else "infinitely many"


def _num(value: float) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
