"""The work model (models/work.py) and the alarm calibration (models/alarms.py) on runs of known
structure: totals that grow with the pixels and a parameter, over a fixed part, with noise of
known spread. What must hold is what the checks from outside ask: a band that moves where the
work puts it on images twice the largest in the history and on a parameter value never seen,
one scaling path, no invented overrun for an unknown size, thresholds at a stated rate."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from models.alarms import AlarmCalibration, TailFit, alarm_statistics, streak_statistic
from models.runs import run_totals
from models.work import MAX_PROGRESS, PROGRESS_FILL, ExpectedWork, param_features, with_progress

SIZES = (320 * 240, 640 * 480, 800 * 600)


def truth(pixels: float, passes: int, pressure: float) -> dict[str, float]:
    """A median-like task: CPU in proportion to pixels x passes (10 % more on a busy node),
    memory a fixed 45 MiB plus 12 bytes per pixel, the output ~1 byte per pixel."""
    return {"cpu_seconds": (0.03 + 1.5e-6 * pixels * passes) * (1 + 0.1 * pressure / 100),
            "peak_memory": 45.0 + 12e-6 * pixels, "bytes_read": 0.0, "bytes_written": pixels / 1024}


def history(runs: int = 90, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(runs):
        pixels, passes, pressure = SIZES[i % 3], (1, 2, 3)[(i // 3) % 3], float(rng.uniform(0, 95))
        noise = {"cpu_seconds": 0.04, "peak_memory": 0.01, "bytes_read": 0.0, "bytes_written": 0.02}
        totals = {k: v * math.exp(rng.normal(0, noise[k])) for k, v in truth(pixels, passes, pressure).items()}
        rows.append({"order_id": i, "position": 0, "attempt": 1, "task": "median", "prev_task": "<none>",
                     "image_pixels": float(pixels), "params": json.dumps({"passes": passes, "size": 5}),
                     "pressure": pressure, "samples": 3, "seconds": 3.0, "ended_ms": 0, **totals})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def work() -> ExpectedWork:
    return ExpectedWork.fit_runs(history())


@pytest.mark.parametrize("pixels,passes", [(2 * SIZES[-1], 2), (SIZES[-1], 6), (1.7 * SIZES[-1], 5)])
def test_the_band_moves_where_the_work_puts_it_beyond_the_history(work, pixels, passes):
    """Twice the largest image, a number of passes never seen, both: the median within 10 %
    of the truth for every total, and the truth inside a band that stays narrow."""
    for total, want in truth(pixels, passes, 40.0).items():
        band = work.band("median", pixels, {"passes": passes, "size": 5}, total, pressure=40.0)
        if total == "bytes_read":
            assert band[2] < 64  # reads nothing: within the noise floor
            continue
        assert band[1] == pytest.approx(want, rel=0.10), total
        assert band[2] / band[0] < 1.25, total  # narrow enough for a 1.5x regression to stand out


def test_a_task_never_seen_or_an_image_of_unknown_size_has_no_expectation(work):
    assert work.band("sepia", 1e6) is None
    assert work.band("median", float("nan"), {"passes": 2}) is None
    assert work.band("median", 0, {"passes": 2}) is None


def test_parameters_become_numbers_that_scale_as_powers():
    features = param_features(json.dumps({"passes": 6, "size": 5, "expand": True, "method": "luminance",
                                          "scale": None, "degrees": -90.0}))
    assert features["passes"] - param_features({"passes": 2})["passes"] == pytest.approx(math.log(3), abs=0.01)
    assert features["expand"] == 1.0 and features["degrees"] < 0
    assert "method" not in features and "scale" not in features
    assert param_features("not json") == {}


def test_the_work_model_saves_and_loads_the_same_bands(work):
    loaded = ExpectedWork.from_dict(json.loads(json.dumps(work.to_dict())))
    assert loaded.band("median", 1.3e6, {"passes": 4}) == pytest.approx(work.band("median", 1.3e6, {"passes": 4}))


def test_progress_is_cpu_time_over_the_work_the_run_needs_whatever_the_wall_clock(work):
    need = work.band("median", SIZES[1], {"passes": 2, "size": 5})[1]
    frame = pd.DataFrame({"task": ["median", "median", "median", "sepia"], "image_pixels": [SIZES[1]] * 4,
                          "params": [json.dumps({"passes": 2, "size": 5})] * 4,
                          "cpu_before": [need / 4, need / 2, 9 * need, 0.5], "seconds": [0.5, 4.0, 30.0, 1.0]})
    progress = with_progress(frame, work)["progress"].tolist()
    assert progress == pytest.approx([0.25, 0.5, MAX_PROGRESS, PROGRESS_FILL])


def test_run_totals_add_up_the_samples_of_each_run():
    rows = pd.DataFrame([
        # one run, two ticks: a 1 s tick and a 0.5 s closing one
        *[{"order_id": 1, "position": 0, "attempt": 1, "task": "blur", "prev_task": "<none>", "image_pixels": 1e6,
           "params": "{}", "node_cpu_pressure": p, "ts_ms": ts, "seconds": s, "interval_s": i, "cpu_seconds": c,
           "resource": r, "value": v, "operation_seconds": 1.1 if ts == 1500 else math.nan}
          for ts, s, i, c, p, values in ((1000, 1.0, 1.0, 0.9, 40.0, {"memory": 60.0, "disk_write": 0.0, "cpu": 90.0}),
                                         (1500, 1.5, 0.5, 1.4, 60.0, {"memory": 70.0, "disk_write": 2048.0, "cpu": 100.0}))
          for r, v in values.items()]])
    totals = run_totals(rows).iloc[0]
    assert totals["cpu_seconds"] == pytest.approx(1.4)
    assert totals["peak_memory"] == 70.0
    assert totals["bytes_written"] == pytest.approx(1024.0)  # 2048 KiB/s over half a second
    assert math.isnan(totals["bytes_read"])  # never measured: not zero
    assert totals["pressure"] == pytest.approx(50.0) and totals["samples"] == 2
    assert totals["operation_seconds"] == 1.1  # reported by the run at its end (its closing sample)


def test_a_streak_statistic_is_the_level_three_samples_in_a_row_all_reach():
    assert streak_statistic(np.array([1.0, 9.0, 2.0, 5.0, 6.0, 4.0]), 3) == 4.0
    assert streak_statistic(np.array([9.0, 9.0]), 3) == 0.0  # too short to alarm this way


def test_thresholds_leave_the_stated_rate_of_false_alarms_on_runs_the_calibration_never_saw():
    """Statistics of healthy runs drawn from known distributions: a threshold set at a rate
    from 200 calibration runs lets about that rate of 100,000 fresh ones through, on average
    over 20 calibrations (one calibration of 200 runs is off by a factor of 2 or 3 either way at
    1 in 1,000: the reason benchmarks measure the rate on fresh runs)."""
    rng = np.random.default_rng(7)
    draws = {"normal": lambda n: rng.normal(0.3, 1.2, n), "exponential": lambda n: rng.exponential(1.0, n)}
    for tail, draw in draws.items():
        for rate in (1e-2, 1e-3):
            observed = [float((draw(100_000) > TailFit.fit(draw(200), tail).threshold(rate)).mean())
                        for _ in range(20)]
            assert rate / 3 <= np.mean(observed) <= rate * 2, (tail, rate, observed)
    assert TailFit.fit(np.zeros(5), "normal") is None  # too few runs: no calibration


def test_a_calibration_splits_its_budget_over_the_kinds_and_survives_a_save(work):
    rng = np.random.default_rng(1)
    stats = pd.DataFrame({"order_id": range(400), "position": 0, "attempt": 1,
                          "kind": ["run:cpu_seconds"] * 200 + ["sample:memory"] * 200,
                          "statistic": np.concatenate([rng.normal(0, 1, 200), rng.exponential(1, 200)]),
                          "samples": 3})
    calibration = AlarmCalibration.fit(stats)
    loaded = AlarmCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    strict, loose = loaded.thresholds(1e-3), loaded.thresholds(1e-1)
    assert strict == calibration.thresholds(1e-3)
    assert strict["run:cpu_seconds"] > loose["run:cpu_seconds"] and strict["sample:memory"] > loose["sample:memory"]
    assert strict["run:peak_memory"] == strict["sample:cpu_demand"]  # uncalibrated kinds: the fallback


def test_alarm_statistics_score_held_out_runs_against_their_work(work):
    runs = history(6, seed=9)
    rows = pd.DataFrame([{"order_id": r.order_id, "position": 0, "attempt": 1, "task": "median",
                          "prev_task": "<none>", "image_pixels": r.image_pixels, "params": r.params,
                          "node_cpu_pressure": r.pressure, "ts_ms": 1000, "seconds": 1.0, "interval_s": 1.0,
                          "cpu_seconds": r.cpu_seconds, "resource": resource, "value": value}
                         for r in runs.itertuples()
                         for resource, value in (("memory", r.peak_memory), ("disk_write", r.bytes_written))])
    bands = pd.DataFrame({"p10": rows["value"] * 0.9, "p50": rows["value"], "p90": rows["value"] * 1.1},
                         index=rows.index)
    stats = alarm_statistics(rows, bands, work)
    per_kind = stats.groupby("kind")["statistic"]
    assert per_kind.size()["run:cpu_seconds"] == 6 and per_kind.size()["sample:memory"] == 6
    assert (per_kind.max()["sample:memory"]) == 0.0  # one sample per run: no streak
    assert per_kind.apply(lambda s: s.abs().max())["run:peak_memory"] < 4  # healthy: within a few spreads


def test_the_work_follows_the_inputs_channels_and_detail():
    """An output's bytes follow the input's values (pixels x channels) and its detail (file
    bytes per value): learnt from RGB and grayscale inputs, smooth and noisy, the band holds
    for a noisy grayscale input twice the largest size."""
    rng = np.random.default_rng(4)
    rows = []
    for i in range(60):
        pixels, channels, detail = SIZES[i % 3], (3, 1)[(i // 3) % 2], (0.2, 0.8)[(i // 6) % 2]
        written = 0.9 * detail * pixels * channels / 1024 * math.exp(rng.normal(0, 0.03))
        rows.append({"order_id": i, "position": 0, "attempt": 1, "task": "sharpen", "prev_task": "<none>",
                     "image_pixels": float(pixels), "image_channels": float(channels),
                     "image_bytes": detail * pixels * channels, "params": "{}", "pressure": 50.0, "samples": 1,
                     "seconds": 0.5, "ended_ms": 0, "cpu_seconds": 0.1, "peak_memory": 50.0, "bytes_read": 0.0,
                     "bytes_written": written})
    work = ExpectedWork.fit_runs(pd.DataFrame(rows))
    from models.work import InputSize

    pixels = 2 * SIZES[-1]
    band = work.band("sharpen", InputSize(pixels, 1, 0.8 * pixels), total="bytes_written")
    assert band[0] < 0.9 * 0.8 * pixels / 1024 < band[2]
    # without the channels and the file size the model still answers, with the history's typical input
    assert work.band("sharpen", pixels, total="bytes_written") is not None


def test_a_channel_is_not_taken_for_a_full_share_of_the_work_when_the_history_says_otherwise():
    """PIL holds a grey pixel in one byte and a colour one in four: a task's memory on a grey
    input is a quarter of a colour one's, not the third that pixels x channels says. Learnt from
    a history of both, a grey input twice the largest size is expected within 5 %."""
    from models.work import InputSize

    def memory(pixels: float, channels: int) -> float:
        return 40.0 + 16e-6 * pixels * (4 if channels == 3 else 1)

    rng = np.random.default_rng(6)
    rows = []
    for i in range(60):
        pixels, channels = SIZES[i % 3], (3, 1)[(i // 3) % 2]
        rows.append({"order_id": i, "position": 0, "attempt": 1, "task": "blur", "prev_task": "<none>",
                     "image_pixels": float(pixels), "image_channels": float(channels), "image_bytes": np.nan,
                     "params": "{}", "pressure": 50.0, "samples": 2, "seconds": 1.0, "ended_ms": 0,
                     "cpu_seconds": 0.5, "peak_memory": memory(pixels, channels) * math.exp(rng.normal(0, 0.01)),
                     "bytes_read": 0.0, "bytes_written": 100.0})
    work = ExpectedWork.fit_runs(pd.DataFrame(rows))
    for channels in (1, 3):
        band = work.band("blur", InputSize(2 * SIZES[-1], channels), total="peak_memory")
        assert band[1] == pytest.approx(memory(2 * SIZES[-1], channels), rel=0.05), channels


def test_writes_are_judged_against_the_output_the_run_wrote_when_it_is_known():
    """How many bytes an image encodes to depends on its content, which no input size says;
    a run writes its output once: against that, twice the writes stand out whatever the
    content."""
    from models.work import BY_OUTPUT, InputSize

    rng = np.random.default_rng(5)
    rows = []
    for i in range(40):
        output = SIZES[i % 3] * float(rng.uniform(0.5, 3.0))  # content: a factor of 6 between runs
        rows.append({"order_id": i, "position": 0, "attempt": 1, "task": "flip", "prev_task": "<none>",
                     "image_pixels": float(SIZES[i % 3]), "image_channels": 3.0, "image_bytes": np.nan,
                     "output_bytes": output, "params": "{}", "pressure": 50.0, "samples": 1, "seconds": 0.3,
                     "ended_ms": 0, "cpu_seconds": 0.1, "peak_memory": 50.0, "bytes_read": 0.0,
                     "bytes_written": (output + 8192) / 1024 * math.exp(rng.normal(0, 0.01))})
    work = ExpectedWork.fit_runs(pd.DataFrame(rows))
    known = InputSize(2 * SIZES[-1], 3, math.nan, output_bytes=4e6)
    fit = work.verdict_fit("flip", "bytes_written", known)
    assert fit is work.fit_of("flip", BY_OUTPUT)
    from models.alarms import run_score

    expected = fit.log_median(known, {})
    healthy, doubled = (4e6 + 8192) / 1024, (2 * 4e6 + 8192) / 1024
    assert abs(run_score("bytes_written", healthy, expected, fit.spread_at(expected))) < 3
    assert run_score("bytes_written", doubled, expected, fit.spread_at(expected)) > 20
    # the output not known (a run still going): judged by what its input says
    assert work.verdict_fit("flip", "bytes_written", InputSize(2 * SIZES[-1])) is work.fit_of("flip", "bytes_written")


def test_the_spread_grows_with_how_far_beyond_the_history_the_input_is(work):
    """Inside the history's pixels a total is judged against the residuals' spread; beyond
    them, the doubt about the power it grows by is added: 8x the largest input is judged more
    loosely than 2x, and a 1.5x memory regression at 2x still stands far outside."""
    from models.work import InputSize

    fit = work.fit_of("median", "peak_memory")
    inside, twice, eight = (fit.spread_at(fit.log_median(p, {}), InputSize(p))
                            for p in (SIZES[1], 2 * SIZES[-1], 8 * SIZES[-1]))
    assert inside == pytest.approx(fit.spread_at(fit.log_median(SIZES[1], {})))
    assert inside < twice < eight
    assert math.log(1.5) / twice > 6


def test_a_setting_beyond_the_historys_is_judged_more_loosely_the_further_it_lies():
    """The history ran 1 to 3 passes and window sizes of 5: 2 passes are inside it; 6 passes
    or a window of 9 lie beyond, where the fitted or declared power is a guess (POWER_DOUBT),
    and their run totals are judged against a wider spread; the pixels' doubt adds to it."""
    from models.work import InputSize

    work = ExpectedWork.fit_runs(history(), {"median": {"size": 1.8}})  # size declared: kept though it never varied
    fit = work.fit_of("median", "cpu_seconds")

    def spread(setting, pixels=SIZES[1]):
        features = param_features(setting)
        return fit.spread_at(fit.log_median(pixels, features), InputSize(pixels), features)

    inside = spread({"passes": 2, "size": 5})
    assert fit.beyond_settings(param_features({"passes": 2, "size": 5})) == 0.0
    assert inside == pytest.approx(fit.spread_at(fit.log_median(SIZES[1], param_features({"passes": 2, "size": 5}))))
    assert inside < spread({"passes": 4, "size": 5}) < spread({"passes": 6, "size": 5})
    assert spread({"passes": 6, "size": 5}) < spread({"passes": 6, "size": 5}, 2 * SIZES[-1])
    assert spread({"passes": 2, "size": 9}) > inside  # a window the history never had
    loaded = ExpectedWork.from_dict(json.loads(json.dumps(work.to_dict()))).fit_of("median", "cpu_seconds")
    assert loaded.ranges == fit.ranges


