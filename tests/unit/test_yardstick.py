"""The honest yardstick: the GBM baseline, folds by order, the verdict rule and the champion rule.

No servers. The GBM is held to learning a known relation; the folds to never sharing an order;
the verdict to the rule as written in training/verdict.py, on hand-made per-fold figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.features import FEATURE_COLUMNS, NO_PREVIOUS
from training.errors import InsufficientDataError
from training import synthetic
from training.baseline import QuantileTableBaseline
from training.champion import CurrentChampion, decide
from training.cli import build_parser
from training.crossval import CHAMPION, GBM, NETWORK, TABLE, cross_validate
from training.folds import hold_out, k_folds, order_folds
from training.gbm_baseline import GradientBoostingBaseline
from training.metrics import score
from training.tracking import input_example, model_signature
from training.trainer import TrainConfig, fit
from training.verdict import judge, sentences, table

BASE = {"blur": {"cpu": 80.0, "memory": 30.0}, "resize": {"cpu": 40.0, "memory": 10.0},
        "denoise": {"cpu": 150.0, "memory": 60.0}}
SIGMA = 0.3


def _relation(n: int, seed: int) -> pd.DataFrame:
    """Usage = base(task, resource) * megapixels^0.7 * log-normal noise (sigma 0.3)."""
    rng = np.random.default_rng(seed)
    task = rng.choice(list(BASE), size=n)
    resource = rng.choice(["cpu", "memory"], size=n)
    pixels = np.exp(rng.uniform(np.log(0.1e6), np.log(4e6), size=n))
    median = np.array([BASE[t][r] for t, r in zip(task, resource)]) * (pixels / 1e6) ** 0.7
    return pd.DataFrame({
        "order_id": np.arange(n) // 10, "task": task, "resource": resource,
        "seconds": rng.uniform(0, 10, size=n), "position": rng.integers(0, 3, size=n),
        "prev_task": NO_PREVIOUS, "image_pixels": pixels,
        "value": median * np.exp(rng.normal(0, SIGMA, size=n)), "true_p50": median,
    })


def test_gbm_learns_task_and_image_size_and_its_band_holds_80_percent():
    train, test = _relation(6000, seed=1), _relation(3000, seed=2)
    assert "node_cpu_pressure" not in train  # a feature the data lacks is missing, not an error
    gbm = GradientBoostingBaseline().fit(train)
    predicted = gbm.predict(test)
    assert list(predicted.columns) == ["p10", "p50", "p90"] and predicted.index.equals(test.index)
    values = predicted.to_numpy()
    assert np.isfinite(values).all() and (values[:, 0] <= values[:, 1]).all() and (values[:, 1] <= values[:, 2]).all()
    scores = score(test, predicted)
    table_scores = score(test, QuantileTableBaseline().fit(train).predict(test))
    for resource, row in scores.per_resource.iterrows():
        assert 0.72 <= row["coverage"] <= 0.88, (resource, row["coverage"])
        # The table ignores the image size; the trees do not.
        assert row["mae_p50"] < 0.6 * table_scores.per_resource.loc[resource, "mae_p50"], resource
    truth = np.log(test["true_p50"].to_numpy())
    assert np.corrcoef(np.log(predicted["p50"].to_numpy()), truth)[0, 1] > 0.97


def test_gbm_reads_the_feature_columns_it_is_given_and_survives_the_unknown():
    assert GradientBoostingBaseline().features == tuple(FEATURE_COLUMNS)
    rng = np.random.default_rng(0)
    n = 3000
    zone = rng.choice(["a", "b"], size=n)
    load = rng.uniform(0, 100, size=n)
    value = np.where(zone == "a", 10.0, 100.0) * (1 + load / 10) * np.exp(rng.normal(0, 0.1, n))
    frame = pd.DataFrame({"resource": rng.choice(["cpu", "cpu_demand"], size=n), "zone": zone, "load": load,
                          "value": value})
    gbm = GradientBoostingBaseline(features=("resource", "zone", "load"), categorical=("resource", "zone")).fit(frame)
    asked = pd.DataFrame({"resource": ["cpu", "cpu_demand", "cpu", "gpu", "cpu"],
                          "zone": ["a", "b", "b", "a", "never-seen"], "load": [50.0, 50.0, 90.0, 50.0, 50.0]})
    p50 = gbm.predict(asked)["p50"].to_numpy()
    assert p50[0] == pytest.approx(60.0, rel=0.1) and p50[1] == pytest.approx(600.0, rel=0.1)
    assert p50[2] == pytest.approx(1000.0, rel=0.1)
    assert np.isfinite(p50).all()  # an unknown resource and category still get an answer
    without_load = gbm.predict(asked.drop(columns="load"))
    assert np.isfinite(without_load.to_numpy()).all()


def test_folds_hold_each_order_out_exactly_once():
    frame = synthetic.generate(40, seed=2)
    folds = k_folds(frame, 3, seed=7)
    held_out = [set(fold.test["order_id"]) for fold in folds]
    assert not (held_out[0] & held_out[1] or held_out[0] & held_out[2] or held_out[1] & held_out[2])
    assert set().union(*held_out) == set(frame["order_id"])
    assert sorted(len(ids) for ids in held_out) == [13, 13, 14]
    assert sum(len(fold.test) for fold in folds) == len(frame)
    for fold in folds:
        train, validation, test = (set(part["order_id"]) for part in (fold.train, fold.validation, fold.test))
        assert train and validation and not (train & validation or train & test or validation & test)
        assert train | validation | test == set(frame["order_id"])
        assert len(fold.train) + len(fold.validation) + len(fold.test) == len(frame)
    again = order_folds(frame["order_id"].to_numpy(), 3, seed=7)
    assert [set(ids) for ids in again] == held_out
    assert [set(ids) for ids in order_folds(frame["order_id"].to_numpy(), 3, seed=8)] != held_out
    with pytest.raises(InsufficientDataError):
        order_folds(np.array([1, 2, 3]), 3, seed=0)
    train, validation = hold_out(frame, seed=0)
    assert not set(train["order_id"]) & set(validation["order_id"]) and len(train) + len(validation) == len(frame)


def _metrics(network: dict[str, list[float]], gbm: dict[str, list[float]]) -> pd.DataFrame:
    """Long per-fold rows as cross_validate makes them, from per-fold pinball losses."""
    rows = [{"fold": fold, "model": model, "resource": resource, "n": 100, "pinball": value,
             "mae_p50": 2 * value, "coverage": 0.8}
            for model, figures in ((NETWORK, network), (GBM, gbm))
            for resource, values in figures.items() for fold, value in enumerate(values, start=1)]
    return pd.DataFrame(rows)


def test_better_on_average_but_clearly_worse_on_one_resource_is_not_a_win():
    metrics = _metrics({"cpu": [1.0, 1.1, 0.9], "memory": [1.0, 1.0, 1.0], "bytes_written": [2.2, 2.3, 2.1]},
                       {"cpu": [2.0, 2.1, 1.9], "memory": [2.0, 2.0, 2.0], "bytes_written": [2.0, 2.05, 1.95]})
    judgement = judge(metrics)
    assert judgement.ratio < 0.8  # far better on average...
    assert judgement.losses == ["bytes_written"]  # ...but 0.2 worse on bytes_written, spread 0.05
    assert not judgement.wins
    said = sentences(judgement)
    assert "bytes_written: network 2.2 ± 0.1, GBM 2 ± 0.05: GBM better" in said
    assert "cpu: network 1 ± 0.1, GBM 2 ± 0.1: network better" in said
    assert "Overall the network does NOT beat the GBM" in said and "it loses bytes_written" in said


def test_worse_on_one_resource_within_its_spread_still_wins():
    metrics = _metrics({"cpu": [1.0, 1.1, 0.9], "disk_read": [2.5, 1.6, 2.2]},
                       {"cpu": [2.0, 2.1, 1.9], "disk_read": [2.0, 2.05, 1.95]})
    judgement = judge(metrics)
    assert [r.outcome for r in judgement.resources] == ["better", "level"]  # sorted: cpu, disk_read
    assert judgement.wins


def test_better_everywhere_wins_and_level_on_average_does_not():
    better = judge(_metrics({"cpu_seconds": [1.0, 1.2, 0.8], "peak_memory": [5.0, 5.5, 4.5]},
                            {"cpu_seconds": [1.5, 1.7, 1.3], "peak_memory": [6.0, 6.5, 5.5]}))
    assert better.wins and not better.losses
    assert sentences(better).splitlines()[-1].startswith("Overall the network beats the GBM: its pinball loss "
                                                         "is 0.75 times the GBM's")
    level = judge(_metrics({"cpu_seconds": [0.995, 0.995, 0.995]}, {"cpu_seconds": [1.0, 1.0, 1.0]}))
    assert level.resources[0].outcome == "better" and not level.wins  # within the 1% margin: a tie
    # A resource the GBM forecasts perfectly has no ratio; the per-resource rule still counts it.
    perfect = judge(_metrics({"cpu_seconds": [1.0, 1.0, 1.0], "bytes_written": [0.1, 0.1, 0.1]},
                             {"cpu_seconds": [2.0, 2.0, 2.0], "bytes_written": [0.0, 0.0, 0.0]}))
    assert perfect.ratio == pytest.approx(0.5) and perfect.losses == ["bytes_written"] and not perfect.wins


def test_losses_far_below_a_resources_resolution_are_no_ratio_to_speak_of():
    """disk_read is nearly always 0: 0.1 KiB/s of pinball against 0.03 is not "3.3 times";
    each loss counts on top of a tenth of the resource's resolution (64 KiB/s)."""
    judgement = judge(_metrics({"disk_read": [0.1, 0.12, 0.08]}, {"disk_read": [0.03, 0.03, 0.03]}))
    assert judgement.resources[0].ratio == pytest.approx((0.1 + 6.4) / (0.03 + 6.4))


