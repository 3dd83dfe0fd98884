"""Detection benchmark (issues 12 and 25): the live detector on work it was not trained or tuned
on, next to the GBM's band and an n-sigma chart under the same policy.

It cannot flatter itself: it builds its own database and MLflow store (a fresh state folder),
collects a training history with ``training.collect`` (generated images of three sizes, six
task sequences, each task's parameters varied over a few settings, concurrency 1, 4 and 8),
fits, and only then runs the evaluation orders at concurrency 8: other images (other seeds,
sizes up to twice the pixels of the history's largest), other task sequences, parameter values
the history never had, and faults: the gross ones (``cpu_hog``, ``memory_leak``, ``io_storm``,
``stall`` at varied onsets in heavy tasks) and the regressions a release brings
(``extra_work``, ``extra_memory``, ``double_write`` at 1.5x, from the start, in short and long
tasks alike). Only orders created after the fit are evaluated.

Every stored sample of an evaluation order is replayed through each detector with the code the
monitor-consumer runs live (models.rows.model_rows, analysis.scoring), runs' verdicts included:

- model: the champion's band and run check with its calibrated thresholds (FALSE_ALARM_RATE)
- gbm: the GBM's band on the same work model, its per-sample thresholds calibrated the same way
  on a third of the history it did not learn from; the same run check
- n-sigma: mean +- 3 standard deviations per (task, resource) of the history, its threshold
  calibrated the same way; no run check (the classic chart)

Reported: false alarms per 100 healthy task runs (all, and runs with fewer than three samples),
recall per fault kind and per task length (< 1 s, 1-5 s, > 5 s), delay p50/p95 (gross faults:
from the onset; regressions: from the run's end), P10-P90 coverage per resource on the healthy
runs, and what the orchestrator printed live.

    ./dev python bench/detection.py detect --state /tmp/detection --json /tmp/detection.json
    ./dev python bench/detection.py evaluate --state /tmp/detection   # the same runs, evaluated again
    ./dev python bench/detection.py ingest --samples 20000   # consumer ingest, scoring on and off
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from _common import REPO_ROOT, loadavg, machine, markdown_table, write_json

sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sqlalchemy import select  # noqa: E402

from analysis.order_context import order_samples  # noqa: E402
from analysis.scoring import (  # noqa: E402
    ConsecutiveFilter, Detector, ModelBandScorer, NSigmaScorer, RunCheck, alarm_score, contexts, model_detector,
    model_thresholds,
)
from models.alarms import FALLBACK_THRESHOLD, KINDS, TailFit, streak_statistic  # noqa: E402
from pipeline.db import connect  # noqa: E402
from pipeline.db.schema import orders, task_runs, tasks  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from training.collect import CollectPlan, collect, make_image  # noqa: E402

GROSS = ("cpu_hog", "memory_leak", "io_storm", "stall")
REGRESSIONS = ("extra_work", "extra_memory", "double_write")
HEAVY = ("median", "denoise", "upscale")
LIGHT = ("grayscale", "contrast", "sepia", "sharpen", "flip", "equalize", "blur")
HISTORY_SIZES = ((480, 360), (640, 480), (800, 600))
EVAL_SIZES = ((700, 525), (960, 720), (1130, 848))  # the largest: 2.0x the history's largest pixels
UNSEEN_PARAMS = {"median": {"passes": 4, "size": 5}, "denoise": {"search": 4}, "upscale": {"iterations": 20},
                 "blur": {"radius": 6.0}, "sharpen": {"radius": 4.0}}
"""Parameter values no history order had (training/collect.py DEFAULT_VARIANTS)."""
EVAL_SEQUENCES = (
    ("blur", "median", "jpeg"),
    ("denoise", "sharpen", "grayscale"),
    ("contrast", "upscale", "flip"),
    ("median", "equalize", "denoise"),
    ("grayscale", "denoise", "edge_detect"),
    ("upscale", "sepia", "median"),
)
LENGTHS = ((0.0, 1.0, "< 1 s"), (1.0, 5.0, "1-5 s"), (5.0, math.inf, "> 5 s"))
LOADED_BY = 5.0  # ingest: seconds after READY by which the scorer has loaded its model


@dataclass(frozen=True)
class Planned:
    """An evaluation order: its file, and its fault (position, kind, onset) if any."""

    name: str
    path: Path
    fault: tuple[int, str, float] | None


def _env(state: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PIPELINE_STATE_DIR": str(state),
           "DATABASE_URL": f"sqlite:///{state / 'bench.db'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}", "MONITORS": "shared"}
    return env


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)


def _task(name: str, unseen: bool, **extra) -> dict | str:
    params = UNSEEN_PARAMS.get(name) if unseen else None
    if not params and not extra:
        return name
    return {"name": name, **({"params": dict(params)} if params else {}), **extra}


def plan_evaluation(level: int, args, model, folder: Path, rng: random.Random) -> list[Planned]:
    """Healthy orders over the evaluation sequences (every other one with unseen parameter
    values) and faulty ones: each gross fault ``args.faulty`` times in a heavy task, starting at
    20-60 % of its expected CPU time; each regression ``args.faulty`` times, in heavy and light
    tasks in turn, from the start."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, (width, height) in enumerate(EVAL_SIZES):
        path = folder / f"eval-{width}x{height}-{args.seed}.jpg"
        if not path.exists():
            make_image(width, height, 9000 + 100 * args.seed + i).save(path, quality=92)
        images.append((path, width * height))
    planned = []

    def add(name: str, sequence: list, image: Path, fault=None, retry=None) -> None:
        path = folder / f"{name}.json"
        document = {"id": name, "image": str(image), "tasks": sequence}
        if retry:
            document["retry"] = retry
        path.write_text(json.dumps(document))
        planned.append(Planned(name, path, fault))

    for i in range(args.healthy):
        image, _ = images[i % len(images)]
        unseen = (i // len(images)) % 2 == 1
        add(f"eval-c{level}-s{args.seed}-{i:03d}-healthy",
            [_task(t, unseen) for t in EVAL_SEQUENCES[i % len(EVAL_SEQUENCES)]], image)
    number = 0
    for kind in GROSS + REGRESSIONS:
        for j in range(args.faulty):
            number += 1
            image, pixels = images[j % len(images)]
            regression = kind in REGRESSIONS
            task = (HEAVY + LIGHT)[j % (len(HEAVY) + len(LIGHT))] if regression else HEAVY[j % len(HEAVY)]
            before = [rng.choice(LIGHT)] if j % 2 else []
            after = [rng.choice(LIGHT)]
            if regression:
                fault_at, extra = 0.0, {"fault": kind, "fault_factor": 1.5}
            else:
                band = model.work.band(task, pixels)
                fault_at = round(rng.uniform(0.2, 0.6) * (band[1] if band else 2.0), 2)
                extra = {"fault": kind, "fault_at": fault_at}
            sequence = [*before, _task(task, j % 4 == 3, **extra), *after]
            # A stall is ended by the task timeout; the others succeed.
            retry = {"max_attempts": 1, "task_timeout_seconds": 20 if kind == "stall" else 300}
            add(f"eval-c{level}-s{args.seed}-{number:03d}-{kind}", sequence, image, (len(before), kind, fault_at), retry)
    rng.shuffle(planned)
    return planned


def detect(args: argparse.Namespace) -> dict:
    state = Path(args.state or tempfile.mkdtemp(prefix="detection-bench-"))
    state.mkdir(parents=True, exist_ok=True)
    env = _env(state)
    os.environ.update({k: env[k] for k in ("PIPELINE_STATE_DIR", "DATABASE_URL", "MLFLOW_TRACKING_URI", "MONITORS")})
    settings = Settings.from_env()
    timings = {}
    fitted_file = state / "fitted_at"
    if args.reuse and fitted_file.exists():  # an earlier run's history and model, evaluated again
        fitted_at, last_trained = fitted_file.read_text().split()
        fitted_at, last_trained = datetime.fromisoformat(fitted_at), int(last_trained)
        fit_output = (state / "fit.out").read_text() if (state / "fit.out").exists() else "(reused)"
    else:
        began = time.monotonic()
        plan = CollectPlan(sizes=HISTORY_SIZES, concurrency=tuple(args.history_concurrency), orders=args.history,
                           seed=args.seed)
        collect(plan, state / "history", env)
        timings["collect_s"] = round(time.monotonic() - began, 1)
        began = time.monotonic()
        fit = _run(env, "-m", "training", "fit", "--min-orders", "10", "--no-progress", "--seed", str(args.seed))
        timings["fit_s"] = round(time.monotonic() - began, 1)
        if fit.returncode != 0:
            raise SystemExit(f"fit failed: {fit.stdout[-3000:]} {fit.stderr[-3000:]}")
        fit_output = fit.stdout
        (state / "fit.out").write_text(fit_output)
        print(fit_output, flush=True)
        fitted_at = datetime.now(timezone.utc)
        last_trained = _last_order_id(settings)
        fitted_file.write_text(f"{fitted_at.isoformat()} {last_trained}")
    from models.registry import load_expected_usage

    model, version = load_expected_usage(settings.mlflow_tracking_uri)
    rng = random.Random(args.seed)
    plans = {}
    for level in args.concurrency:
        planned = plan_evaluation(level, args, model, state / "eval", rng)
        plans.update({p.name: p for p in planned})
        print(f"evaluation: {len(planned)} order(s) at concurrency {level}", flush=True)
        began = time.monotonic()
        with open(state / f"eval-c{level}.out", "w") as console:
            result = subprocess.run([sys.executable, "-m", "orchestrator", "run", *(str(p.path) for p in planned),
                                     "--max-concurrent", str(level)], cwd=REPO_ROOT, env=env,
                                    stdout=console, stderr=subprocess.STDOUT, text=True)
        timings[f"eval_c{level}_s"] = round(time.monotonic() - began, 1)
        if result.returncode not in (0, 1):
            raise SystemExit(f"orchestrator failed ({result.returncode}): see {state / f'eval-c{level}.out'}")
    out = evaluate(settings, model, version, fitted_at, last_trained, plans)
    out["live"] = {f"c{level}": live_from_console(state / f"eval-c{level}.out", plans) for level in args.concurrency}
    subprocess.run([sys.executable, "-m", "pipeline", "infra", "down"], cwd=REPO_ROOT, env=env,
                   capture_output=True)
    return {**out, "timings": timings, "state": str(state), "fit_output": fit_output}


_LINE = re.compile(r"^\[\s*([\d.]+)s\] order \d+ (\S+): (.*)$")
_STARTED = re.compile(r"^task (\d+)/\d+ \S+ started")
_DONE = re.compile(r"^task (\d+)/\d+ \S+ (?:done|failed)")
_ANOMALY = re.compile(r"^ANOMALY task (\d+)/\d+ \S+ (\S+) ")


def live_from_console(path: Path, plans: dict) -> dict:
    """What the user saw: the orchestrator's ANOMALY lines, timed on its own clock against its
    "task started" lines (gross faults: from the onset) and "task done" lines (regressions:
    from the run's end). Per fault type the faulty runs flagged live and the delays; healthy
    runs flagged."""
    started: dict[tuple[str, int], float] = {}
    ended: dict[tuple[str, int], float] = {}
    first: dict[tuple[str, int], tuple[float, str]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        matched = _LINE.match(line)
        if not matched:
            continue
        elapsed, name, text = float(matched[1]), matched[2], matched[3]
        if (m := _STARTED.match(text)) and (name, int(m[1]) - 1) not in started:
            started[(name, int(m[1]) - 1)] = elapsed
        elif m := _DONE.match(text):
            ended[(name, int(m[1]) - 1)] = elapsed
        elif (m := _ANOMALY.match(text)) and (name, int(m[1]) - 1) not in first:
            first[(name, int(m[1]) - 1)] = (elapsed, m[2])
    faults: dict[str, dict] = {}
    healthy_flagged = 0
    for (name, position), (elapsed, resource) in first.items():
        planned = plans.get(name)
        if planned is None:
            continue
        if planned.fault and planned.fault[0] == position:
            kind = planned.fault[1]
            fault = faults.setdefault(kind, {"detected": 0, "delays": []})
            if kind in REGRESSIONS:
                delay = elapsed - ended.get((name, position), elapsed)
            else:
                delay = elapsed - started.get((name, position), elapsed) - planned.fault[2]
            if delay >= 0 or kind in REGRESSIONS:
                fault["detected"] += 1
                fault["delays"].append(round(delay, 2))
        else:
            healthy_flagged += 1
    return {"faults": {kind: {"detected": f["detected"], "delay_p50_s": _percentile(f["delays"], 0.5),
                              "delay_p95_s": _percentile(f["delays"], 0.95)} for kind, f in faults.items()},
            "healthy_runs_flagged": healthy_flagged}


def planned_from_files(folder: Path) -> dict[str, Planned]:
    """The evaluation plan an earlier run wrote (its order files), to evaluate it again."""
    plans = {}
    for path in sorted(folder.glob("eval-*.json")):
        document = json.loads(path.read_text())
        fault = next(((i, t["fault"], float(t.get("fault_at", 0.0))) for i, t in enumerate(document["tasks"])
                      if isinstance(t, dict) and t.get("fault")), None)
        plans[document["id"]] = Planned(document["id"], path, fault)
    return plans


def reevaluate(args: argparse.Namespace) -> dict:
    """Evaluate again what an earlier ``detect`` left in ``--state`` (no order is run)."""
    state = Path(args.state)
    env = _env(state)
    os.environ.update({k: env[k] for k in ("PIPELINE_STATE_DIR", "DATABASE_URL", "MLFLOW_TRACKING_URI", "MONITORS")})
    settings = Settings.from_env()
    fitted_at, last_trained = (state / "fitted_at").read_text().split()
    from models.registry import load_expected_usage

    model, version = load_expected_usage(settings.mlflow_tracking_uri, args.model)
    plans = planned_from_files(state / "eval")
    out = evaluate(settings, model, version, datetime.fromisoformat(fitted_at), int(last_trained), plans)
    out["live"] = {path.stem.removeprefix("eval-"): live_from_console(path, plans)
                   for path in sorted(state.glob("eval-c*.out"))}
    if (state / "fit.out").exists():
        out["fit_output"] = (state / "fit.out").read_text()
    return out


def _last_order_id(settings: Settings) -> int:
    from sqlalchemy import func

    with connect(settings.database_url).connect() as conn:
        return int(conn.execute(select(func.max(orders.c.id))).scalar() or 0)


def _history_rows(settings: Settings, until: datetime):
    from training.data import load_measurements

    return load_measurements(connect(settings.database_url), until=until)


def _sample_thresholds(scorer, rows: pd.DataFrame, rate: float, consecutive: int) -> dict[str, float]:
    """Per alarmed resource, the threshold that leaves ``rate`` / len(KINDS) false alarms per run for
    ``scorer`` on ``rows`` (held-out healthy runs): models/alarms.py's method, any scorer."""
    samples = contexts(rows)
    scores = scorer.score_many(samples)
    series = defaultdict(list)
    for sample, (_, _, _, score) in zip(samples, scores):
        series[(sample.run, sample.resource)].append(alarm_score(sample.resource, score))
    runs = {s.run for s in samples}
    statistics = defaultdict(list)
    for run in runs:
        for resource in ("cpu_demand", "memory", "disk_read", "disk_write"):
            values = series.get((run, resource))
            if values is not None:
                statistics[resource].append(streak_statistic(np.asarray(values), consecutive))
    share = rate / len(KINDS)
    tails = {resource: TailFit.fit(np.asarray(values), "exponential") for resource, values in statistics.items()}
    return {resource: tail.threshold(share) if tail is not None else FALLBACK_THRESHOLD
            for resource, tail in tails.items()}


def baselines(history: pd.DataFrame, model, settings: Settings, seed: int) -> dict:
    """The GBM's band (on the work model, like the network) and the n-sigma chart, each with
    per-sample thresholds calibrated on a third of the history it did not learn from, then
    refitted on all of it."""
    from training.crossval import GBM_FEATURES, OnWork
    from training.gbm_baseline import GbmConfig, GradientBoostingBaseline

    ids = np.random.default_rng(seed).permutation(np.sort(history["order_id"].unique()))
    held = history["order_id"].isin(ids[: len(ids) // 3])
    learn, calibration = history[~held], history[held]
    consecutive, rate = settings.anomaly_consecutive, settings.false_alarm_rate

    def gbm(rows):
        return OnWork(GradientBoostingBaseline(GbmConfig(random_state=seed), features=GBM_FEATURES)).fit(rows)

    gbm_thresholds = _sample_thresholds(ModelBandScorer(gbm(learn)), calibration, rate, consecutive)
    nsigma_thresholds = _sample_thresholds(NSigmaScorer().fit(learn), calibration, rate, consecutive)
    final_gbm, nsigma = gbm(history), NSigmaScorer().fit(history)
    run_thresholds = model_thresholds(model, settings)
    return {
        "gbm": (lambda: Detector(ModelBandScorer(final_gbm), ConsecutiveFilter(gbm_thresholds, consecutive),
                                 RunCheck(model.work, run_thresholds)), final_gbm),
        "n-sigma": (lambda: Detector(nsigma, ConsecutiveFilter(nsigma_thresholds, consecutive)), None),
        "thresholds": {"gbm": gbm_thresholds, "n-sigma": nsigma_thresholds},
    }


def _length(seconds: float) -> str:
    return next(label for low, high, label in LENGTHS if low <= seconds < high)


def evaluate(settings: Settings, model, version: str, fitted_at: datetime, last_trained: int,
             plans: dict) -> dict:
    """Replay every evaluation order (run after the fit: ids above ``last_trained``) through
    each detector; the tables' figures."""
    engine = connect(settings.database_url)
    history = _history_rows(settings, fitted_at)
    others = baselines(history, model, settings, seed=0)
    detectors = {"model": lambda: model_detector(model, settings, version), "gbm": others["gbm"][0],
                 "n-sigma": others["n-sigma"][0]}
    with engine.connect() as conn:
        evaluated = conn.execute(select(orders.c.id, orders.c.name).where(orders.c.id > last_trained)).all()
        runs = conn.execute(select(task_runs, tasks.c.name.label("task")).join(tasks, tasks.c.id == task_runs.c.task_id)
                            .where(task_runs.c.order_id.in_([o.id for o in evaluated]))).mappings().all()
    runs_of = defaultdict(list)
    for run in runs:
        runs_of[run["order_id"]].append(run)
    cells: dict[str, dict] = {}
    coverage = defaultdict(lambda: [0, 0])
    gbm_coverage = defaultdict(lambda: [0, 0])
    for order_id, name in evaluated:
        planned = plans.get(name)
        if planned is None:
            continue
        samples = order_samples(engine, order_id)
        ticks = defaultdict(set)
        for s in samples:
            ticks[s.run].add(s.timestamp_ms)
        for detector_name, make in detectors.items():
            cell = cells.setdefault(detector_name, _empty())
            results = make().replay(samples)
            alarms = defaultdict(list)  # run -> (time, resource) of anomalies
            for r in results:
                if r.anomaly:
                    alarms[r.index].append((r.timestamp_ms, r.resource))
                healthy = not planned.fault or r.index != planned.fault[0]
                if healthy and detector_name in ("model", "gbm"):
                    table = coverage if detector_name == "model" else gbm_coverage
                    table[r.resource][0] += r.lower <= r.value <= r.upper
                    table[r.resource][1] += 1
            for run in runs_of[order_id]:
                started_ms, ended_ms = _ms(run["started_at"]), _ms(run["finished_at"] or run["started_at"])
                key = (order_id, run["position"], run["attempt"])
                times = sorted(a for a in alarms.get(run["position"], []))
                length = _length((ended_ms - started_ms) / 1000)
                if planned.fault and run["position"] == planned.fault[0]:
                    kind = planned.fault[1]
                    regression = kind in REGRESSIONS
                    onset_ms = started_ms if regression else started_ms + planned.fault[2] * 1000
                    fault = cell["faults"].setdefault(kind, {"runs": 0, "detected": 0, "delays": [],
                                                             "by": defaultdict(int), "lengths": defaultdict(lambda: [0, 0])})
                    fault["runs"] += 1
                    fault["lengths"][length][1] += 1
                    if any(t < onset_ms for t, _ in times):
                        cell["pre_onset_alarms"] += 1
                    after = [(t, res) for t, res in times if t >= onset_ms]
                    if after:
                        fault["detected"] += 1
                        fault["lengths"][length][0] += 1
                        since = ended_ms if regression else onset_ms
                        fault["delays"].append((after[0][0] - since) / 1000)
                        fault["by"][after[0][1]] += 1
                else:
                    few = len(ticks.get(key, ())) < 3
                    cell["healthy_runs"] += 1
                    cell["healthy_short_runs"] += few
                    if times:
                        cell["false_alarms"] += 1
                        cell["false_alarms_short"] += few
                        cell["false_alarm_resources"][times[0][1]] += 1
    return {"model_version": version, "detectors": _summarise(cells),
            "coverage": {res: round(inside / total, 3) for res, (inside, total) in sorted(coverage.items())},
            "gbm_coverage": {res: round(inside / total, 3) for res, (inside, total) in sorted(gbm_coverage.items())},
            "thresholds": {"model": model_thresholds(model, settings), **others["thresholds"]},
            "history_rows": len(history), "history_orders": int(history["order_id"].nunique()) if len(history) else 0}


def _ms(stored: datetime) -> float:
    return stored.replace(tzinfo=timezone.utc).timestamp() * 1000


def _empty() -> dict:
    return {"faults": {}, "healthy_runs": 0, "healthy_short_runs": 0, "false_alarms": 0, "false_alarms_short": 0,
            "pre_onset_alarms": 0, "false_alarm_resources": defaultdict(int)}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 2)


def _summarise(cells: dict) -> dict:
    out = {}
    for name, cell in cells.items():
        false = cell["false_alarms"] + cell["pre_onset_alarms"]
        faults = {}
        for kind, fault in cell["faults"].items():
            recall = fault["detected"] / fault["runs"] if fault["runs"] else 0.0
            precision = fault["detected"] / (fault["detected"] + false) if fault["detected"] + false else 0.0
            faults[kind] = {"runs": fault["runs"], "detected": fault["detected"], "recall": round(recall, 3),
                            "precision": round(precision, 3),
                            "delay_p50_s": _percentile(fault["delays"], 0.5),
                            "delay_p95_s": _percentile(fault["delays"], 0.95), "first_on": dict(fault["by"]),
                            "by_length": {label: f"{hit}/{total}" for label, (hit, total) in fault["lengths"].items()}}
        short = cell["healthy_short_runs"]
        out[name] = {
            "faults": faults, "healthy_runs": cell["healthy_runs"], "false_alarm_runs": cell["false_alarms"],
            "pre_onset_alarms": cell["pre_onset_alarms"],
            "false_alarms_per_100": round(100 * cell["false_alarms"] / cell["healthy_runs"], 3)
            if cell["healthy_runs"] else None,
            "healthy_short_runs": short, "false_alarm_short_runs": cell["false_alarms_short"],
            "false_alarms_per_100_short": round(100 * cell["false_alarms_short"] / short, 3) if short else None,
            "false_alarm_resources": dict(cell["false_alarm_resources"])}
    return out


def ingest(args: argparse.Namespace, settings: Settings, env: dict) -> dict:
    """Pre-fill one order's resource topic, then time the consumer with scoring on and off."""
    from pipeline.db import create_schema
    from pipeline.db.orders import OrderStore
    from pipeline.kafka import Producer, TopicAdmin
    from pipeline.protocol import MonitorStopped, Sample, order_topics

    engine = connect(settings.database_url)
    create_schema(engine)
    store = OrderStore(engine)
    timings = {}
    for mode in ("off", "on"):
        order_id = store.create(f"ingest-{mode}", "/bench.png", "median,grayscale", (1024, 768))
        store.start_task(order_id, 0, 1, "median")
        TopicAdmin(settings).create(list(order_topics(order_id)))
        start_ms = int(time.time() * 1000)
        with Producer(settings) as producer:
            for i in range(args.samples // 4):
                for resource, value in (("cpu", 95.0 + i % 7), ("memory", 180.0), ("disk_read", 0.0),
                                        ("disk_write", 12.0)):
                    producer.send(Sample(("median", "grayscale"), "median", order_id, resource, value,
                                         start_ms + 1000 + i * 10).encode())
            producer.send(MonitorStopped(order_id).encode())
        child = {**env, "LIVE_SCORING": mode}
        began = time.monotonic()
        consumer = subprocess.Popen([sys.executable, "-m", "monitor", "consumer", str(order_id)],
                                    cwd=REPO_ROOT, env=child, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        consumer.stdout.readline()  # READY
        ready = time.monotonic()
        progress = []  # (seconds since READY, rows stored)
        while (count := store.count_measurements(order_id)) < args.samples and consumer.poll() is None:
            progress.append((time.monotonic() - ready, count))
            time.sleep(0.1)
        stored = time.monotonic()
        progress.append((stored - ready, count))
        # The rate once the scorer has loaded its model (it loads in the first seconds, on a
        # thread, while storing goes on): rows stored after LOADED_BY seconds, per second.
        late = [(t, c) for t, c in progress if t >= LOADED_BY]
        consumer.wait()
        ended = time.monotonic()
        timings[mode] = {
            "start_to_ready_s": round(ready - began, 2),
            "ready_to_all_stored_s": round(stored - ready, 2),
            "ingest_samples_per_s": round(args.samples / (stored - ready)),
            f"ingest_samples_per_s_after_{LOADED_BY:g}s": round((late[-1][1] - late[0][1]) / (late[-1][0] - late[0][0]))
            if len(late) > 1 else None,
            "all_stored_to_exit_s": round(ended - stored, 2),  # with scoring: finishing the backlog
            "rows": store.count_measurements(order_id),
            "deviation_rows": _deviation_rows(engine, order_id),
        }
    return {"samples": args.samples, "timings": timings}


def _deviation_rows(engine, order_id: int) -> int:
    from sqlalchemy import func, select

    from pipeline.db.schema import deviations

    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(deviations)
                            .where(deviations.c.order_id == order_id)).scalar_one()


def _report_detect(out: dict) -> str:
    parts = []
    rows = []
    for name, cell in out["detectors"].items():
        rows.append([name, f"{cell['false_alarm_runs']}/{cell['healthy_runs']}", cell["false_alarms_per_100"],
                     f"{cell['false_alarm_short_runs']}/{cell['healthy_short_runs']}", cell["false_alarms_per_100_short"],
                     cell["pre_onset_alarms"], json.dumps(cell["false_alarm_resources"])])
    parts.append("### healthy task runs with an alarm\n\n" + markdown_table(
        ["detector", "all", "per 100", "< 3 samples", "per 100", "alarms before a fault's onset", "first on"], rows))
    rows = []
    for name, cell in out["detectors"].items():
        for kind, f in cell["faults"].items():
            lengths = ", ".join(f"{label} {f['by_length'][label]}" for _, _, label in LENGTHS if label in f["by_length"])
            rows.append([name, kind, f"{f['detected']}/{f['runs']}", f"{f['recall']:.0%}", lengths,
                         _seconds(f["delay_p50_s"]), _seconds(f["delay_p95_s"]), json.dumps(f["first_on"])])
    parts.append("### recall per fault (delay: gross faults from the onset, regressions from the run's end)\n\n"
                 + markdown_table(["detector", "fault", "detected", "recall", "by task length", "delay p50",
                                   "delay p95", "first on"], rows))
    for level, live in out.get("live", {}).items():
        rows = [[kind, f["detected"], _seconds(f["delay_p50_s"]), _seconds(f["delay_p95_s"])]
                for kind, f in live["faults"].items()]
        rows.append(["healthy runs with an ANOMALY line", live["healthy_runs_flagged"], "", ""])
        parts.append(f"### what `orchestrator run` printed live, concurrency {level.removeprefix('c')}\n\n"
                     + markdown_table(["fault", "flagged", "delay p50", "delay p95"], rows))
    coverage = [[key, f"{value:.1%}", f"{out['gbm_coverage'].get(key, float('nan')):.1%}"]
                for key, value in out["coverage"].items()]
    parts.append("### P10-P90 coverage on the healthy runs (per sample; run totals by total name)\n\n"
                 + markdown_table(["resource", "model", "GBM"], coverage))
    thresholds = [[name, ", ".join(f"{k} {v:.1f}" for k, v in t.items())] for name, t in out["thresholds"].items()]
    parts.append("### thresholds\n\n" + markdown_table(["detector", "thresholds"], thresholds))
    return "\n\n".join(parts)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("detect", "evaluate", "ingest"),
                        help="detect: collect, fit, run and evaluate; evaluate: again, on what --state holds")
    parser.add_argument("--history", type=int, default=12, help="training orders per history concurrency level")
    parser.add_argument("--history-concurrency", type=lambda t: [int(v) for v in t.split(",")], default=[1, 4, 8])
    parser.add_argument("--concurrency", type=lambda t: [int(v) for v in t.split(",")], default=[8],
                        help="evaluation concurrency levels")
    parser.add_argument("--faulty", type=int, default=20, help="faulty runs per fault type and level")
    parser.add_argument("--healthy", type=int, default=270, help="healthy orders per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state", default=None, help="state folder (default: a new temporary one)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --state: evaluate again on the history and model an earlier run left there")
    parser.add_argument("--model", default=None, help="evaluate: the model version (default: the champion)")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"machine: {json.dumps(machine())}; load {loadavg()}", flush=True)
    if args.part in ("detect", "evaluate"):
        out = detect(args) if args.part == "detect" else reevaluate(args)
        print(_report_detect(out))
    else:
        settings = Settings.from_env()
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO_ROOT)}
        out = ingest(args, settings, env)
        print(json.dumps(out, indent=2))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