def test_a_declared_power_moves_the_band_for_a_setting_the_history_never_had():
    """The history always ran ``size`` 5; the task declares its work grows as size**2. A run
    at size 9 is expected at (9/5)**2 the CPU time; without the declaration the model could
    not know, and expects size 5's."""
    runs = history()
    at_nine = truth(SIZES[1], 2, 40.0)["cpu_seconds"]
    grown = 0.03 + (at_nine - 0.03 * 1.04) / 1.04 * (9 / 5) ** 2  # the per-pixel part x (9/5)^2, at pressure 40
    declared = ExpectedWork.fit_runs(runs, {"median": {"size": 2.0}})
    silent = ExpectedWork.fit_runs(runs)
    setting = {"passes": 2, "size": 9}
    assert declared.band("median", SIZES[1], setting, pressure=40.0)[1] == pytest.approx(grown * 1.04, rel=0.10)
    assert silent.band("median", SIZES[1], setting, pressure=40.0)[1] == pytest.approx(at_nine, rel=0.10)
    # memory is not the CPU work: the declaration leaves it alone
    assert declared.band("median", SIZES[1], setting, "peak_memory")[1] == pytest.approx(
        silent.band("median", SIZES[1], setting, "peak_memory")[1], rel=0.01)


def test_the_history_corrects_a_declared_power_where_the_parameter_varied():
    """Declared as passes**2, the work grows as passes**1 in a history of 1 to 3 passes: the
    fit follows the runs, and 6 passes are expected at twice 3's, not four times."""
    work = ExpectedWork.fit_runs(history(), {"median": {"passes": 2.0}})
    want = truth(SIZES[2], 6, 40.0)["cpu_seconds"]
    assert work.band("median", SIZES[2], {"passes": 6, "size": 5}, pressure=40.0)[1] == pytest.approx(want, rel=0.12)


