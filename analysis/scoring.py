"""Deviation scoring: how far a sample or a run lies from what was expected, and when that is an anomaly.

As in river's anomaly module, the parts are small and separate: a *scorer* turns a sample into
a score (higher is more anomalous, signed: above or below expectation), the alarm policy
(:mod:`models.alarms`) says which side of which resource can be an anomaly, and a
:class:`ConsecutiveFilter` decides when a run of high scores is one. Four scorers share one
contract: :class:`ModelBandScorer` (the expected-usage model's band), and three simple
detectors to compare it with, :class:`FixedThresholdScorer`, :class:`RollingZScorer` and
:class:`NSigmaScorer`. :class:`RunCheck` gives every run a verdict on its totals (CPU time,
peak memory, bytes read and written) at its end, against the work model (models/work.py), and
calls a run whose CPU time already lies beyond its threshold an overrun while it runs.

The model detector's thresholds are those its calibration sets for the configured false-alarm
rate (``FALSE_ALARM_RATE``, models/alarms.py); the simple detectors use ``ANOMALY_THRESHOLD``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from models.alarms import (  # noqa: F401 - the policy is part of this module's face
    ALARMS, BAND_EDGE_Z, DEFAULT_CONSECUTIVE, MIN_HALF_WIDTH, AlarmCalibration, Side, alarm_score, band_score,
    RUN_ALARMS, judged_value, run_score,
)
from models.rows import NO_PARAMS
from models.runs import TOTALS, run_totals
from models.work import InputSize, param_features
from pipeline.protocol import Deviation
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 2.5  # the simple detectors' (ANOMALY_THRESHOLD)


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
    params: str = NO_PARAMS  # the run's task parameters, JSON
    image_channels: float = math.nan  # of the image the run reads
    image_bytes: float = math.nan  # its file's size
    output_bytes: float = math.nan  # the size of the output the run wrote (known at its end)
    operation_seconds: float = math.nan  # the CPU time of its image operation alone (at its end)

    @property
    def series(self) -> tuple[int, int, int, str]:
        """The time series this sample belongs to: one task run's one resource."""
        return self.order_id, self.position, self.attempt, self.resource

    @property
    def run(self) -> tuple[int, int, int]:
        return self.order_id, self.position, self.attempt


def contexts(rows: pd.DataFrame) -> list[SampleContext]:
    """The samples of model rows (models.features.ROW_COLUMNS), in their order."""
    def column(name, fill):
        return rows[name] if name in rows else [fill] * len(rows)

    return [SampleContext(int(o), str(t), int(p), str(r), int(ts), float(v), float(sec), str(prev),
                          float(px), float(pr), int(a), float(cs), float(i), float(cb), str(pa), float(ch), float(by),
                          float(out), float(op))
            for o, t, p, r, ts, v, sec, prev, px, pr, a, cs, i, cb, pa, ch, by, out, op in zip(
                rows["order_id"], rows["task"], rows["position"], rows["resource"], rows["ts_ms"],
                rows["value"], rows["seconds"], rows["prev_task"], rows["image_pixels"],
                rows["node_cpu_pressure"], rows["attempt"], rows["cpu_seconds"], rows["interval_s"],
                rows["cpu_before"], column("params", NO_PARAMS), column("image_channels", math.nan),
                column("image_bytes", math.nan), column("output_bytes", math.nan),
                column("operation_seconds", math.nan))]


def sample_rows(samples: Sequence[SampleContext]) -> pd.DataFrame:
    """``samples`` back as model rows (models.rows.ROW_COLUMNS): what models.runs reads."""
    return pd.DataFrame({
        "order_id": [s.order_id for s in samples], "position": [s.position for s in samples],
        "attempt": [s.attempt for s in samples], "task": [s.task for s in samples],
        "resource": [s.resource for s in samples], "seconds": [s.seconds for s in samples],
        "prev_task": [s.prev_task for s in samples], "image_pixels": [s.image_pixels for s in samples],
        "image_channels": [s.image_channels for s in samples], "image_bytes": [s.image_bytes for s in samples],
        "output_bytes": [s.output_bytes for s in samples],
        "operation_seconds": [s.operation_seconds for s in samples], "params": [s.params for s in samples], "node_cpu_pressure": [s.node_cpu_pressure for s in samples],
        "value": [s.value for s in samples], "ts_ms": [s.timestamp_ms for s in samples],
        "interval_s": [s.interval_s for s in samples], "cpu_seconds": [s.cpu_seconds for s in samples],
        "cpu_before": [s.cpu_before for s in samples],
    })


