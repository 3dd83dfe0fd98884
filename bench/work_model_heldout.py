"""The work model's run verdicts on runs it never saw, offline, from a detection benchmark's state.

``bench/detection.py detect --state DIR`` leaves a history (the orders before ``DIR/fitted_at``)
and an evaluation (the orders after it: larger images, unseen settings, concurrency 8) in
``DIR/bench.db``. This script fits only the work model (models/work.py, seconds, no network)
on each fold of the history as ``training fit`` makes them (3 folds by order, the extrapolation
fold and the unseen-parameter fold), scores each fold's held-out runs, and calibrates a
threshold per total from them as ``fit`` does (models/alarms.py TailFit, 1 false alarm per
1,000 runs shared over the kinds); then it fits on the whole history and scores the
evaluation's healthy runs. Per total it prints the threshold, the evaluation's false alarms,
and the share of its runs that a 1.5x regression would have made an anomaly (the run's
operation 1.5 times over: for ``operation_seconds`` the total x1.5, for ``cpu_seconds`` the
total plus half the operation's time), all of them and those inside the history's sizes and
settings; with ``--tasks``, the same per task.

    ./dev python bench/work_model_heldout.py --state /tmp/det7 --seed 7

A way to try a change of the work model in seconds instead of a 22-minute benchmark; the
figures that count are the benchmark's, which also has the network, the per-sample alarms and
the live path.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from pathlib import Path

import pandas as pd

from models.alarms import KINDS, TailFit, judged_value, run_score
from models.runs import run_totals
from models.work import ExpectedWork, InputSize, param_features
from pipeline.db import connect
from services.catalog import work_powers
from training import data, folds

RATE = 0.001
FACTOR = 1.5


def scores(work: ExpectedWork, rows: pd.DataFrame, totals: list[str], label: str) -> list[tuple]:
    """Per run of ``rows`` and total: its statistic, and what it would be with the run's
    operation done FACTOR times over."""
    out = []
    for run in run_totals(rows).itertuples(index=False):
        size, features = InputSize.of(run), param_features(run.params)
        operation = float(run.operation_seconds) if math.isfinite(run.operation_seconds) else 0.0
        for total in totals:
            value = float(getattr(run, total))
            fit = work.verdict_fit(run.task, total, size)
            if fit is None or not math.isfinite(value) or not size.known:
                continue
            expected = fit.log_median(size, features, float(run.pressure))
            spread = fit.spread_at(expected, size, features)
            judged = judged_value(total, value, size)
            extra = (FACTOR - 1) * (judged if total == "operation_seconds" else operation)
            inside = fit.beyond(size) == 0 and fit.beyond_settings(features) == 0
            out.append((label, run.task, total, run_score(total, judged, expected, spread),
                        run_score(total, judged + extra, expected, spread), inside))
    return out


def _threshold(statistics: pd.Series) -> float:
    tail = TailFit.fit(statistics.to_numpy(), "normal")
    return tail.threshold(RATE / len(KINDS)) if tail is not None else math.inf


def report_regimes(total: str, held_out: pd.DataFrame, runs: pd.DataFrame) -> None:
    """A threshold for the runs inside the history's sizes and settings, calibrated on the
    held-out runs inside their fold's, and one for the rest on the rest."""
    for inside, label in ((True, "inside"), (False, "beyond")):
        threshold = _threshold(held_out.loc[held_out["inside"] == inside, "statistic"])
        part = runs[runs["inside"] == inside]
        print(f"|   {label}: {int((held_out['inside'] == inside).sum())} held out | {threshold:.1f} | "
              f"{int((part['statistic'] > threshold).sum())}/{len(part)} | {(part['regressed'] > threshold).mean():.0%} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, required=True, help="a bench/detection.py state folder")
    parser.add_argument("--seed", type=int, required=True, help="the seed the benchmark ran with")
    parser.add_argument("--totals", default="operation_seconds,cpu_seconds")
    parser.add_argument("--tasks", action="store_true", help="also per task")
    parser.add_argument("--regimes", action="store_true",
                        help="also with a threshold of its own for runs inside the history's sizes and settings")
    args = parser.parse_args()
    totals = args.totals.split(",")
    engine = connect(f"sqlite:///{args.state / 'bench.db'}")
    until = datetime.fromisoformat((args.state / "fitted_at").read_text().split()[0])
    history = data.load_measurements(engine, None, until)
    evaluation = data.load_measurements(engine, until, None)
    powers = work_powers()
    rows = []
    for fold in folds.all_folds(history, 3, args.seed):
        work = ExpectedWork.fit(pd.concat([fold.train, fold.validation]), powers)
        rows += scores(work, fold.test, totals, f"fold {fold.number} ({fold.kind})")
    rows += scores(ExpectedWork.fit(history, powers), evaluation, totals, "evaluation")
    frame = pd.DataFrame(rows, columns=["set", "task", "total", "statistic", "regressed", "inside"])
    held_out, judged = frame[frame["set"] != "evaluation"], frame[frame["set"] == "evaluation"]
    print(f"{history['order_id'].nunique()} history orders, {evaluation['order_id'].nunique()} evaluation "
          f"orders; {len(held_out)} held-out and {len(judged)} evaluation verdicts")
    print("| total | threshold | false alarms | recall of 1.5x | inside the history: runs, false alarms, recall |")
    print("|---|---|---|---|---|")
    for total in totals:
        tail = TailFit.fit(held_out.loc[held_out["total"] == total, "statistic"].to_numpy(), "normal")
        threshold = tail.threshold(RATE / len(KINDS)) if tail is not None else math.inf
        runs = judged[judged["total"] == total]
        inside = runs[runs["inside"]]
        print(f"| {total} | {threshold:.1f} | {int((runs['statistic'] > threshold).sum())}/{len(runs)} | "
              f"{(runs['regressed'] > threshold).mean():.0%} | {len(inside)}, "
              f"{int((inside['statistic'] > threshold).sum())}, {(inside['regressed'] > threshold).mean():.0%} |")
        if args.regimes:
            report_regimes(total, held_out[held_out["total"] == total], runs)
        if args.tasks:
            for task, part in runs.groupby("task"):
                print(f"|   {task} | | {int((part['statistic'] > threshold).sum())}/{len(part)} | "
                      f"{(part['regressed'] > threshold).mean():.0%} | median statistic "
                      f"{part['statistic'].median():+.1f}, max {part['statistic'].max():+.1f} |")


if __name__ == "__main__":
    main()