def test_champion_rule():
    first = decide("1", False, 1.3, None)
    assert first.promote and "version 1 registered and is now the champion" in first.line
    assert "does NOT beat the GBM" in first.line
    assert decide("1", True, 0.8, None).promote
    stays = decide("2", False, 1.3, CurrentChampion("1", 0.9))
    assert not stays.promote and "version 2 registered; champion stays version 1" in stays.line
    worse = decide("2", True, 0.8, CurrentChampion("1", 1.05))
    assert not worse.promote and "worse than the champion" in worse.line
    better = decide("3", True, 0.8, CurrentChampion("2", 0.9))
    assert better.promote and "now the champion, was version 2" in better.line
    tie = decide("2", True, 0.8, CurrentChampion("1", 0.97))  # a refit on the same data lands here
    assert not tie.promote and "champion stays version 1" in tie.line and "not clearly better" in tie.line
    uneven = decide("2", True, 0.8, CurrentChampion("1", 0.9, losses=("disk_read",)))
    assert not uneven.promote and "loses disk_read to the champion" in uneven.line
    unloadable = decide("2", False, 1.3, CurrentChampion("1", None, "no pressure_fill"))
    assert unloadable.promote and "cannot be loaded" in unloadable.line


def test_cross_validation_scores_every_sample_once_per_model():
    frame = synthetic.generate(24, seed=4)
    folds = k_folds(frame, 3, seed=0)
    config = TrainConfig(epochs=2, seed=0)
    first = cross_validate(folds, config, progress=False)
    assert set(first.metrics["model"]) == {NETWORK, GBM, TABLE}
    per_model = first.metrics.groupby("model")["n"].sum()
    assert (per_model == len(frame)).all()
    assert first.orders() == 24 and first.samples() == len(frame)
    # Any trained network stands in for a registered champion.
    stand_in = fit(folds[0].train, folds[0].validation, config, progress=False).model
    second = cross_validate(folds, config, champion=stand_in, progress=False)
    assert set(second.metrics["model"]) == {NETWORK, GBM, TABLE, CHAMPION}
    printed = table(second.metrics, orders=24, seed=0)
    assert "3 folds by whole order" in printed and "MAE of P50" in printed and "pinball loss" in printed
    for resource in synthetic.SIGMA:
        assert resource in printed
    assert printed.count("quantile table") == len(synthetic.SIGMA)


