"""Deviation scoring: how far a sample lies from what was expected, and when that is an anomaly.

As in river's anomaly module, the parts are small and separate: a *scorer* turns a sample into
a score (higher is more anomalous, signed: above or below expectation), an :data:`ALARMS`
policy says which side of which resource can be an anomaly, and a :class:`ConsecutiveFilter`
decides when a run of high scores is one. Four scorers share one contract:
:class:`ModelBandScorer` (the expected-usage model's band), and three simple detectors to
compare it with, :class:`FixedThresholdScorer`, :class:`RollingZScorer` and
:class:`NSigmaScorer`. :class:`OverrunCheck` raises ``duration`` anomalies: a run that has
used far more CPU time than its task ever needs (models.work).

Why the policy: on a shared node a task gets a share of the cores, so its ``cpu`` falls and
its ``cpu_wait`` rises with the load, while its ``cpu_demand`` (their sum) stays what the task
asks for. Anomalies are raised on demand (both sides: a hog above, a stall below), and on
memory and storage I/O above their band only (a slower task writes and grows more slowly);
cpu and cpu_wait are scored and stored for the plots but raise nothing.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from models.rows import DEMAND
from pipeline.protocol import Deviation
from pipeline.settings import Settings

# The P10-P90 band of a normal distribution is +-1.2816 standard deviations.
BAND_EDGE_Z = 1.2816
# Smallest half-width a band may have, per resource: a task that reads nothing from disk has
# P10 = P50 = P90 = 0, and a single page read must not count as infinitely surprising.
MIN_HALF_WIDTH = {"cpu": 5.0, "memory": 24.0, "disk_read": 1024.0, "disk_write": 1024.0, "cpu_wait": 10.0,
                  DEMAND: 25.0}
# ... and at least this share of the expected median: a task that holds 2 GiB moves by more
# than one that holds 50 MiB.
MIN_RELATIVE_HALF_WIDTH = {"memory": 0.1, DEMAND: 0.15}
DEFAULT_THRESHOLD = 2.5
DEFAULT_CONSECUTIVE = 3
DURATION = "duration"  # the resource name of an overrun anomaly (value and band in seconds)


class Side(str, enum.Enum):
    """Which deviations of a resource can be anomalies."""

    BOTH = "both"
    ABOVE = "above"
    NONE = "none"


ALARMS = {DEMAND: Side.BOTH, "memory": Side.ABOVE, "disk_read": Side.ABOVE, "disk_write": Side.ABOVE}
"""Resources that raise anomalies, and on which side; every other resource is only scored."""


@dataclass(frozen=True)
class SampleContext:
    """One model row (models.features.model_rows): a sample of one tick of a task run with
    what is known about it while the task runs. The unit every scorer and the tables share."""

    order_id: int
    task: str
    position: int
    resource: str
    timestamp_ms: int
    value: float
    seconds: float  # since the task started
    prev_task: str
    image_pixels: float  # of the image the run reads
    node_cpu_pressure: float = math.nan  # percent, this tick
    attempt: int = 1
    cpu_seconds: float = 0.0  # the run's CPU time up to this tick
    interval_s: float = 1.0  # the length of the interval the sample covers
    cpu_before: float = 0.0  # the run's CPU time before this tick

    @property
    def series(self) -> tuple[int, int, int, str]:
        """The time series this sample belongs to: one task run's one resource."""
        return self.order_id, self.position, self.attempt, self.resource

    @property
    def run(self) -> tuple[int, int, int]:
        return self.order_id, self.position, self.attempt


def contexts(rows: pd.DataFrame) -> list[SampleContext]:
    """The samples of model rows (models.features.ROW_COLUMNS), in their order."""
    return [SampleContext(int(o), str(t), int(p), str(r), int(ts), float(v), float(sec), str(prev),
                          float(px), float(pr), int(a), float(cs), float(i), float(cb))
            for o, t, p, r, ts, v, sec, prev, px, pr, a, cs, i, cb in zip(
                rows["order_id"], rows["task"], rows["position"], rows["resource"], rows["ts_ms"],
                rows["value"], rows["seconds"], rows["prev_task"], rows["image_pixels"],
                rows["node_cpu_pressure"], rows["attempt"], rows["cpu_seconds"], rows["interval_s"],
                rows["cpu_before"])]


