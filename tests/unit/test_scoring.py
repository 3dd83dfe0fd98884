"""Deviation scoring: one contract for every scorer, the band score, the consecutive filter."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.scoring import (
    BAND_EDGE_Z, ConsecutiveFilter, Detector, FixedThresholdScorer, ModelBandScorer,
    RollingZScorer, SampleContext, band_score,
)


class ConstantModel:
    """Expects cpu and cpu_demand 50 (band 40-60) and memory 100 (band 90-110) whatever the
    features."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        centre = frame["resource"].map({"cpu": 50.0, "cpu_demand": 50.0, "memory": 100.0}).astype(float)
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
    assert band_score(50_000.0, 0, 0, 0, "disk_read") > 50


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
        samples += [SampleContext(7, "blur", 0, "cpu_demand", 1000 * second, cpu, second, "<none>", 1e6),
                    SampleContext(7, "blur", 0, "memory", 1000 * second, memory, second, "<none>", 1e6)]
    results = Detector(ModelBandScorer(ConstantModel()), ConsecutiveFilter(2.5, 3)).process(samples)
    flagged = [(r.resource, r.timestamp_ms / 1000) for r in results if r.anomaly]  # a tick a second
    assert flagged == [("cpu_demand", 5.0), ("cpu_demand", 6.0)]
    raised = [r for r in results if r.raised]
    assert len(raised) == 1 and raised[0].expected == 50 and raised[0].upper == 60


def _ticks(resource, values, order_id=7):
    return [SampleContext(order_id, "blur", 0, resource, 1000 * (i + 1), v, float(i + 1), "<none>", 1e6)
            for i, v in enumerate(values)]


def test_contention_is_no_anomaly_but_a_stall_and_a_hog_are():
    """Sharing the cores moves usage from cpu to cpu_wait: cpu far below its band raises
    nothing, nor does cpu_wait far above; cpu_demand (their sum) does, on either side; memory
    and storage I/O only above their band (a slower task writes and grows more slowly)."""
    def flagged(resource, values):
        detector = Detector(ModelBandScorer(ConstantModel()), ConsecutiveFilter(2.5, 3))
        return any(r.anomaly for r in detector.process(_ticks(resource, values)))

    assert not flagged("cpu", [10] * 6)
    assert not flagged("cpu_wait", [400] * 6)
    assert flagged("cpu_demand", [0] * 6)  # a stall
    assert flagged("cpu_demand", [400] * 6)  # a hog
    assert not flagged("memory", [20] * 6)
    assert flagged("memory", [400] * 6)


def _work(cpu_seconds=2.5, memory=100.0, written=1000.0):
    """A work model whose blur needs ``cpu_seconds`` (spread 5 %), holds ``memory`` MiB and
    writes ``written`` KiB whatever the input: fitted on 20 generated runs."""
    import json

    from models.work import ExpectedWork

    rng = np.random.default_rng(3)
    runs = pd.DataFrame([{"order_id": i, "position": 0, "attempt": 1, "task": "blur", "prev_task": "<none>",
                          "image_pixels": 1e6, "params": json.dumps({"radius": 2.0}), "pressure": np.nan,
                          "samples": 3, "seconds": 3.0, "ended_ms": 0,
                          "cpu_seconds": cpu_seconds * np.exp(rng.normal(0, 0.05)),
                          "peak_memory": memory * np.exp(rng.normal(0, 0.01)), "bytes_read": 0.0,
                          "bytes_written": written * np.exp(rng.normal(0, 0.02))} for i in range(20)])
    return ExpectedWork.fit_runs(runs)


def _run(cpu_per_tick, memory=100.0, written=1000.0, order_id=7, position=0):
    """One run's samples, tick by tick: cpu (as cpu_seconds so far), memory, disk_write at the end."""
    samples, total = [], 0.0
    for i, cpu in enumerate(cpu_per_tick):
        total += cpu / 100
        last = i == len(cpu_per_tick) - 1
        for resource, value in (("cpu", cpu), ("memory", memory), ("disk_write", written if last else 0.0)):
            samples.append(SampleContext(order_id, "blur", position, resource, 1_000 * (i + 1), value, float(i + 1),
                                         "<none>", 1e6, cpu_seconds=total, cpu_before=total - cpu / 100))
    return samples


