"""Deviation scoring: one contract for every scorer, the band score, the consecutive filter."""

from __future__ import annotations

import pandas as pd
import pytest

from monitor.scoring import (
    BAND_EDGE_Z, ConsecutiveFilter, Detector, FixedThresholdScorer, ModelBandScorer,
    RollingZScorer, SampleContext, band_score,
)


class ConstantModel:
    """Expects cpu 50 (band 40-60) and memory 100 (band 90-110) whatever the features."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        centre = frame["resource"].map({"cpu": 50.0, "memory": 100.0}).astype(float)
        return pd.DataFrame({"p10": centre - 10, "p50": centre, "p90": centre + 10})


def _series(values, resource="cpu", position=0) -> list[SampleContext]:
    return [SampleContext(7, "blur", position, resource, 1_000 * (i + 1), v, float(i), "<none>", 1e6)
            for i, v in enumerate(values)]


SCORERS = [
    lambda: ModelBandScorer(ConstantModel()),
    lambda: FixedThresholdScorer({"cpu": 90.0, "memory": 200.0, "disk_read": 1e4, "disk_write": 1e4}),
    lambda: RollingZScorer(window=5, warmup=3),
]


@pytest.mark.parametrize("make", SCORERS, ids=["model", "fixed-threshold", "rolling-z"])
def test_every_scorer_keeps_the_contract(make):
    """One result per sample; a sample far above the normal level scores higher than the
    normal ones; normal samples stay under the alarm threshold."""
    scorer = make()
    samples = _series([50, 52, 49, 51, 50, 50, 400])
    results = scorer.score_many(samples)
    assert len(results) == len(samples)
    scores = [score for *_, score in results]
    assert all(abs(s) < 2.5 for s in scores[:-1])
    assert scores[-1] > 2.5 and scores[-1] > max(scores[:-1])
    for expected, lower, upper, _ in results:
        assert lower <= expected <= upper


def test_the_band_score_is_1_28_at_the_band_edges_and_signed():
    assert band_score(60, 40, 50, 60, "cpu") == pytest.approx(BAND_EDGE_Z)
    assert band_score(40, 40, 50, 60, "cpu") == pytest.approx(-BAND_EDGE_Z)
    assert band_score(50, 40, 50, 60, "cpu") == 0
    # each side is scaled by its own half of the band
    assert band_score(80, 45, 50, 70, "cpu") == pytest.approx(BAND_EDGE_Z * 30 / 20)


def test_a_zero_width_band_has_a_floor():
    """A task that never reads from disk: one small read is not infinitely surprising."""
    assert abs(band_score(4.0, 0, 0, 0, "disk_read")) < 0.1
    assert band_score(50_000.0, 0, 0, 0, "disk_read") > 100


def test_an_anomaly_needs_n_consecutive_samples_outside_and_is_raised_once():
    flt = ConsecutiveFilter(threshold=2.5, consecutive=3)
    verdicts = [flt.update(("s",), score) for score in [3, 3, 0, 3, 3, 3, 4, 0, 3]]
    assert [a for a, _ in verdicts] == [False, False, False, False, False, True, True, False, False]
    assert [f for _, f in verdicts] == [False, False, False, False, False, True, False, False, False]


def test_series_are_counted_apart():
    flt = ConsecutiveFilter(threshold=1, consecutive=2)
    assert flt.update(("a",), 5) == (False, False)
    assert flt.update(("b",), 5) == (False, False)
    assert flt.update(("a",), 5) == (True, True)


@pytest.mark.parametrize("threshold, consecutive", [(0, 3), (2.5, 0)])
def test_the_filter_rejects_meaningless_settings(threshold, consecutive):
    with pytest.raises(ValueError):
        ConsecutiveFilter(threshold, consecutive)


def test_the_detector_flags_a_sustained_excess_on_the_right_resource_only():
    samples = []
    for second, (cpu, memory) in enumerate([(50, 100)] * 3 + [(190, 101)] * 4):
        samples += [SampleContext(7, "blur", 0, "cpu", 1000 * second, cpu, second, "<none>", 1e6),
                    SampleContext(7, "blur", 0, "memory", 1000 * second, memory, second, "<none>", 1e6)]
    results = Detector(ModelBandScorer(ConstantModel()), ConsecutiveFilter(2.5, 3)).process(samples)
    flagged = [(r.sample.resource, r.sample.seconds) for r in results if r.anomaly]
    assert flagged == [("cpu", 5.0), ("cpu", 6.0)]
    raised = [r for r in results if r.first_of_episode]
    assert len(raised) == 1 and raised[0].expected == 50 and raised[0].upper == 60
