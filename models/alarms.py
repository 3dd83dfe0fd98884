"""When a deviation is an alarm: the policy, the scores and thresholds set to a false-alarm budget.

Two kinds of verdict, each per resource (a **kind** below is one verdict on one resource):

- **per sample**, while a task runs: a sample's score is its signed distance from the band's
  median in standard-deviation equivalents (:func:`band_score`); :data:`ALARMS` says which side
  of which resource may alarm, and ``consecutive`` samples in a row beyond the kind's threshold
  are an anomaly. A run's statistic for the kind is the largest score its run of
  ``consecutive`` samples all reach (:func:`streak_statistic`): it alarms exactly when that
  exceeds the threshold. A run with fewer samples cannot alarm this way.
- **per run**, on its totals (:mod:`models.runs`): ``(log(total + floor) - expected) / spread``
  against the work model (:mod:`models.work`), above only: a regression is more work, memory
  or bytes; less is a stall, which the samples show. Decided at the run's end; the CPU time is
  also checked while the task runs, so a runaway is caught before it ends (an overrun).

**Thresholds are calibrated, not hand-set.** At ``fit`` every kind's statistic is computed on
runs the model did not train on (each fold's network on its held-out orders) and its upper
tail is summarised (:class:`TailFit`). A budget of ``rate`` false alarms per healthy run is
split evenly over the kinds, and each kind's threshold is where its tail leaves that share.
With n held-out runs an empirical (conformal) quantile only reaches a level of 1/(n+1), far
from 1/8,000; beyond it the tail is extrapolated: run totals (log-normal by nature) with a
half-normal fitted to the runs above the median, the per-sample streak statistics (heavier, a
maximum over a run) with an exponential tail fitted to the excesses over their upper quartile;
both with the estimate's own uncertainty added (a Student-t prediction bound; the mean excess
at the upper edge of its standard error). A threshold is never below the conformal quantile
the data do support. The held-out runs include the extrapolation and unseen-parameter folds'
(training/crossval.py): thresholds set on runs like the history alone are too tight for the
larger images and new settings the model is asked about. ``docs/benchmarks.md`` measures
what this gives on runs the calibration never saw.

The floors left are physical noise limits, not tuning: :data:`MIN_HALF_WIDTH` (below it two
samples of the same work differ anyway, reasons beside each), :data:`MIN_RUN_SCALE` and
:data:`MIN_SAMPLE_THRESHOLD` (below them the statistic is inside the model's own noise).
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from models.rows import DEMAND, RUN_KEY
from models.runs import NOISE_FLOOR, run_totals
from models.work import InputSize, param_features

BAND_EDGE_Z = 1.2816  # the P10-P90 band of a normal distribution is +-1.2816 standard deviations
DEFAULT_RATE = 0.001  # false alarms per healthy run
DEFAULT_CONSECUTIVE = 3
FALLBACK_THRESHOLD = 4.0  # a kind without calibration (a model fitted before it, too few runs)
MIN_CALIBRATION_RUNS = 20
MIN_RUN_SCALE = 1.0
"""A run total's statistic is in spreads (the residuals' own noise): its held-out scale is
never taken below one, or a history of identical runs would call a 2 % difference a fault."""
MIN_SAMPLE_THRESHOLD = 2 * BAND_EDGE_Z
"""A per-sample threshold is never inside twice the band's half-width: within that, a sample is
inside a band twice as wide as the P10-P90 one, not a deviation worth a page."""

MIN_HALF_WIDTH = {
    # A sample covers ~1 s; CPU is read in ns but the reaped children's share comes in 10 ms
    # clock ticks, up to two per child: a few points of a core either way.
    "cpu": 5.0, "cpu_wait": 5.0, DEMAND: 5.0,
    # Resident memory moves by the allocator's arenas and page tables, a few MiB per run.
    "memory": 2.0,
    # A run that writes nothing still dirties metadata pages: ~64 KiB over a 1 s sample.
    "disk_read": 64.0, "disk_write": 64.0,
}
"""Smallest half-width of a band, per resource, in its units: the physical resolution of the
measurement (a task that reads nothing has P10 = P50 = P90 = 0, and one page read must not be
infinitely surprising)."""


class Side(str, enum.Enum):
    """Which deviations of a resource can be anomalies."""

    BOTH = "both"
    ABOVE = "above"
    NONE = "none"


ALARMS = {DEMAND: Side.BOTH, "memory": Side.ABOVE, "disk_read": Side.ABOVE, "disk_write": Side.ABOVE}
"""Resources whose samples raise anomalies, and on which side; the others are only scored. On a
shared node a task's ``cpu`` falls and its ``cpu_wait`` rises with the load while its demand
(their sum) stays what the task asks for: demand alarms both ways (a hog above, a stall
below); memory and storage I/O above only (a slower task grows and writes more slowly)."""
RUN_ALARMS = ("cpu_seconds", "operation_seconds", "peak_memory", "bytes_written")
"""Run totals whose verdict can be an anomaly. The process's CPU time catches what the
operation's misses (a child process, a runaway outside the operation) and is checked while the
run goes on; the operation's catches a regression of the work itself, which in a light task is a
small share of the process's. ``bytes_read`` is judged and stored but raises
nothing: how much a run reads from storage is the page cache's state (a busy node evicts the
interpreter's libraries and the input, and a healthy run reads them again), not its work."""
RUN_KINDS = tuple(f"run:{total}" for total in RUN_ALARMS)
SAMPLE_KINDS = tuple(f"sample:{resource}" for resource in ALARMS)
KINDS = SAMPLE_KINDS + RUN_KINDS