def feature_frame(samples: Sequence[SampleContext]) -> pd.DataFrame:
    """The model's input columns for ``samples``."""
    return pd.DataFrame({
        "task": [s.task for s in samples],
        "resource": [s.resource for s in samples],
        "seconds": [s.seconds for s in samples],
        "position": [s.position for s in samples],
        "prev_task": [s.prev_task for s in samples],
        "image_pixels": [s.image_pixels for s in samples],
        "image_channels": [s.image_channels for s in samples],
        "image_bytes": [s.image_bytes for s in samples],
        "params": [s.params for s in samples],
        "node_cpu_pressure": [s.node_cpu_pressure for s in samples],
        "interval_s": [s.interval_s for s in samples],
        "cpu_before": [s.cpu_before for s in samples],
    })


def scored(sample: SampleContext, expected: float, lower: float, upper: float, score: float,
           anomaly: bool, raised: bool, model_version: str) -> Deviation:
    """``sample`` with its expectation, band, score and verdict (plain Python numbers: a NumPy
    scalar would be written as ``np.float64(...)`` by PostgreSQL's COPY)."""
    return Deviation(sample.order_id, sample.task, sample.position, sample.resource, sample.timestamp_ms,
                     float(sample.value), float(expected), float(lower), float(upper), float(score),
                     model_version, bool(anomaly), bool(raised))


class ModelBandScorer:
    """Scores against an expected-usage model's P10/P50/P90 (anything with that ``predict``;
    its ``floors``, when it has them, set each band's smallest half-width)."""

    name = "model"

    def __init__(self, model) -> None:
        self.model = model

    def score_many(self, samples: Sequence[SampleContext]) -> list[tuple[float, float, float, float]]:
        """(expected, lower, upper, score) per sample, predicted in one batch."""
        if not samples:
            return []
        frame = feature_frame(samples)
        predicted = self.model.predict(frame)
        floors = self.model.floors(frame) if hasattr(self.model, "floors") else [None] * len(samples)
        out = []
        for sample, p10, p50, p90, floor in zip(samples, predicted["p10"], predicted["p50"], predicted["p90"], floors):
            p10, p50, p90 = float(p10), float(p50), float(p90)
            out.append((p50, p10, p90, band_score(sample.value, p10, p50, p90, sample.resource, floor)))
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

    def __init__(self, threshold: float | Mapping[str, float] = DEFAULT_THRESHOLD,
                 consecutive: int = DEFAULT_CONSECUTIVE) -> None:
        values = list(threshold.values()) if isinstance(threshold, Mapping) else [threshold]
        if consecutive < 1 or any(v <= 0 for v in values):
            raise ValueError("consecutive must be >= 1 and every threshold > 0")
        self.threshold = threshold
        self.consecutive = consecutive
        self._streaks: dict[tuple, int] = defaultdict(int)

    def threshold_of(self, resource: str) -> float:
        """The threshold of ``resource``'s samples (none: they never alarm)."""
        if isinstance(self.threshold, Mapping):
            return self.threshold.get(resource, math.inf)
        return self.threshold

    def update(self, series: tuple, score: float) -> tuple[bool, bool]:
        """(anomalous, first sample of the episode) for the next score of ``series``."""
        if abs(score) > self.threshold_of(series[-1]):
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