THRESHOLDS = {"run:cpu_seconds": 4.0, "run:peak_memory": 4.0, "run:bytes_written": 4.0}


def test_a_run_gets_a_verdict_on_each_total_at_its_end_and_a_regression_stands_out():
    from analysis.scoring import RunCheck

    check = RunCheck(_work(), THRESHOLDS)
    healthy, regressed = _run([100, 100, 50]), _run([100, 100, 100, 75], memory=150.0, written=2000.0, position=1)
    assert check.observe(healthy) == []
    # the extra work shows while the task runs: at its last tick its CPU time is already beyond
    assert [(d.resource, d.raised) for d in check.observe(regressed)] == [("cpu_seconds", True)]
    verdicts = {(d.index, d.resource): d for d in check.end([(7, 0, 1), (7, 1, 1)])}
    assert {r for _, r in verdicts} == {"cpu_seconds", "peak_memory", "bytes_written"}  # bytes_read: no samples
    assert not any(d.anomaly for (index, _), d in verdicts.items() if index == 0)
    for total in ("cpu_seconds", "peak_memory", "bytes_written"):  # 1.5 x the work, the memory; twice the writes
        assert verdicts[(1, total)].anomaly, total
    assert [total for (index, total), d in verdicts.items() if d.raised] == ["peak_memory", "bytes_written"]
    cpu = verdicts[(1, "cpu_seconds")]
    assert cpu.value == pytest.approx(3.75) and cpu.lower < 2.5 < cpu.upper  # the band is the expected total's
    assert check.end([(7, 0, 1)]) == []  # judged once


def test_a_run_past_its_threshold_while_it_runs_overran_and_is_not_raised_again_at_its_end():
    from analysis.scoring import RunCheck

    check = RunCheck(_work(), THRESHOLDS)
    ticks = _run([100] * 8)  # 8 CPU seconds where 2.5 are expected
    raised = [d for d in check.observe(ticks[:9]) if d.anomaly]  # 3 ticks: 3 s, not yet beyond
    assert raised == []
    raised = check.observe(ticks[9:])
    assert [d.resource for d in raised] == ["cpu_seconds"] and raised[0].raised
    assert raised[0].timestamp_ms == 4_000  # caught at the fourth tick, while the task runs
    at_end = {d.resource: d for d in check.end([(7, 0, 1)])}
    assert at_end["cpu_seconds"].anomaly and not at_end["cpu_seconds"].raised


def test_a_light_tasks_work_regression_stands_out_in_its_operations_cpu_time_not_its_processes():
    """0.3 s of a light task's 0.35 CPU-s are its process's fixed part (start-up, decoding, the
    Kafka client): 1.5 times its work is 1.07 times its process's CPU time, inside the noise,
    and 1.5 times its operation's (the runtime's own clock around it, from HALT)."""
    from dataclasses import replace

    from analysis.scoring import RunCheck
    from models.work import ExpectedWork

    rng = np.random.default_rng(5)
    runs = pd.DataFrame([{"order_id": i, "position": 0, "attempt": 1, "task": "blur", "prev_task": "<none>",
                          "image_pixels": 1e6, "params": "{}", "pressure": np.nan, "samples": 1, "seconds": 0.4,
                          "ended_ms": 0, "cpu_seconds": 0.35 * np.exp(rng.normal(0, 0.05)),
                          "operation_seconds": 0.05 * np.exp(rng.normal(0, 0.03)), "peak_memory": 100.0,
                          "bytes_read": 0.0, "bytes_written": 1000.0} for i in range(20)])
    check = RunCheck(ExpectedWork.fit_runs(runs), {**THRESHOLDS, "run:operation_seconds": 4.0})

    def one_tick(position, operation_seconds):
        cpu = 0.3 + operation_seconds
        return [replace(s, position=position, cpu_seconds=cpu, value=100 * cpu if s.resource == "cpu" else s.value,
                        operation_seconds=operation_seconds)
                for s in _run([100 * cpu])]

    check.observe(one_tick(0, 0.05) + one_tick(1, 0.075))
    verdicts = {(d.index, d.resource): d for d in check.end([(7, 0, 1), (7, 1, 1)])}
    assert not any(d.anomaly for (index, _), d in verdicts.items() if index == 0)
    assert not verdicts[(1, "cpu_seconds")].anomaly  # 1.07x: within the process's noise
    regressed = verdicts[(1, "operation_seconds")]
    assert regressed.anomaly and regressed.raised and regressed.value == pytest.approx(0.075)
    assert regressed.lower < 0.05 < regressed.upper