def test_fit_takes_folds_from_the_command_line():
    assert build_parser().parse_args(["fit"]).folds == 3
    assert build_parser().parse_args(["fit", "--folds", "5"]).folds == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--folds", "1"])  # one fold holds nothing out to compare on


def test_the_logged_signature_leaves_only_the_optional_features_optional():
    example = input_example(synthetic.generate(3, seed=0).drop(columns="node_cpu_pressure").head(5))
    assert list(example.columns) == FEATURE_COLUMNS and example["node_cpu_pressure"].isna().all()
    predicted = pd.DataFrame({"p10": [1.0] * 5, "p50": [2.0] * 5, "p90": [3.0] * 5})
    inputs = {c.name: c.required for c in model_signature(example, predicted).inputs.inputs}
    optional = ("node_cpu_pressure", "interval_s", "cpu_before", "params", "image_channels", "image_bytes")
    assert inputs == {c: c not in optional for c in FEATURE_COLUMNS}


def test_a_difference_below_a_resources_resolution_loses_nothing():
    """0.1 KiB/s more pinball on disk_read in every fold: consistent, and no difference a
    sample can resolve (64 KiB/s)."""
    judgement = judge(_metrics({"disk_read": [38.6, 40.1, 37.2]}, {"disk_read": [38.5, 40.0, 37.1]}))
    assert judgement.resources[0].outcome == "level" and judgement.losses == []


def test_the_table_gives_the_special_folds_a_line_each_with_the_verdicts_ratios():
    from training.verdict import table

    metrics = _metrics({"cpu": [1.0, 1.0, 1.0]}, {"cpu": [2.0, 2.0, 2.0]}).assign(kind="k-fold")
    special = _metrics({"cpu": [3.0]}, {"cpu": [1.5]}).assign(fold=4, kind="extrapolation")
    text = table(pd.concat([metrics, special], ignore_index=True), orders=12, seed=0)
    assert text.splitlines()[0].startswith("3 folds by whole order")  # the K folds' table alone
    line = text.splitlines()[-1]
    # cpu's losses count on top of a tenth of its resolution (5 % of a core): (3 + 0.5) / (1.5 + 0.5)
    assert line.startswith("extrapolation fold (fold 4, 100 samples): network pinball / GBM's: cpu 1.75x"), line
