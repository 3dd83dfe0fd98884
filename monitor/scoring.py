"""Deviation scoring: how far a sample lies from what was expected, and when that is an anomaly.

As in river's anomaly module, the parts are small and separate: a *scorer* turns a sample into
a score (higher is more anomalous, signed: above or below expectation), and a
:class:`ConsecutiveFilter` decides when a run of high scores is an anomaly. Three scorers share
one contract: :class:`ModelBandScorer` (the expected-usage model's band), and two simple
detectors to compare it with, :class:`FixedThresholdScorer` and :class:`RollingZScorer`.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

# The P10-P90 band of a normal distribution is +-1.2816 standard deviations.
BAND_EDGE_Z = 1.2816
# Smallest half-width a band may have, per resource: a task that reads nothing from disk has
# P10 = P50 = P90 = 0, and a single page read must not count as infinitely surprising.
MIN_HALF_WIDTH = {"cpu": 5.0, "memory": 8.0, "disk_read": 256.0, "disk_write": 256.0, "cpu_wait": 10.0}
DEFAULT_THRESHOLD = 2.5
DEFAULT_CONSECUTIVE = 3


@dataclass(frozen=True)
class SampleContext:
    """One sample with what is known about it while its task runs (the model's features)."""

    order_id: int
    task: str
    position: int
    resource: str
    timestamp_ms: int
    value: float
    seconds: float  # since the task started
    prev_task: str
    image_pixels: float

    @property
    def series(self) -> tuple[int, int, str]:
        """The time series this sample belongs to: one task run's one resource."""
        return self.order_id, self.position, self.resource


@dataclass(frozen=True)
class Scored:
    """A sample with its expectation, score and verdict."""

    sample: SampleContext
    expected: float
    lower: float
    upper: float
    score: float
    anomaly: bool
    first_of_episode: bool  # the sample at which the anomaly was raised


def band_score(value: float, p10: float, p50: float, p90: float, resource: str) -> float:
    """Signed deviation from the median in standard-deviation equivalents: the band's edges
    are at +-1.28, each side scaled by its own half of the band."""
    floor = MIN_HALF_WIDTH.get(resource, 1.0)
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
        frame = pd.DataFrame({
            "task": [s.task for s in samples],
            "resource": [s.resource for s in samples],
            "seconds": [s.seconds for s in samples],
            "position": [s.position for s in samples],
            "prev_task": [s.prev_task for s in samples],
            "image_pixels": [s.image_pixels for s in samples],
        })
        predicted = self.model.predict(frame)
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
            limit = self.limits[sample.resource]
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


class Detector:
    """A scorer and a filter: what the monitor-consumer, re-scoring and the benchmark run."""

    def __init__(self, scorer, filter_: ConsecutiveFilter) -> None:
        self.scorer = scorer
        self.filter = filter_

    def process(self, samples: Sequence[SampleContext]) -> list[Scored]:
        """Score a batch (in time order within each series) and classify every sample."""
        results = []
        for sample, (expected, lower, upper, score) in zip(samples, self.scorer.score_many(samples)):
            anomaly, first = self.filter.update(sample.series, score)
            results.append(Scored(sample, expected, lower, upper, score, anomaly, first))
        return results