def test_a_run_on_an_image_of_unknown_size_is_not_judged_on_its_totals(caplog):
    from dataclasses import replace

    from analysis.scoring import RunCheck

    check = RunCheck(_work(), THRESHOLDS)
    unsized = [replace(s, image_pixels=float("nan")) for s in _run([100] * 8)]
    assert check.observe(unsized) == []  # no invented overrun
    assert check.end([(7, 0, 1)]) == []
    assert "unknown size" in caplog.text


def test_every_detector_of_the_benchmark_keeps_the_contract():
    from analysis.scoring import NSigmaScorer

    history = pd.DataFrame({"task": ["blur"] * 6, "resource": ["cpu"] * 6,
                            "value": [48.0, 50.0, 52.0, 49.0, 51.0, 50.0]})
    scorer = NSigmaScorer(n=3).fit(history)
    scores = [score for *_, score in scorer.score_many(_series([50, 52, 49, 400]))]
    assert all(abs(s) < 2.5 for s in scores[:-1]) and scores[-1] > 2.5


def test_a_run_writing_its_own_output_over_several_samples_is_within_its_band_a_storm_is_not():
    """A band of 0 KiB/s mid-run, a run expected to write 8 MiB: a large PNG encoded over
    several seconds writes ~1 MiB/s, which one tick could hold the whole of; 40 MiB/s is not."""
    from models.alarms import half_width_floors

    floors = half_width_floors(["disk_write", "disk_write", "memory"], [8192.0, 8192.0, 8192.0])
    assert floors.tolist() == [8192.0, 8192.0, 2.0]  # memory keeps its physical floor
    assert band_score(1024.0, 0.0, 0.0, 0.0, "disk_write", floors[0]) < 1.28
    assert band_score(40960.0, 0.0, 0.0, 0.0, "disk_write", floors[0]) > 6


def test_a_run_reading_its_own_input_from_a_cold_cache_is_not_judged_for_it():
    from models.alarms import judged_value
    from models.work import InputSize

    size = InputSize(1e6, 3, 2_500_000)  # a 2.4 MiB input file
    assert judged_value("bytes_read", 2441.4, size) == pytest.approx(0.0, abs=0.1)  # read once: nothing judged
    assert judged_value("bytes_read", 3 * 2441.4, size) == pytest.approx(2 * 2441.4, abs=0.5)
    assert judged_value("bytes_written", 100.0, size) == 100.0


def test_a_runs_reads_are_judged_and_stored_but_raise_nothing():
    """What a run reads from storage is the page cache's state: a cold cache is no fault."""
    from analysis.scoring import RunCheck

    check = RunCheck(_work(), {**THRESHOLDS, "run:bytes_read": 4.0})
    samples = [s for s in _run([100, 100, 50])]
    samples += [SampleContext(7, "blur", 0, "disk_read", 3_000, 50_000.0, 3.0, "<none>", 1e6, interval_s=1.0)]
    check.observe(samples)
    verdicts = {d.resource: d for d in check.end([(7, 0, 1)])}
    assert verdicts["bytes_read"].value == pytest.approx(50_000.0) and verdicts["bytes_read"].score > 4.0
    assert not verdicts["bytes_read"].anomaly


def test_every_result_holds_plain_python_numbers_whatever_the_scorer_computed_with():
    """PostgreSQL's COPY writes what str() gives: a NumPy scalar would be 'np.float64(1.5)'."""
    from analysis.scoring import scored

    sample = _series([50.0])[0]
    result = scored(sample, np.float64(1.0), np.float64(0.5), np.float64(2.0), np.float64(4.2), np.bool_(True),
                    np.bool_(False), "1")
    assert all(type(v) is float for v in (result.value, result.expected, result.lower, result.upper, result.score))
    assert type(result.anomaly) is bool and type(result.raised) is bool