WHOLE_OUTPUT_PER_TICK = ("disk_read", "disk_write")
"""Storage rates whose band is at least as wide as the run's whole expected bytes in one
sample: when a run reads or writes its image is not an anomaly (a large PNG is encoded and
written over several seconds), reading or writing many times what its work needs is."""


def half_width_floors(resources, scale) -> np.ndarray:
    """Per row, the band's smallest half-width: :data:`MIN_HALF_WIDTH`, and for the
    :data:`WHOLE_OUTPUT_PER_TICK` rates the row's usage scale (models.features.usage_scale:
    the run's expected bytes over the sample's interval)."""
    resources = np.asarray(resources, dtype=object)
    floor = np.array([MIN_HALF_WIDTH.get(r, 1.0) for r in resources], dtype=np.float64)
    whole = np.isin(resources, WHOLE_OUTPUT_PER_TICK)
    return np.where(whole, np.maximum(floor, np.asarray(scale, dtype=np.float64)), floor)


def band_score(value: float, p10: float, p50: float, p90: float, resource: str, floor: float | None = None) -> float:
    """Signed deviation from the median in standard-deviation equivalents: the band's edges
    are at +-1.28, each side scaled by its own half of the band (at least ``floor``, by
    default the resource's physical one)."""
    floor = MIN_HALF_WIDTH.get(resource, 1.0) if floor is None else floor
    half = max(p90 - p50, floor) if value >= p50 else max(p50 - p10, floor)
    return BAND_EDGE_Z * (value - p50) / half


def band_scores(values: np.ndarray, bands: np.ndarray, resources: np.ndarray,
                floors: np.ndarray | None = None) -> np.ndarray:
    """:func:`band_score` of many rows; ``bands`` is (rows, 3)."""
    floor = np.array([MIN_HALF_WIDTH.get(r, 1.0) for r in resources]) if floors is None else floors
    p10, p50, p90 = bands[:, 0], bands[:, 1], bands[:, 2]
    half = np.where(values >= p50, np.maximum(p90 - p50, floor), np.maximum(p50 - p10, floor))
    return BAND_EDGE_Z * (values - p50) / half


def alarm_score(resource: str, score: float) -> float:
    """The part of ``score`` that can raise an anomaly under :data:`ALARMS`."""
    side = ALARMS.get(resource, Side.NONE)
    if side is Side.BOTH:
        return abs(score)
    if side is Side.ABOVE:
        return max(score, 0.0)
    return 0.0