def feature_frame(samples: Sequence[SampleContext]) -> pd.DataFrame:
    """The model's input columns for ``samples``."""
    return pd.DataFrame({
        "task": [s.task for s in samples],
        "resource": [s.resource for s in samples],
        "seconds": [s.seconds for s in samples],
        "position": [s.position for s in samples],
        "prev_task": [s.prev_task for s in samples],
        "image_pixels": [s.image_pixels for s in samples],
        "node_cpu_pressure": [s.node_cpu_pressure for s in samples],
        "interval_s": [s.interval_s for s in samples],
        "cpu_before": [s.cpu_before for s in samples],
    })


def scored(sample: SampleContext, expected: float, lower: float, upper: float, score: float,
           anomaly: bool, raised: bool, model_version: str) -> Deviation:
    """``sample`` with its expectation, band, score and verdict."""
    return Deviation(sample.order_id, sample.task, sample.position, sample.resource, sample.timestamp_ms,
                     sample.value, expected, lower, upper, score, model_version, anomaly, raised)


def band_score(value: float, p10: float, p50: float, p90: float, resource: str) -> float:
    """Signed deviation from the median in standard-deviation equivalents: the band's edges
    are at +-1.28, each side scaled by its own half of the band."""
    floor = max(MIN_HALF_WIDTH.get(resource, 1.0), MIN_RELATIVE_HALF_WIDTH.get(resource, 0.0) * p50)
    half = max(p90 - p50, floor) if value >= p50 else max(p50 - p10, floor)
    return BAND_EDGE_Z * (value - p50) / half


class ModelBandScorer:
    """Scores against an expected-usage model's P10/P50/P90 (anything with that ``predict``)."""

    name = "model"

    def __init__(self, model) -> None:
        self.model = model

    def score_many(self, samples: Sequence[SampleContext]) -> list[tuple[float, float, float, float]]:
        """(expected, lower, upper, score) per sample, predicted in one batch."""
        if not samples:
            return []
        predicted = self.model.predict(feature_frame(samples))
        out = []
        for sample, p10, p50, p90 in zip(samples, predicted["p10"], predicted["p50"], predicted["p90"]):
            p10, p50, p90 = float(p10), float(p50), float(p90)
            out.append((p50, p10, p90, band_score(sample.value, p10, p50, p90, sample.resource)))
        return out


class FixedThresholdScorer:
    """A fixed upper limit per resource, whatever the task: the simplest detector there is.
    Scores are scaled so that the limit sits where the model band's alarm threshold does."""

    name = "fixed-threshold"

    def __init__(self, limits: Mapping[str, float], threshold: float = DEFAULT_THRESHOLD) -> None:
        self.limits = dict(limits)
        self.threshold = threshold

    def score_many(self, samples: Sequence[SampleContext]) -> list[tuple[float, float, float, float]]:
        out = []
        for sample in samples:
            limit = self.limits.get(sample.resource, 0.0)
            out.append((limit / 2, 0.0, limit, self.threshold * sample.value / limit if limit else 0.0))
        return out


class RollingZScorer:
    """z-score of each sample against the previous ``window`` samples of its own series,
    silent during a warm-up of ``warmup`` samples."""

    name = "rolling-z"

    def __init__(self, window: int = 10, warmup: int = 3) -> None:
        self.window = window
        self.warmup = warmup
        self._history: dict[tuple, deque[float]] = defaultdict(lambda: deque(maxlen=self.window))

    def score_many(self, samples: Sequence[SampleContext]) -> list[tuple[float, float, float, float]]:
        out = []
        for sample in samples:
            history = self._history[sample.series]
            if len(history) < self.warmup:
                result = (sample.value, sample.value, sample.value, 0.0)
            else:
                mean = sum(history) / len(history)
                std = math.sqrt(sum((v - mean) ** 2 for v in history) / len(history))
                std = max(std, MIN_HALF_WIDTH.get(sample.resource, 1.0) / BAND_EDGE_Z)
                result = (mean, mean - BAND_EDGE_Z * std, mean + BAND_EDGE_Z * std, (sample.value - mean) / std)
            history.append(sample.value)
            out.append(result)
        return out


