"""Detection benchmark (issue 12): the live detector on work it was not trained or tuned on,
next to three simple detectors on the same runs.

It cannot flatter itself: it builds its own database and MLflow store (a fresh state folder),
collects a training history with ``training.collect`` (generated images of several sizes,
several task sequences, several concurrency levels), fits, and only then runs the evaluation
orders: other images (other seeds and sizes), other task sequences, faults injected into
heavy tasks at varied onsets, healthy and faulty orders mixed, at each concurrency level. Only
orders created after the fit are evaluated.

Every stored sample of an evaluation order is replayed through each detector with the code
the monitor-consumer runs live (models.rows.model_rows, analysis.scoring):

- model: the champion's P10/P50/P90 band with the alarm policy, plus the overrun check
- fixed-threshold: one limit per resource, whatever the task
- rolling-z: z-score against the previous 10 samples of the same run and resource
- n-sigma: mean +- 3 standard deviations per (task, resource) of the training history

Per fault type: recall (faulty runs with an anomaly at or after the fault's onset), precision
(those against them plus every healthy run with an alarm), F1, and the delay from onset to the
first anomaly (p50 / p95, sample time). Healthy runs are task runs without a fault that ran;
an alarm before the onset of a faulty run counts against the detector as well.

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

from sqlalchemy import select  # noqa: E402

from analysis.order_context import order_samples  # noqa: E402
from analysis.scoring import (  # noqa: E402
    ConsecutiveFilter, Detector, FixedThresholdScorer, NSigmaScorer, RollingZScorer, model_detector,
)
from pipeline.db import connect  # noqa: E402
from pipeline.db.schema import orders, task_runs, tasks  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from training.collect import CollectPlan, collect, make_image  # noqa: E402

FAULTS = ("cpu_hog", "memory_leak", "io_storm", "stall")
HEAVY = ("median", "denoise", "upscale")
LIGHT_SAME_SIZE = ("grayscale", "contrast", "sepia", "sharpen", "flip", "equalize", "blur")
HISTORY_SIZES = ((640, 480), (1024, 768), (1600, 1200))
EVAL_SIZES = ((800, 600), (1280, 960), (1920, 1080))
EVAL_SEQUENCES = (
    ("blur", "median", "jpeg"),
    ("denoise", "sharpen", "grayscale"),
    ("contrast", "upscale", "flip"),
    ("median", "equalize", "denoise"),
    ("grayscale", "denoise", "edge_detect"),
    ("upscale", "sepia", "median"),
)
LOADED_BY = 5.0  # ingest: seconds after READY by which the scorer has loaded its model
FIXED_LIMITS = {"cpu_demand": 150.0, "cpu": 150.0, "memory": 1500.0, "disk_read": 50_000.0,
                "disk_write": 50_000.0}


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


def plan_evaluation(level: int, args, model, folder: Path, rng: random.Random) -> list[Planned]:
    """Healthy orders over the evaluation sequences and faulty ones: each fault kind
    ``args.faulty`` times, in a heavy task (cycling over them and over the image sizes), after
    zero or one light task, starting at 20-60 % of the task's expected CPU time."""
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
        add(f"eval-c{level}-s{args.seed}-{i:03d}-healthy", list(EVAL_SEQUENCES[i % len(EVAL_SEQUENCES)]), image)
    number = 0
    for kind in FAULTS:
        for j in range(args.faulty):
            number += 1
            task = HEAVY[j % len(HEAVY)]
            image, pixels = images[(j // len(HEAVY)) % len(images)]
            band = model.work.band(task, pixels)
            expected = band[1] if band else 2.0
            fault_at = round(rng.uniform(0.2, 0.6) * expected, 2)
            before = [rng.choice(LIGHT_SAME_SIZE)] if j % 2 else []
            after = [rng.choice(LIGHT_SAME_SIZE)]
            sequence = [*before, {"name": task, "fault": kind, "fault_at": fault_at}, *after]
            # A stall is ended by the task timeout; the others succeed after their fault.
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
        fit_output = "(reused)"
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
_ANOMALY = re.compile(r"^ANOMALY task (\d+)/\d+ \S+ (\S+) ")


def live_from_console(path: Path, plans: dict) -> dict:
    """What the user saw: the orchestrator's ANOMALY lines, timed on its own clock against
    its "task started" lines. Per fault type the faulty runs flagged live after the onset and
    the delay from the onset to the line (scoring's lag included); healthy runs flagged."""
    started: dict[tuple[str, int], float] = {}
    first: dict[tuple[str, int], tuple[float, str]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        matched = _LINE.match(line)
        if not matched:
            continue
        elapsed, name, text = float(matched[1]), matched[2], matched[3]
        if (m := _STARTED.match(text)) and (name, int(m[1]) - 1) not in started:
            started[(name, int(m[1]) - 1)] = elapsed
        elif (m := _ANOMALY.match(text)) and (name, int(m[1]) - 1) not in first:
            first[(name, int(m[1]) - 1)] = (elapsed, m[2])
    faults: dict[str, dict] = {}
    healthy_flagged = 0
    for (name, position), (elapsed, resource) in first.items():
        planned = plans.get(name)
        if planned is None:
            continue
        if planned.fault and planned.fault[0] == position:
            fault = faults.setdefault(planned.fault[1], {"detected": 0, "delays": []})
            delay = elapsed - started.get((name, position), elapsed) - planned.fault[2]
            if delay >= 0:
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
    return out


def _last_order_id(settings: Settings) -> int:
    from sqlalchemy import func

    with connect(settings.database_url).connect() as conn:
        return int(conn.execute(select(func.max(orders.c.id))).scalar() or 0)


def _history_rows(settings: Settings, until: datetime):
    from training.data import load_measurements

    return load_measurements(connect(settings.database_url), until=until)


def evaluate(settings: Settings, model, version: str, fitted_at: datetime, last_trained: int,
             plans: dict) -> dict:
    """Replay every evaluation order (run after the fit: ids above ``last_trained``) through
    each detector; the tables' figures."""
    engine = connect(settings.database_url)
    history = _history_rows(settings, fitted_at)
    nsigma = NSigmaScorer().fit(history)
    detectors = {
        "model": lambda: model_detector(model, settings, version),
        "fixed-threshold": lambda: Detector(FixedThresholdScorer(FIXED_LIMITS), ConsecutiveFilter()),
        "rolling-z": lambda: Detector(RollingZScorer(), ConsecutiveFilter()),
        "n-sigma": lambda: Detector(nsigma, ConsecutiveFilter()),
    }
    with engine.connect() as conn:
        evaluated = conn.execute(select(orders.c.id, orders.c.name).where(orders.c.id > last_trained)).all()
        runs = conn.execute(select(task_runs, tasks.c.name.label("task")).join(tasks, tasks.c.id == task_runs.c.task_id)
                            .where(task_runs.c.order_id.in_([o.id for o in evaluated]))).mappings().all()
    runs_of = defaultdict(list)
    for run in runs:
        runs_of[run["order_id"]].append(run)
    levels: dict[str, dict] = {}
    coverage = defaultdict(lambda: [0, 0])
    for order_id, name in evaluated:
        planned = plans.get(name)
        if planned is None:
            continue
        level = name.split("-")[1]
        samples = order_samples(engine, order_id)
        for detector_name, make in detectors.items():
            cell = levels.setdefault(level, {}).setdefault(detector_name, _empty())
            results = make().process(samples)
            alarms = defaultdict(list)  # task position -> anomaly sample times
            for r in results:
                if r.anomaly:
                    alarms[r.index].append((r.timestamp_ms, r.resource))
                healthy = not planned.fault or r.index != planned.fault[0]
                if detector_name == "model" and healthy and r.resource != "duration":
                    inside = r.lower <= r.value <= r.upper
                    coverage[(level, r.resource)][0] += inside
                    coverage[(level, r.resource)][1] += 1
            for run in runs_of[order_id]:
                started_ms = _ms(run["started_at"])
                # an attempt's samples come after it starts and before the next attempt starts
                since_ms = started_ms if run["attempt"] > 1 else -math.inf
                retried_ms = min((_ms(later["started_at"]) for later in runs_of[order_id]
                                  if later["position"] == run["position"] and later["attempt"] > run["attempt"]),
                                 default=math.inf)
                times = sorted(a for a in alarms.get(run["position"], []) if since_ms <= a[0] < retried_ms)
                if planned.fault and run["position"] == planned.fault[0]:
                    kind, onset_ms = planned.fault[1], started_ms + planned.fault[2] * 1000
                    fault = cell["faults"].setdefault(kind, {"runs": 0, "detected": 0, "delays": [], "by": defaultdict(int)})
                    fault["runs"] += 1
                    if any(t < onset_ms for t, _ in times):
                        cell["pre_onset_alarms"] += 1
                    after = [(t, res) for t, res in times if t >= onset_ms]
                    if after:
                        fault["detected"] += 1
                        fault["delays"].append((after[0][0] - onset_ms) / 1000)
                        fault["by"][after[0][1]] += 1
                else:
                    cell["healthy_runs"] += 1
                    if times:
                        cell["false_alarms"] += 1
                        cell["false_alarm_resources"][times[0][1]] += 1
    return {"model_version": version, "levels": _summarise(levels),
            "coverage": {f"{lvl} {res}": round(inside / total, 3) for (lvl, res), (inside, total) in sorted(coverage.items())},
            "history_rows": len(history), "history_orders": int(history["order_id"].nunique()) if len(history) else 0}


def _ms(stored: datetime) -> float:
    return stored.replace(tzinfo=timezone.utc).timestamp() * 1000


def _empty() -> dict:
    return {"faults": {}, "healthy_runs": 0, "false_alarms": 0, "pre_onset_alarms": 0,
            "false_alarm_resources": defaultdict(int)}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 2)


def _summarise(levels: dict) -> dict:
    out = {}
    for level, detectors in levels.items():
        for name, cell in detectors.items():
            false = cell["false_alarms"] + cell["pre_onset_alarms"]
            faults = {}
            for kind, fault in cell["faults"].items():
                recall = fault["detected"] / fault["runs"] if fault["runs"] else 0.0
                precision = fault["detected"] / (fault["detected"] + false) if fault["detected"] + false else 0.0
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
                faults[kind] = {"runs": fault["runs"], "detected": fault["detected"], "recall": round(recall, 3),
                                "precision": round(precision, 3), "f1": round(f1, 3),
                                "delay_p50_s": _percentile(fault["delays"], 0.5),
                                "delay_p95_s": _percentile(fault["delays"], 0.95), "first_on": dict(fault["by"])}
            out.setdefault(level, {})[name] = {
                "faults": faults, "healthy_runs": cell["healthy_runs"], "false_alarm_runs": cell["false_alarms"],
                "pre_onset_alarms": cell["pre_onset_alarms"],
                "false_alarms_per_100": round(100 * cell["false_alarms"] / cell["healthy_runs"], 2)
                if cell["healthy_runs"] else None,
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
    for level, detectors in out["levels"].items():
        rows = []
        for name, cell in detectors.items():
            for kind, f in cell["faults"].items():
                rows.append([name, kind, f"{f['detected']}/{f['runs']}", f"{f['recall']:.0%}", f"{f['precision']:.0%}",
                             f"{f['f1']:.2f}", _seconds(f["delay_p50_s"]), _seconds(f["delay_p95_s"])])
            rows.append([name, "healthy runs with an alarm", f"{cell['false_alarm_runs']}/{cell['healthy_runs']}",
                         f"{cell['false_alarms_per_100']} per 100", f"pre-onset {cell['pre_onset_alarms']}", "", "", ""])
        parts.append(f"### concurrency {level.removeprefix('c')}\n\n" + markdown_table(
            ["detector", "fault", "detected", "recall", "precision", "F1", "delay p50", "delay p95"], rows))
    for level, live in out.get("live", {}).items():
        rows = [[kind, f["detected"], _seconds(f["delay_p50_s"]), _seconds(f["delay_p95_s"])]
                for kind, f in live["faults"].items()]
        rows.append(["healthy runs with an ANOMALY line", live["healthy_runs_flagged"], "", ""])
        parts.append(f"### what `orchestrator run` printed live, concurrency {level.removeprefix('c')}\n\n"
                     + markdown_table(["fault", "flagged after onset", "delay p50", "delay p95"], rows))
    coverage = [[key, f"{value:.1%}"] for key, value in out["coverage"].items()]
    parts.append("### P10-P90 coverage on the healthy runs' samples (model)\n\n" + markdown_table(["level resource", "coverage"], coverage))
    return "\n\n".join(parts)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("detect", "evaluate", "ingest"),
                        help="detect: collect, fit, run and evaluate; evaluate: again, on what --state holds")
    parser.add_argument("--history", type=int, default=12, help="training orders per history concurrency level")
    parser.add_argument("--history-concurrency", type=lambda t: [int(v) for v in t.split(",")], default=[1, 4, 8])
    parser.add_argument("--concurrency", type=lambda t: [int(v) for v in t.split(",")], default=[8, 1],
                        help="evaluation concurrency levels")
    parser.add_argument("--faulty", type=int, default=20, help="faulty runs per fault type and level")
    parser.add_argument("--healthy", type=int, default=25, help="healthy orders per level")
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