def run_score(total: str, value: float, expected_log: float, spread: float) -> float:
    """How far a run's total lies above what its work needs, in spreads (negative: below)."""
    return (math.log(max(value, 0.0) + NOISE_FLOOR[total]) - expected_log) / spread


def judged_value(total: str, value: float, size) -> float:
    """What of a run's ``total`` is judged: all of it, but for ``bytes_read`` less one read of
    its own input file (``size``: models.work.InputSize), which a cold page cache makes a run
    read from storage; the history's runs mostly found it cached."""
    if total == "bytes_read" and math.isfinite(size.file_bytes):
        return max(value - size.file_bytes / 1024, 0.0)
    return value


def streak_statistic(scores: np.ndarray, consecutive: int) -> float:
    """The largest ``s`` such that ``consecutive`` scores in a row are all above ``s`` (0 for
    a series shorter than that): the series alarms at threshold ``t`` exactly when this > t."""
    if len(scores) < consecutive:
        return 0.0
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(scores, dtype=np.float64), consecutive)
    return float(max(windows.min(axis=1).max(), 0.0))


@dataclass(frozen=True)
class TailFit:
    """A kind's statistic on held-out healthy runs, summarised to set a threshold at any rate."""

    runs: int
    tail: str  # "normal" or "exponential"
    centre: float  # normal: the median; exponential: the upper quartile u0
    scale: float  # normal: the upper half's prediction spread; exponential: the (upper) mean excess over u0
    exceed: float  # exponential: the share of runs above u0
    largest: float  # the largest statistic seen
    ordered: tuple[float, ...] = field(default=(), repr=False)  # the statistics, sorted

    def threshold(self, rate: float) -> float:
        """Where the tail leaves ``rate`` of healthy runs: the extrapolated tail, never below
        the conformal quantile the runs support (the ceil((n+1)(1-rate))-th smallest), nor
        below :data:`MIN_SAMPLE_THRESHOLD` for a per-sample kind."""
        if self.tail == "normal":
            fitted = self.centre + student_t.isf(rate, self.runs - 1) * self.scale
        else:
            fitted = self.centre + self.scale * math.log(max(self.exceed / rate, 1.0))
        rank = math.ceil((self.runs + 1) * (1 - rate))
        conformal = self.ordered[rank - 1] if 0 < rank <= len(self.ordered) else -math.inf
        least = MIN_SAMPLE_THRESHOLD if self.tail == "exponential" else -math.inf
        return float(max(fitted, conformal, least))

    @classmethod
    def fit(cls, statistics: np.ndarray, tail: str) -> "TailFit | None":
        values = np.sort(np.asarray(statistics, dtype=np.float64)[np.isfinite(statistics)])
        if len(values) < MIN_CALIBRATION_RUNS:
            return None
        n = len(values)
        if tail == "normal":
            # Only the upper side can alarm: a half-normal fitted to the runs above the median
            # (runs far below their expectation, a task doing less than the work model says, do
            # not widen it), widened for having been estimated from n runs (and the quantile
            # taken from Student's t with n - 1 degrees): a prediction bound for one more run.
            centre = float(np.median(values))
            upper = values[values > centre] - centre
            spread = math.sqrt(float(np.mean(upper ** 2))) if len(upper) else 0.0
            scale = max(spread, MIN_RUN_SCALE) * math.sqrt(1 + 1 / n)
            exceed = 0.5
        else:
            centre = float(np.quantile(values, 0.75))
            above = values[values > centre]
            # the mean excess at the upper edge of its one-standard-error interval: an estimate
            # from k excesses is off by 1/sqrt(k), and the tail multiplies that error
            mean_excess = float((above - centre).mean()) if len(above) else 0.0
            scale = max(mean_excess * (1 + 1 / math.sqrt(max(len(above), 1))), 0.25)
            exceed = max(len(above) / n, 1.0 / n)
        return cls(len(values), tail, centre, scale, exceed, float(values[-1]), tuple(float(v) for v in values))