def test_held_out_runs_set_the_band_edges_of_the_totals_they_judge(work):
    """A fit's in-sample residuals are narrower than the runs it never saw: the P10 and P90 of
    held-out runs' statistics (in spreads) become the band's edges, for that total alone, and
    survive a save."""
    values = np.linspace(-1.5, 4.5, 201)  # held-out runs: P10 -0.9, P90 3.9 spreads
    statistics = pd.DataFrame({"kind": "run:cpu_seconds", "statistic": values})
    widened = work.with_heldout(statistics)
    setting, size = {"passes": 2, "size": 5}, SIZES[1]
    fit = widened.fit_of("median", "cpu_seconds")
    log_median = fit.log_median(size, param_features(setting), 40.0)
    spread = fit.spread_at(log_median, size)
    p10, p50, p90 = widened.band("median", size, setting, pressure=40.0)
    floor = fit.floor
    assert math.log(p90 + floor) - log_median == pytest.approx(3.9 * spread, rel=0.01)
    assert math.log(p10 + floor) - log_median == pytest.approx(-0.9 * spread, rel=0.01)
    assert p50 == pytest.approx(work.band("median", size, setting, pressure=40.0)[1])
    assert widened.band("median", size, setting, "peak_memory") == work.band("median", size, setting, "peak_memory")
    loaded = ExpectedWork.from_dict(json.loads(json.dumps(widened.to_dict())))
    assert loaded.band("median", size, setting, pressure=40.0) == pytest.approx((p10, p50, p90))
    few = work.with_heldout(statistics.head(5))  # too few held-out runs to say: the fit's own band
    assert few.band("median", size, setting, pressure=40.0) == work.band("median", size, setting, pressure=40.0)


def test_a_busier_node_never_lowers_the_expected_cpu_time():
    """A history whose busy runs happened to be the quick ones (a task run mostly on a quiet
    node, a few lucky runs under load) must not teach that load saves CPU time: on a saturated
    node the same work is expected at least at its quiet-node time. Memory is left free."""
    runs = history()
    lucky = np.exp(-0.3 * runs["pressure"] / 100)
    work = ExpectedWork.fit_runs(runs.assign(cpu_seconds=runs["cpu_seconds"] * lucky,
                                             peak_memory=runs["peak_memory"] * lucky))
    setting = {"passes": 2, "size": 5}
    quiet, saturated = (work.band("median", SIZES[1], setting, pressure=p)[1] for p in (0.0, 100.0))
    assert saturated >= quiet * 0.999
    memory = [work.band("median", SIZES[1], setting, "peak_memory", pressure=p)[1] for p in (0.0, 100.0)]
    assert memory[1] < memory[0] * 0.85  # what the runs say, where no physics says otherwise
