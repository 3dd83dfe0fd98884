"""Detection benchmark (issue 5): the model-based detector next to two simple ones.

Runs a corpus of normal orders and orders with injected faults through the real pipeline,
trains the expected-usage model on the normal orders only, then replays every stored sample
through three detectors (the same code the monitor-consumer runs live):

- model: the champion's P10/P50/P90 band (monitor.scoring.ModelBandScorer)
- fixed-threshold: one upper limit per resource, whatever the task
- rolling-z: z-score against the previous 10 samples of the same task run and resource

and reports, per fault type, the detection rate (faulty task runs flagged on the fault's
resource after the fault began), the time from fault start to the first anomaly, and the
false-alarm rate on the tasks of normal orders. ``ingest`` measures the monitor-consumer's
ingestion rate with live scoring on and off, in one run.

    export PIPELINE_STATE_DIR=/tmp/bench5-state
    ./dev python -m pipeline infra up --postgres --kafka-port 49092 --postgres-port 45433
    ./dev python bench/detection.py detect --normal 24 --faulty 4
    ./dev python bench/detection.py ingest --samples 20000
    ./dev python -m pipeline infra down
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, loadavg, machine, markdown_table, write_json

sys.path.insert(0, str(REPO_ROOT))

from monitor.order_context import order_samples  # noqa: E402
from monitor.scoring import (  # noqa: E402
    ConsecutiveFilter, Detector, FixedThresholdScorer, ModelBandScorer, RollingZScorer,
)
from pipeline.db import connect  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from tests.integration.orderkit import all_stored_orders, write_order  # noqa: E402

IMAGE = "scene-1024x768.jpg"
# About 7 s of one core on the colour image, first in its order: faults start well inside the
# task's normal life, where the model has seen what to expect.
HEAVY = {"name": "median", "params": {"size": 9, "passes": 8}}
FAULT_AT = 2.0
FAULTY_POSITION = 0
FAULT_RESOURCE = {"cpu_hog": "cpu", "memory_leak": "memory", "io_storm": "disk_write", "stall": "cpu"}
LOADED_BY = 5.0
FIXED_LIMITS = {"cpu": 150.0, "memory": 400.0, "disk_read": 20_000.0, "disk_write": 20_000.0}


def _orchestrate(env: dict, files: list[Path], *extra: str) -> None:
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", *map(str, files), *extra],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise SystemExit(f"orchestrator failed ({result.returncode}): {result.stderr[-2000:]}")


def detect(args: argparse.Namespace, settings: Settings, env: dict) -> dict:
    collect_s = None if args.evaluate_only else collect(args, env)
    return {**evaluate(args, settings), "collect_seconds": collect_s}


def collect(args: argparse.Namespace, env: dict) -> float:
    """Run the normal history, fit on it, then run held-out normal and faulty orders."""
    folder = Path(tempfile.mkdtemp(prefix="detection-"))
    normal = write_order(folder, "normal", [HEAVY, "grayscale", "sharpen"], image=IMAGE)
    began = time.monotonic()
    _orchestrate(env, [normal], "--repeat", str(args.normal), "--max-concurrent", "1")
    collect_s = time.monotonic() - began
    fit = subprocess.run([sys.executable, "-m", "training", "fit", "--min-orders", "6", "--no-progress"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if fit.returncode != 0:
        raise SystemExit(f"fit failed: {fit.stdout[-1500:]} {fit.stderr[-1500:]}")
    # Later normal orders, not seen in training, are where false alarms are counted.
    held_out = write_order(folder, "held-out", [HEAVY, "grayscale", "sharpen"], image=IMAGE)
    faulty = [
        write_order(folder, f"fault-{kind}", [{**HEAVY, "fault": kind, "fault_at": FAULT_AT}, "grayscale", "sharpen"],
                    image=IMAGE, retry={"max_attempts": 1, "task_timeout_seconds": 15})
        for kind in FAULT_RESOURCE
    ]
    _orchestrate(env, [held_out, *faulty], "--repeat", str(args.faulty), "--max-concurrent", "1")
    return round(collect_s, 1)


def evaluate(args: argparse.Namespace, settings: Settings) -> dict:
    """Replay every stored held-out and faulty order through each detector."""
    from training.registry import load_expected_usage

    model, version = load_expected_usage(settings.mlflow_tracking_uri)
    engine = connect(settings.database_url)
    orders = all_stored_orders(settings)
    detectors = {
        "model": lambda: Detector(ModelBandScorer(model), ConsecutiveFilter(args.threshold, args.consecutive)),
        "fixed-threshold": lambda: Detector(FixedThresholdScorer(FIXED_LIMITS, args.threshold),
                                            ConsecutiveFilter(args.threshold, args.consecutive)),
        "rolling-z": lambda: Detector(RollingZScorer(), ConsecutiveFilter(args.threshold, args.consecutive)),
    }
    results: dict[str, dict] = {}
    for name, make in detectors.items():
        per_fault = {kind: {"runs": 0, "detected": 0, "delays": []} for kind in FAULT_RESOURCE}
        normal_runs = normal_alarms = 0
        for order in orders:
            if order.name not in ("held-out", *(f"fault-{k}" for k in FAULT_RESOURCE)):
                continue
            flagged = [r for r in make().process(order_samples(engine, order.id)) if r.anomaly]
            starts = {run["position"]: run["started_at"].timestamp() * 1000 for run in order.runs}
            if order.name == "held-out":
                positions = {run["position"] for run in order.runs}
                normal_runs += len(positions)
                normal_alarms += len({r.sample.position for r in flagged})
                continue
            kind = order.name.removeprefix("fault-")
            fault_ms = starts[FAULTY_POSITION] + FAULT_AT * 1000
            hits = [r for r in flagged if r.sample.position == FAULTY_POSITION
                    and r.sample.resource == FAULT_RESOURCE[kind] and r.sample.timestamp_ms >= fault_ms]
            per_fault[kind]["runs"] += 1
            # Alarms on the healthy tasks of faulty orders count as false alarms too.
            normal_runs += 2
            normal_alarms += len({r.sample.position for r in flagged if r.sample.position != FAULTY_POSITION})
            if hits:
                per_fault[kind]["detected"] += 1
                per_fault[kind]["delays"].append((min(r.sample.timestamp_ms for r in hits) - fault_ms) / 1000)
        results[name] = {"faults": per_fault, "normal_runs": normal_runs, "false_alarms": normal_alarms}
    return {"model_version": version, "results": results, "threshold": args.threshold,
            "consecutive": args.consecutive}


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
    rows = []
    for name, result in out["results"].items():
        for kind, fault in result["faults"].items():
            delays = fault["delays"]
            rows.append([name, kind, f"{fault['detected']}/{fault['runs']}",
                         f"{statistics.median(delays):.1f} s" if delays else "-",
                         f"{max(delays):.1f} s" if delays else "-"])
        rows.append([name, "normal tasks: false alarms", f"{result['false_alarms']}/{result['normal_runs']}", "", ""])
    return markdown_table(["detector", "fault", "detected", "median time to detect", "max"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("detect", "ingest"))
    parser.add_argument("--normal", type=int, default=24, help="normal orders to train on")
    parser.add_argument("--faulty", type=int, default=4, help="orders per fault type (and held-out normal ones)")
    parser.add_argument("--threshold", type=float, default=2.5)
    parser.add_argument("--consecutive", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="detect: only replay what an earlier run stored (same database)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    settings = Settings.from_env()
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO_ROOT)}
    print(f"machine: {json.dumps(machine())}; load {loadavg()}")
    out = detect(args, settings, env) if args.part == "detect" else ingest(args, settings, env)
    print(_report_detect(out) if args.part == "detect" else json.dumps(out, indent=2))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