@dataclass(frozen=True)
class AlarmCalibration:
    """Every kind's :class:`TailFit`; saved with the model, turned into thresholds at the
    configured false-alarm rate (``FALSE_ALARM_RATE``) when the model is loaded."""

    tails: dict[str, TailFit]
    consecutive: int = DEFAULT_CONSECUTIVE

    def thresholds(self, rate: float = DEFAULT_RATE) -> dict[str, float]:
        """Per kind (:data:`KINDS`), the threshold that leaves ``rate`` false alarms per
        healthy run over all kinds together; a kind without calibration gets the fallback."""
        share = rate / len(KINDS)
        return {kind: (self.tails[kind].threshold(share) if kind in self.tails else FALLBACK_THRESHOLD)
                for kind in KINDS}

    def to_dict(self) -> dict:
        return {"consecutive": self.consecutive,
                "tails": {kind: asdict(tail) for kind, tail in self.tails.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "AlarmCalibration":
        return cls({kind: TailFit(**{**tail, "ordered": tuple(tail.get("ordered", ()))})
                    for kind, tail in data.get("tails", {}).items()},
                   int(data.get("consecutive", DEFAULT_CONSECUTIVE)))

    @classmethod
    def fit(cls, statistics: pd.DataFrame, consecutive: int = DEFAULT_CONSECUTIVE) -> "AlarmCalibration":
        """From :func:`alarm_statistics` rows of held-out healthy runs."""
        tails = {}
        for kind, part in statistics.groupby("kind"):
            tail = TailFit.fit(part["statistic"].to_numpy(), "normal" if str(kind).startswith("run:") else "exponential")
            if tail is not None:
                tails[str(kind)] = tail
        return cls(tails, consecutive)


def alarm_statistics(rows: pd.DataFrame, bands: pd.DataFrame, work, consecutive: int = DEFAULT_CONSECUTIVE) -> pd.DataFrame:
    """Per healthy run of ``rows`` (model rows) and kind, the statistic that decides whether it
    alarms: ``bands`` holds each row's p10/p50/p90 (same index; and its half-width ``floor``,
    :func:`half_width_floors`, when the model has one), ``work`` the expected totals
    (models.work.ExpectedWork). Columns: the run key, ``kind``, ``statistic``, ``samples``."""
    out = []
    alarmed = rows["resource"].isin(list(ALARMS)).to_numpy()
    if alarmed.any():
        part = rows[alarmed]
        floors = bands.loc[part.index, "floor"].to_numpy(dtype=np.float64) if "floor" in bands else None
        scores = band_scores(part["value"].to_numpy(dtype=np.float64),
                             bands.loc[part.index, ["p10", "p50", "p90"]].to_numpy(dtype=np.float64),
                             part["resource"].astype(str).to_numpy(), floors)
        sides = part["resource"].map(lambda r: ALARMS[r].value).to_numpy()
        part = part.assign(_alarm=np.where(sides == Side.BOTH.value, np.abs(scores), np.maximum(scores, 0.0)))
        for key, series in part.sort_values("ts_ms").groupby([*RUN_KEY, "resource"], sort=False):
            out.append((*key[:3], f"sample:{key[3]}", streak_statistic(series["_alarm"].to_numpy(), consecutive),
                        len(series)))
    for run in run_totals(rows).itertuples(index=False):
        for total in RUN_ALARMS:
            value = getattr(run, total)
            size = InputSize.of(run)
            fit = work.verdict_fit(run.task, total, size)
            if fit is None or not np.isfinite(value) or not size.known:
                continue
            expected = fit.log_median(size, param_features(run.params), float(run.pressure))
            judged = judged_value(total, float(value), size)
            out.append((run.order_id, run.position, run.attempt, f"run:{total}",
                        run_score(total, judged, expected, fit.spread_at(expected, size, param_features(run.params))),
                        int(run.samples)))
    return pd.DataFrame(out, columns=[*RUN_KEY, "kind", "statistic", "samples"])