class ConsecutiveFilter:
    """An anomaly is ``consecutive`` samples in a row of one series with ``|score| >
    threshold``; every sample of the run from then on is flagged, and the first one raises it."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, consecutive: int = DEFAULT_CONSECUTIVE) -> None:
        if consecutive < 1 or threshold <= 0:
            raise ValueError("consecutive must be >= 1 and threshold > 0")
        self.threshold = threshold
        self.consecutive = consecutive
        self._streaks: dict[tuple, int] = defaultdict(int)

    def update(self, series: tuple, score: float) -> tuple[bool, bool]:
        """(anomalous, first sample of the episode) for the next score of ``series``."""
        if abs(score) > self.threshold:
            self._streaks[series] += 1
        else:
            self._streaks[series] = 0
        streak = self._streaks[series]
        return streak >= self.consecutive, streak == self.consecutive


class NSigmaScorer:
    """The mean and standard deviation of each (task, resource) in the history: a sample N
    standard deviations off scores at the alarm threshold (the classic control chart)."""

    name = "n-sigma"

    def __init__(self, n: float = 3.0, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.n = n
        self.threshold = threshold
        self.stats: dict[tuple[str, str], tuple[float, float]] = {}

    def fit(self, rows: pd.DataFrame) -> "NSigmaScorer":
        """Learn from model rows (task, resource, value) of healthy runs."""
        grouped = rows.groupby(["task", "resource"])["value"]
        for (task, resource), mean, std in zip(grouped.mean().index, grouped.mean(), grouped.std(ddof=0)):
            self.stats[(task, resource)] = (float(mean), float(std) if np.isfinite(std) else 0.0)
        return self

    def score_many(self, samples: Sequence[SampleContext]) -> list[tuple[float, float, float, float]]:
        out = []
        for sample in samples:
            mean, std = self.stats.get((sample.task, sample.resource), (sample.value, 0.0))
            std = max(std, MIN_HALF_WIDTH.get(sample.resource, 1.0) / BAND_EDGE_Z)
            out.append((mean, mean - self.n * std, mean + self.n * std,
                        self.threshold * (sample.value - mean) / (self.n * std)))
        return out


class OverrunCheck:
    """A run whose CPU time so far exceeds ``slack`` times the P90 its task needs (plus
    ``floor_s``) overran: one ``duration`` anomaly per run, raised at that tick.

    Its value is the seconds the task has run; its band the expected duration at the share of
    a core the run has been getting (expected CPU time / CPU time per second so far)."""

    def __init__(self, work, slack: float = 1.5, floor_s: float = 1.0) -> None:
        self.work = work  # models.work.ExpectedWork
        self.slack = slack
        self.floor_s = floor_s
        self._raised: set[tuple[int, int, int]] = set()

    def check(self, samples: Sequence[SampleContext], model_version: str = "") -> list[Deviation]:
        found = []
        for s in samples:
            if s.resource != "cpu" or s.run in self._raised:
                continue
            band = self.work.band(s.task, s.image_pixels)
            if band is None or s.cpu_seconds <= self.slack * band[2] + self.floor_s:
                continue
            self._raised.add(s.run)
            rate = s.cpu_seconds / s.seconds if s.seconds > 0 else 1.0  # CPU seconds per second
            p10, p50, p90 = (b / rate for b in band)
            found.append(scored(replace(s, resource=DURATION, value=s.seconds), p50, p10, p90,
                                s.cpu_seconds / band[2], True, True, model_version))
        return found

    def forget(self, order_id: int) -> None:
        self._raised = {run for run in self._raised if run[0] != order_id}


def alarm_score(resource: str, score: float) -> float:
    """The part of ``score`` that can raise an anomaly under :data:`ALARMS`."""
    side = ALARMS.get(resource, Side.NONE)
    if side is Side.BOTH:
        return score
    if side is Side.ABOVE:
        return max(score, 0.0)
    return 0.0


class Detector:
    """A scorer, the alarm policy and a filter, and optionally the overrun check: what the
    monitor-consumer, re-scoring and the benchmark run. Its results carry ``model_version``
    (empty for the simple detectors)."""

    def __init__(self, scorer, filter_: ConsecutiveFilter, overrun: OverrunCheck | None = None,
                 model_version: str = "") -> None:
        self.scorer = scorer
        self.filter = filter_
        self.overrun = overrun
        self.model_version = model_version

    def process(self, samples: Sequence[SampleContext]) -> list[Deviation]:
        """Score a batch (in time order within each series) and classify every sample; an
        overrun adds a ``duration`` result after the batch's samples."""
        results = []
        for sample, (expected, lower, upper, score) in zip(samples, self.scorer.score_many(samples)):
            anomaly, first = self.filter.update(sample.series, alarm_score(sample.resource, score))
            results.append(scored(sample, expected, lower, upper, score, anomaly, first, self.model_version))
        if self.overrun is not None:
            results.extend(self.overrun.check(samples, self.model_version))
        return results


def model_detector(model, settings: Settings, model_version: str = "") -> Detector:
    """The model-band detector with the anomaly rule of ``settings``: what live scoring and
    re-scoring both run. ``model_version`` is the registered version of ``model``."""
    return Detector(ModelBandScorer(model),
                    ConsecutiveFilter(settings.anomaly_threshold, settings.anomaly_consecutive),
                    OverrunCheck(model.work), model_version)