class RunCheck:
    """Every run's verdict on its totals (models/runs.py) against the work model, at its end;
    and, while it runs, an **overrun**: CPU time so far already beyond the run's threshold.

    ``thresholds`` map ``run:<total>`` (models/alarms.py KINDS) to the score above which a
    total is an anomaly. One result per run and total at the run's end (its resource is the
    total's name, its value the total, its band the expected P10-P90); an overrun raises the
    ``cpu_seconds`` anomaly early, and the end does not raise it again."""

    def __init__(self, work, thresholds: Mapping[str, float]) -> None:
        self.work = work  # models.work.ExpectedWork
        self.thresholds = dict(thresholds)
        self._samples: dict[tuple[int, int, int], list[SampleContext]] = defaultdict(list)
        self._raised: set[tuple[tuple[int, int, int], str]] = set()
        self._unsized: set[str] = set()

    def observe(self, samples: Sequence[SampleContext], model_version: str = "") -> list[Deviation]:
        """Keep ``samples`` for their runs' ends; the overruns they show."""
        found = []
        for s in samples:
            self._samples[s.run].append(s)
            if s.resource != "cpu" or (s.run, "cpu_seconds") in self._raised:
                continue
            fit = self.work.fit_of(s.task, "cpu_seconds")
            if fit is None or not s.image_pixels > 0:
                continue
            size = InputSize(s.image_pixels, s.image_channels, s.image_bytes)
            params = param_features(s.params)
            expected = fit.log_median(size, params)
            score = run_score("cpu_seconds", s.cpu_seconds, expected, fit.spread_at(expected, size, params))
            if score > self.thresholds.get("run:cpu_seconds", math.inf):
                self._raised.add((s.run, "cpu_seconds"))
                p10, p50, p90 = fit.band(size, params)
                found.append(scored(replace(s, resource="cpu_seconds", value=s.cpu_seconds), p50, p10, p90,
                                    score, True, True, model_version))
        return found

    def end(self, runs, model_version: str = "") -> list[Deviation]:
        """The verdicts of ``runs`` (run keys), which have ended; forgets them."""
        found = []
        for run in runs:
            samples = self._samples.pop(run, None)
            if not samples:
                continue
            totals = run_totals(sample_rows(samples)).iloc[0]
            last = max(samples, key=lambda s: s.timestamp_ms)
            size, params = InputSize.of(totals), param_features(totals["params"])
            if not size.known:
                if last.task not in self._unsized:
                    self._unsized.add(last.task)
                    logger.warning("task %s ran on an image of unknown size (order %d): its totals are "
                                   "not judged", last.task, run[0])
                continue
            pressure = float(totals["pressure"])
            for total in TOTALS:
                fit, value = self.work.verdict_fit(last.task, total, size), float(totals[total])
                if fit is None or not math.isfinite(value):
                    continue
                expected = fit.log_median(size, params, pressure)
                score = run_score(total, judged_value(total, value, size), expected,
                                  fit.spread_at(expected, size, params))
                p10, p50, p90 = fit.band(size, params, pressure)
                anomaly = total in RUN_ALARMS and score > self.thresholds.get(f"run:{total}", math.inf)
                first = anomaly and (run, total) not in self._raised
                found.append(scored(replace(last, resource=total, value=value), p50, p10, p90, score,
                                    anomaly, first, model_version))
            self._raised = {key for key in self._raised if key[0] != run}
        return found

    def forget(self, order_id: int) -> None:
        for run in self.open_runs(order_id):
            del self._samples[run]
        self._raised = {key for key in self._raised if key[0][0] != order_id}

    def open_runs(self, order_id: int | None = None) -> list[tuple[int, int, int]]:
        """Runs with samples and no verdict yet (of ``order_id``, or all)."""
        return [run for run in self._samples if order_id is None or run[0] == order_id]


class Detector:
    """A scorer, the alarm policy and a filter, and optionally the run check: what the
    monitor-consumer, re-scoring and the benchmark run. Its results carry ``model_version``
    (empty for the simple detectors)."""

    def __init__(self, scorer, filter_: ConsecutiveFilter, runs: RunCheck | None = None,
                 model_version: str = "") -> None:
        self.scorer = scorer
        self.filter = filter_
        self.runs = runs
        self.model_version = model_version

    def process(self, samples: Sequence[SampleContext]) -> list[Deviation]:
        """Score a batch (in time order within each series) and classify every sample; an
        overrun adds a ``cpu_seconds`` result after the batch's samples."""
        results = []
        for sample, (expected, lower, upper, score) in zip(samples, self.scorer.score_many(samples)):
            anomaly, first = self.filter.update(sample.series, alarm_score(sample.resource, score))
            results.append(scored(sample, expected, lower, upper, score, anomaly, first, self.model_version))
        if self.runs is not None:
            results.extend(self.runs.observe(samples, self.model_version))
        return results

    def end_runs(self, runs) -> list[Deviation]:
        """The run-level verdicts of ``runs`` (run keys) that have ended (none without a run check)."""
        return [] if self.runs is None else self.runs.end(runs, self.model_version)

    def replay(self, samples: Sequence[SampleContext]) -> list[Deviation]:
        """Every result of whole runs: their samples, then their verdicts."""
        results = self.process(samples)
        return results + self.end_runs(list(dict.fromkeys(s.run for s in samples)))


def model_thresholds(model, settings: Settings) -> dict[str, float]:
    """Per kind (models/alarms.py), the model's calibrated threshold at ``settings``'
    false-alarm rate; a model without calibration keeps ``ANOMALY_THRESHOLD`` for its samples."""
    calibration = getattr(model, "alarms", None) or AlarmCalibration({})
    thresholds = calibration.thresholds(settings.false_alarm_rate)
    if not calibration.tails:
        thresholds.update({kind: settings.anomaly_threshold for kind in thresholds if kind.startswith("sample:")})
    return thresholds


def model_detector(model, settings: Settings, model_version: str = "") -> Detector:
    """The model-band detector with the model's calibrated thresholds at ``settings``'
    false-alarm rate: what live scoring and re-scoring both run. ``model_version`` is the
    registered version of ``model``."""
    thresholds = model_thresholds(model, settings)
    per_sample = {kind.removeprefix("sample:"): t for kind, t in thresholds.items() if kind.startswith("sample:")}
    return Detector(ModelBandScorer(model), ConsecutiveFilter(per_sample, settings.anomaly_consecutive),
                    RunCheck(model.work, thresholds), model_version)
