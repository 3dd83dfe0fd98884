"""Benchmark: the order flow's own costs (monitor-producer, task start-up, monitor-consumer).

Against the Kafka broker and database of the settings (``$PIPELINE_STATE_DIR/infra.env``;
start them with ``python -m pipeline infra up --postgres``), in one run:

1. **monitor**: a real ``python -m monitor producer ID`` for a fresh order samples a dummy
   task (a Python process busy about ``--busy`` of one core, allocating as it goes) for
   ``--seconds``; the monitor's own CPU time (user+system, psutil, all its threads) gives
   its cost in percent of one core, next to its cost while idle (``--idle-seconds`` before
   the ORDER), its start-up and the broker's CPU in each phase. Then STOP and TERMINATE are
   sent and it must exit.
2. **jitter**: the samples it published on ``resource<ID>`` during that run: the intervals
   between consecutive ``cpu`` sample timestamps minus 1000 ms -> p50/p99/max of |jitter|,
   the drift of the k-th sample from first + k * 1000 ms, and ORDER -> first sample.
3. **flow**: an order of 8 light tasks on ``orders/images/scene-640x480.jpg`` run
   ``--orders`` times, one after another, with ``python -m orchestrator run --keep-topics``;
   from ``task_runs`` and the kept topics (message timestamps are the senders' CreateTime):
   the gap between a task's PROGRESS and the next task's first sample, split into PROGRESS ->
   task_runs.finished_at -> next task_runs.started_at -> next ORDER -> its first sample.
   Next to it the bare cost of starting Python processes (median of ``--runs``).
4. **consumer**: ``resource<ID>`` is pre-filled with ``--samples`` samples and the
   monitor-producer's STOP; ``python -m monitor consumer ID`` is started and timed until it
   exits (start-up until READY reported apart); samples/s; the stored row count must equal
   the number of samples, and TERMINATE must be on ``task<ID>``. CPU of the consumer
   (rusage), of the PostgreSQL server and of the broker.
5. **fetch**: an idle reader configured as the monitor-producer's and the orchestrator's
   (``fetch.wait.max.ms=10``) against librdkafka's default: reader and broker CPU, and the
   produce -> poll() latency.

    ./dev python bench/order_flow.py [monitor|jitter|flow|consumer|fetch ...]   # default: all
        [--seconds 60] [--idle-seconds 20] [--orders 3] [--samples 100000]
        [--fetch-seconds 15] [--runs 10] [--json PATH]

(``jitter`` needs ``monitor``'s run and is measured with it.) The load average of the machine
is printed for every part: the figures are wall-clock and CPU times on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine, markdown_table, median, write_json  # noqa: E402

import confluent_kafka  # noqa: E402
import psutil  # noqa: E402
from sqlalchemy import select as sql_select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from devkit.orders import child_env  # noqa: E402
from pipeline.db import connect, create_schema  # noqa: E402
from pipeline.db.orders import OrderStore  # noqa: E402
from pipeline.db.schema import orders as orders_table, task_runs  # noqa: E402
from pipeline.kafka import Producer, TopicAdmin  # noqa: E402
from pipeline.kafka.config import client_config  # noqa: E402
from pipeline.protocol import (  # noqa: E402
    ORCHESTRATOR_TOPIC, RESOURCES, Message, MonitorStopped, MonitorTerminated, OrderStopped,
    Sample, TaskStarted, decode_resource_topic, order_topics, resource_topic, task_topic,
)
from pipeline.settings import Settings  # noqa: E402

PARTS = ("monitor", "jitter", "flow", "consumer", "fetch")
IMAGE = REPO_ROOT / "orders" / "images" / "scene-640x480.jpg"
LIGHT_TASKS = [
    "grayscale",
    {"name": "flip", "params": {"direction": "vertical"}},
    {"name": "rotate", "params": {"degrees": 90}},
    "sepia",
    "contrast",
    {"name": "sharpen", "params": {"radius": 1.0}},
    {"name": "blur", "params": {"radius": 1.0}},
    {"name": "resize", "params": {"scale": 0.5}},
]
# A stand-in for a task: busy for BUSY of every 100 ms, allocating (and dropping) 1 MiB.
DUMMY_TASK = """
import sys, time
busy = float(sys.argv[1])
keep = []
while True:
    start = time.perf_counter()
    keep.append(bytearray(1 << 20))
    if len(keep) > 64:
        keep.clear()
    x = 0
    while time.perf_counter() - start < 0.1 * busy:
        x += 1
    time.sleep(max(0.1 - (time.perf_counter() - start), 0))
"""
START_COMMANDS = {
    "python -c pass": ["-c", "pass"],
    'python -c "import PIL, numpy, confluent_kafka"': ["-c", "import PIL, numpy, confluent_kafka"],
    'python -c "import services.grayscale.main" (a task\'s imports)': ["-c", "import services.grayscale.main"],
}


# --------------------------------------------------------------------------- helpers


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def wait_ready(process: subprocess.Popen, timeout: float = 60.0) -> float:
    """Block until the child prints READY; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 0.05)
        if readable:
            line = process.stdout.readline()
            if line.strip() == b"READY":
                return time.monotonic()
            if not line:
                break
    raise RuntimeError(f"{process.args} did not print READY (exit status {process.poll()})")


def read_topic(settings: Settings, topic: str, timeout: float = 30.0) -> list[Message]:
    """Every message now in ``topic``, from its beginning to its current end."""
    consumer = confluent_kafka.Consumer(client_config(
        settings, **{"group.id": f"bench-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}))
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        ends: dict[int, int] = {}
        assignment = []
        for partition in metadata.topics[topic].partitions:
            tp = confluent_kafka.TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high > low:
                ends[partition] = high
                assignment.append(confluent_kafka.TopicPartition(topic, partition, low))
        consumer.assign(assignment)
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 0.5):
                if msg.error() is not None:
                    continue
                ts_type, ts = msg.timestamp()
                messages.append(Message(
                    msg.topic(), (msg.key() or b"").decode(), (msg.value() or b"").decode(),
                    tuple(msg.headers() or ()), ts if ts_type else None, msg.partition(), msg.offset()))
                if msg.offset() >= ends.get(msg.partition(), 0) - 1:
                    ends.pop(msg.partition(), None)
        if ends:
            raise RuntimeError(f"could not read {topic} to its end within {timeout:g}s")
        return messages
    finally:
        consumer.close()


class CpuWatch:
    """CPU seconds used by a changing set of processes (e.g. PostgreSQL's backends) while
    running: sampled every 0.2 s, so a process that ends loses at most its last 0.2 s."""

    def __init__(self, find_pids) -> None:
        self.find_pids = find_pids
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[int, float]:
        out = {}
        for pid in self.find_pids():
            try:
                out[pid] = cpu_seconds(psutil.Process(pid))
            except psutil.Error:
                pass
        return out

    def __enter__(self) -> "CpuWatch":
        self.base = self._read()
        self.last = dict(self.base)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.last.update(self._read())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(self._read())

    @property
    def seconds(self) -> float:
        return sum(value - self.base.get(pid, 0.0) for pid, value in self.last.items())


def postgres_pids(database_url: str):
    """The local PostgreSQL server serving ``database_url`` (postmaster and children)."""
    port = str(make_url(database_url).port or 5432)
    root = None
    for process in psutil.process_iter(["name", "cmdline"]):
        cmd = process.info["cmdline"] or []
        if cmd and cmd[0].endswith("postgres") and "-p" in cmd and cmd[cmd.index("-p") + 1: cmd.index("-p") + 2] == [port]:
            root = process
            break

    def find() -> list[int]:
        if root is None:
            return []
        try:
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []
    return find


def kafka_pids(settings: Settings):
    """The local broker started by ``infra up`` for this state directory, if any."""
    marker = str(settings.state_dir / "kafka" / "server.properties")
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
    return lambda: pids


def warm_group_coordinator(settings: Settings, timeout: float = 60.0) -> None:
    """Wait until the broker's group coordinator answers an OffsetFetch.

    On a freshly formatted broker the first OffsetFetch can fail with a request-level
    NOT_COORDINATOR while ``__consumer_offsets`` is being created; a consumer that
    ``assign()``ed a partition at the stored offset then never starts fetching it
    (librdkafka issue #5586). ``pipeline.kafka.Consumer.assign`` waits this out itself since
    commit 2461b52; waiting here too keeps older checkouts measurable.
    """
    consumer = confluent_kafka.Consumer(client_config(settings, **{"group.id": "bench-warmup"}))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                parts = consumer.committed([confluent_kafka.TopicPartition(ORCHESTRATOR_TOPIC, 0)], timeout=5)
                if all(p.error is None for p in parts):
                    return
            except confluent_kafka.KafkaException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker's group coordinator did not answer within {timeout:g}s")
            time.sleep(0.5)
    finally:
        consumer.close()


class Report:
    def __init__(self) -> None:
        self.rows: list[list[object]] = []
        self.results: dict[str, dict] = {}

    def add(self, part: str, metric: str, value: str, note: str = "") -> None:
        self.rows.append([part, metric, value, note])


# --------------------------------------------------------------------------- 1 + 2: monitor-producer


def bench_monitor(settings: Settings, store: OrderStore, admin: TopicAdmin, args, report: Report) -> None:
    order_id = store.create("bench-monitor-producer", "-", "dummy")
    admin.create(list(order_topics(order_id)))
    scratch = f"bench-scratch-{uuid.uuid4().hex[:6]}"
    admin.create([scratch])
    env = child_env(settings)
    log_dir = settings.state_dir / "logs" / "bench-order-flow"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker_pids = kafka_pids(settings)

    def broker_cpu() -> float:
        return sum(cpu_seconds(psutil.Process(pid)) for pid in broker_pids())

    load_before = load()
    dummy = subprocess.Popen([sys.executable, "-c", DUMMY_TASK, str(args.busy)])
    monitor = None
    try:
        print(f"broker alone for {args.idle_seconds:g}s", flush=True)
        b0, w0 = broker_cpu(), time.monotonic()
        time.sleep(args.idle_seconds)
        broker_alone_pct = 100 * (broker_cpu() - b0) / (time.monotonic() - w0)
        with open(log_dir / f"monitor-producer-{order_id}.log", "wb") as log, Producer(settings) as producer:
            # Connected before the ORDER, so the ORDER's timestamp -> first sample is the
            # monitor's reaction alone (a real task's cold producer is measured in part 3).
            producer.send_now(Message(scratch, "WARMUP", "x"))
            spawned = time.monotonic()
            monitor = subprocess.Popen([sys.executable, "-m", "monitor", "producer", str(order_id)],
                                       env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log)
            ready = wait_ready(monitor)
            proc = psutil.Process(monitor.pid)
            cpu_ready = cpu_seconds(proc)
            print(f"monitor-producer ready after {ready - spawned:.2f}s; idle {args.idle_seconds:g}s", flush=True)

            time.sleep(1.0)  # let its start-up settle
            c0, b0, w0 = cpu_seconds(proc), broker_cpu(), time.monotonic()
            time.sleep(args.idle_seconds)
            c1, b1, w1 = cpu_seconds(proc), broker_cpu(), time.monotonic()
            idle_pct = 100 * (c1 - c0) / (w1 - w0)
            broker_idle_pct = 100 * (b1 - b0) / (w1 - w0)

            dummy_proc = psutil.Process(dummy.pid)
            producer.send_now(TaskStarted(("dummy",), "dummy", order_id, dummy.pid,
                                          socket.gethostname(), 0).encode())
            order_acked_ms = time.time() * 1000
            print(f"ORDER sent; sampling for {args.seconds:g}s", flush=True)
            c2, b2, w2, d2 = cpu_seconds(proc), broker_cpu(), time.monotonic(), cpu_seconds(dummy_proc)
            time.sleep(args.seconds)
            c3, b3, w3, d3 = cpu_seconds(proc), broker_cpu(), time.monotonic(), cpu_seconds(dummy_proc)
            sampling_pct = 100 * (c3 - c2) / (w3 - w2)
            broker_sampling_pct = 100 * (b3 - b2) / (w3 - w2)
            dummy_pct = 100 * (d3 - d2) / (w3 - w2)

            producer.send_now(OrderStopped(order_id).encode())
            # The monitor answers STOP with its own STOP on resource<ID>; then TERMINATE.
            deadline = time.monotonic() + 30
            while not any(m.key == "STOP" for m in read_topic(settings, resource_topic(order_id))):
                if time.monotonic() > deadline:
                    raise RuntimeError("the monitor-producer sent no STOP on the resource topic")
                time.sleep(0.2)
            producer.send_now(MonitorTerminated(order_id).encode())
            terminated = time.monotonic()
            code = monitor.wait(30)
            exit_s = time.monotonic() - terminated
        resource_messages = read_topic(settings, resource_topic(order_id))
        task_messages = read_topic(settings, task_topic(order_id))
    finally:
        dummy.kill()
        dummy.wait()
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        admin.delete([*order_topics(order_id), scratch])
    load_after = load()

    samples = [decode_resource_topic(m, order_id) for m in resource_messages if m.key != "STOP"]
    cpu_ts = sorted(s.timestamp_ms for s in samples if s.resource == "cpu")
    sampled_cpu = [s.value for s in samples if s.resource == "cpu"]
    order_ts = next(m.timestamp_ms for m in task_messages if m.key == "ORDER")
    intervals = [b - a for a, b in zip(cpu_ts, cpu_ts[1:])]
    jitter = [abs(i - 1000) for i in intervals]
    drift = [abs(ts - cpu_ts[0] - k * 1000) for k, ts in enumerate(cpu_ts)]
    per_resource = {r: sum(1 for s in samples if s.resource == r) for r in RESOURCES}

    monitor_result = {
        "order_id": order_id, "seconds": args.seconds, "idle_seconds": args.idle_seconds,
        "busy": args.busy, "ready_s": ready - spawned, "startup_cpu_s": cpu_ready,
        "idle_cpu_pct": idle_pct, "sampling_cpu_pct": sampling_pct,
        "per_tick_cpu_ms": 1000 * (c3 - c2) / max(len(cpu_ts) - 1, 1),
        "dummy_cpu_pct_psutil": dummy_pct, "dummy_cpu_pct_sampled_mean": statistics.mean(sampled_cpu),
        "broker_alone_cpu_pct": broker_alone_pct if broker_pids() else None,
        "broker_monitor_idle_cpu_pct": broker_idle_pct if broker_pids() else None,
        "broker_sampling_cpu_pct": broker_sampling_pct if broker_pids() else None,
        "exit_status": code, "exit_after_terminate_s": exit_s,
        "load_before": load_before, "load_after": load_after,
    }
    jitter_result = {
        "cpu_samples": len(cpu_ts), "per_resource": per_resource,
        "intervals": len(intervals), "jitter_p50_ms": percentile(jitter, 50),
        "jitter_p99_ms": percentile(jitter, 99), "jitter_max_ms": max(jitter),
        "interval_min_ms": min(intervals), "interval_max_ms": max(intervals),
        "drift_max_ms": max(drift), "order_to_first_sample_ms": cpu_ts[0] - order_ts,
        "order_acked_to_first_sample_ms": cpu_ts[0] - order_acked_ms,
        "intervals_ms": intervals,
    }
    report.results["monitor"] = monitor_result
    report.results["jitter"] = jitter_result
    m, j, part = monitor_result, jitter_result, "1 monitor-producer"
    report.add(part, "start-up: spawn -> READY", f"{m['ready_s']:.2f} s", f"{m['startup_cpu_s']:.2f} s CPU")
    report.add(part, f"CPU while idle, no task ({args.idle_seconds:g} s)", f"{m['idle_cpu_pct']:.2f} % of a core",
               f"load {m['load_before']} -> {m['load_after']}")
    report.add(part, f"CPU while sampling 1 task ({args.seconds:g} s)", f"**{m['sampling_cpu_pct']:.2f} % of a core**",
               f"{m['per_tick_cpu_ms']:.1f} ms CPU per 1 s tick (4 samples)")
    if m["broker_alone_cpu_pct"] is not None:
        report.add(part, "Kafka broker CPU: alone / monitor idle / sampling",
                   f"{m['broker_alone_cpu_pct']:.1f} / {m['broker_monitor_idle_cpu_pct']:.1f} / "
                   f"{m['broker_sampling_cpu_pct']:.1f} % of a core", "the benchmark's own broker")
    report.add(part, "dummy task's CPU: psutil vs mean sampled value",
               f"{m['dummy_cpu_pct_psutil']:.1f} % vs {m['dummy_cpu_pct_sampled_mean']:.1f} %",
               f"dummy busy {args.busy:.0%} of each 100 ms")
    report.add(part, "exit after TERMINATE", f"{m['exit_after_terminate_s']:.2f} s", f"exit status {m['exit_status']}")
    part = "2 sampling jitter"
    report.add(part, "samples per resource", str(j["per_resource"]["cpu"]),
               f"{args.seconds:g} s of sampling; counts of the 4 resources: {sorted(set(j['per_resource'].values()))}")
    report.add(part, "abs(interval - 1000 ms) p50 / p99 / max",
               f"{j['jitter_p50_ms']:.0f} / {j['jitter_p99_ms']:.0f} / {j['jitter_max_ms']:.0f} ms",
               f"intervals {j['interval_min_ms']}..{j['interval_max_ms']} ms")
    report.add(part, "max drift from first + k x 1000 ms", f"{j['drift_max_ms']:.0f} ms", "")
    report.add(part, "ORDER created / acked -> first sample",
               f"{j['order_to_first_sample_ms']:.0f} / {j['order_acked_to_first_sample_ms']:.0f} ms",
               "warm producer; the monitor's reaction")



# --------------------------------------------------------------------------- 3: task flow


def time_command(argv: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=env, cwd=REPO_ROOT, check=True)
        times.append(time.perf_counter() - began)
    return median(times)


FRESH_PRODUCER = """
import sys, time
from pipeline.kafka import Producer
from pipeline.protocol import Message
from pipeline.settings import Settings
with Producer(Settings.from_env(), **{"linger.ms": 0}) as p:
    p.send_now(Message(sys.argv[1], "ORDER", "x"))
"""


def bench_flow(settings: Settings, store: OrderStore, admin: TopicAdmin, args, report: Report) -> None:
    env = child_env(settings)
    load_before = load()
    name = f"bench-flow-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        order_file = Path(tmp) / "order.json"
        order_file.write_text(json.dumps({"id": name, "image": str(IMAGE), "tasks": LIGHT_TASKS}))
        print(f"running {args.orders} x order {name} ({len(LIGHT_TASKS)} tasks)", flush=True)
        began = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "orchestrator", "run", str(order_file), "--keep-topics",
             "--repeat", str(args.orders), "--max-concurrent", "1"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        wall = time.monotonic() - began
    if run.returncode != 0:
        raise RuntimeError(f"orchestrator exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    with store.engine.connect() as conn:
        order_ids = [r[0] for r in conn.execute(
            sql_select(orders_table.c.id).where(orders_table.c.name == name).order_by(orders_table.c.id))]
        runs = conn.execute(
            sql_select(task_runs).where(task_runs.c.order_id.in_(order_ids))
            .order_by(task_runs.c.order_id, task_runs.c.position)).mappings().all()
    progress = {}
    for m in read_topic(settings, ORCHESTRATOR_TOPIC):
        if m.key == "PROGRESS" and m.header("order_id") and int(m.header("order_id")) in order_ids:
            progress[(int(m.header("order_id")), int(m.header("index")))] = m.timestamp_ms / 1000
    order_sent, first_sample, samples_per_task = {}, {}, {}
    task_names = [t if isinstance(t, str) else t["name"] for t in LIGHT_TASKS]
    for order_id in order_ids:
        for m in read_topic(settings, task_topic(order_id)):
            if m.key == "ORDER":
                order_sent[(order_id, int(m.header("index")))] = m.timestamp_ms / 1000
        # The 8 tasks have distinct names, so a sample's task name gives its position.
        for m in read_topic(settings, resource_topic(order_id)):
            if m.key != "STOP":
                key = (order_id, task_names.index(decode_resource_topic(m, order_id).task_name))
                first_sample[key] = min(first_sample.get(key, float("inf")), m.timestamp_ms / 1000)
                samples_per_task[key] = samples_per_task.get(key, 0) + 1
    admin.delete([t for order_id in order_ids for t in order_topics(order_id)])

    def ts(value: datetime) -> float:
        return value.timestamp()

    by_key = {(r["order_id"], r["position"]): r for r in runs if r["attempt"] == 1}
    if len(by_key) != len(runs) or len(runs) != len(order_ids) * len(LIGHT_TASKS):
        raise RuntimeError(f"expected {len(order_ids) * len(LIGHT_TASKS)} single attempts, got {len(runs)} rows")
    db_gap, progress_to_finished, progress_to_order, progress_to_sample = [], [], [], []
    start_to_order, order_to_sample, task_time = [], [], []
    for (order_id, position), row in by_key.items():
        start_to_order.append(order_sent[(order_id, position)] - ts(row["started_at"]))
        order_to_sample.append(first_sample[(order_id, position)] - order_sent[(order_id, position)])
        task_time.append(progress[(order_id, position)] - order_sent[(order_id, position)])
        following = by_key.get((order_id, position + 1))
        if following is None:
            continue
        db_gap.append(ts(following["started_at"]) - ts(row["finished_at"]))
        progress_to_finished.append(ts(row["finished_at"]) - progress[(order_id, position)])
        progress_to_order.append(order_sent[(order_id, position + 1)] - progress[(order_id, position)])
        progress_to_sample.append(first_sample[(order_id, position + 1)] - progress[(order_id, position)])
    print("timing process starts", flush=True)
    scratch = f"bench-scratch-{uuid.uuid4().hex[:6]}"
    admin.create([scratch])
    starts = {label: time_command(argv, env, args.runs) for label, argv in START_COMMANDS.items()}
    fresh = time_command(["-c", FRESH_PRODUCER, scratch], env, args.runs)
    # In this process: a new Producer per message, as every task makes one for its ORDER.
    fresh_in_process = {}
    for label, overrides in (("idempotent", {}), ("not idempotent", {"enable.idempotence": False})):
        times = []
        for _ in range(args.runs):
            began = time.perf_counter()
            with Producer(settings, **{"linger.ms": 0, **overrides}) as producer:
                producer.send_now(Message(scratch, "ORDER", "x"))
            times.append(time.perf_counter() - began)
        fresh_in_process[label] = median(times)
    admin.delete([scratch])
    load_after = load()

    def ms(values: list[float], q: float) -> float:
        return 1000 * percentile(values, q)

    result = {
        "order_ids": order_ids, "tasks_per_order": len(LIGHT_TASKS), "gaps": len(db_gap), "wall_s": wall,
        "db_gap_ms": [1000 * g for g in db_gap],
        "progress_to_finished_ms": [1000 * g for g in progress_to_finished],
        "progress_to_next_order_ms": [1000 * g for g in progress_to_order],
        "started_to_order_ms": [1000 * g for g in start_to_order],
        "order_to_first_sample_ms": [1000 * g for g in order_to_sample],
        "progress_to_next_first_sample_ms": [1000 * g for g in progress_to_sample],
        "order_to_progress_ms": [1000 * g for g in task_time],
        "python_start_median_s": starts, "fresh_producer_send_median_s": fresh,
        "fresh_producer_in_process_median_s": fresh_in_process,
        "samples_per_task": [n // len(RESOURCES) for n in samples_per_task.values()],
        "load_before": load_before, "load_after": load_after,
    }
    report.results["flow"] = result
    part = "3 task flow"
    report.add(part, f"orders run ({len(LIGHT_TASKS)} light tasks each)", f"{len(order_ids)} in {wall:.1f} s",
               f"{len(db_gap)} gaps; load {load_before} -> {load_after}")
    rows = [
        ("PROGRESS created(k) -> task_runs.finished_at(k)", progress_to_finished,
         "delivery to the orchestrator + waiting for task k to exit + DB update"),
        ("task_runs.finished_at(k) -> started_at(k+1)", db_gap, "the orchestrator's bookkeeping"),
        ("started_at -> ORDER created", start_to_order,
         "spawn + imports + argument parsing + Producer() of the task; all positions"),
        ("ORDER created -> its first sample", order_to_sample,
         "the task's producer connects and delivers + the monitor reacts; all positions"),
        ("PROGRESS created(k) -> ORDER created(k+1)", progress_to_order, ""),
        ("**PROGRESS created(k) -> first sample of k+1**", progress_to_sample,
         "the whole gap: no task is sampled in it"),
        ("ORDER created -> PROGRESS created, within a task", task_time,
         "image work + at least 0.5 s (MIN_OBSERVABLE_SECONDS)"),
    ]
    for label, values, note in rows:
        report.add(part, label + " p50 / p99", f"{ms(values, 50):.0f} / {ms(values, 99):.0f} ms", note)
    for label, seconds in starts.items():
        report.add(part, label, f"{1000 * seconds:.0f} ms", f"median of {args.runs}")
    report.add(part, "fresh process: imports + Producer + send_now 1 message", f"{1000 * fresh:.0f} ms",
               f"median of {args.runs}")
    report.add(part, "new Producer + send_now 1 message: idempotent (wrapper default) / not",
               f"{1000 * fresh_in_process['idempotent']:.0f} / {1000 * fresh_in_process['not idempotent']:.0f} ms",
               f"median of {args.runs}, in one process, linger.ms=0")
    spt = result["samples_per_task"]
    report.add(part, "samples per task (per resource): min / median / max",
               f"{min(spt)} / {median(spt):g} / {max(spt)}", "")


# --------------------------------------------------------------------------- 4: monitor-consumer


def bench_consumer(settings: Settings, store: OrderStore, admin: TopicAdmin, args, report: Report) -> None:
    n = args.samples
    task_names = ["resize", "grayscale", "blur", "sharpen", "rotate"]
    order_id = store.create("bench-monitor-consumer", "-", ",".join(task_names))
    admin.create(list(order_topics(order_id)))
    load_before = load()
    rng = random.Random(3)
    base_ms = int(time.time() * 1000) - (n // len(RESOURCES) + 1) * 1000
    ticks = -(-n // len(RESOURCES))
    per_task = -(-ticks // len(task_names))
    print(f"filling {resource_topic(order_id)} with {n} samples", flush=True)
    began = time.monotonic()
    with Producer(settings) as producer:
        for i in range(n):
            tick, resource = divmod(i, len(RESOURCES))
            producer.send(Sample(tuple(task_names), task_names[tick // per_task], order_id,
                                 RESOURCES[resource], round(rng.uniform(0, 400), 3),
                                 base_ms + tick * 1000).encode())
        producer.send(MonitorStopped(order_id).encode())
    fill_s = time.monotonic() - began

    env = child_env(settings)
    log_dir = settings.state_dir / "logs" / "bench-order-flow"
    log_dir.mkdir(parents=True, exist_ok=True)
    print("running the monitor-consumer", flush=True)
    with open(log_dir / f"monitor-consumer-{order_id}.log", "wb") as log, \
            CpuWatch(postgres_pids(settings.database_url)) as pg, CpuWatch(kafka_pids(settings)) as broker:
        spawned_wall, spawned = time.time(), time.monotonic()
        consumer = subprocess.Popen([sys.executable, "-m", "monitor", "consumer", str(order_id)],
                                    env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log)
        ready = wait_ready(consumer)
        _, status, usage = os.wait4(consumer.pid, 0)
        exited = time.monotonic()
        consumer.returncode = os.waitstatus_to_exitcode(status)
        consumer.stdout.close()
    terminate = [m for m in read_topic(settings, task_topic(order_id)) if m.key == "TERMINATE"]
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM measurements WHERE order_id = :id"),
                              {"id": order_id}).scalar_one()
    admin.delete(list(order_topics(order_id)))
    load_after = load()
    if consumer.returncode != 0 or stored != n or not terminate:
        raise RuntimeError(f"consumer exit {consumer.returncode}, {stored} of {n} rows stored, "
                           f"TERMINATE {'sent' if terminate else 'missing'}")
    terminate_at = spawned + (terminate[0].timestamp_ms / 1000 - spawned_wall)
    work_s = terminate_at - ready
    cpu_s = usage.ru_utime + usage.ru_stime
    result = {
        "order_id": order_id, "samples": n, "stored": stored, "fill_s": fill_s,
        "ready_s": ready - spawned, "ready_to_terminate_s": work_s, "terminate_to_exit_s": exited - terminate_at,
        "total_s": exited - spawned, "samples_per_s": n / work_s, "samples_per_s_total": n / (exited - spawned),
        "consumer_cpu_s": cpu_s, "postgres_cpu_s": pg.seconds, "broker_cpu_s": broker.seconds,
        "dialect": store.engine.dialect.name, "load_before": load_before, "load_after": load_after,
    }
    report.results["consumer"] = result
    r, part = result, "4 monitor-consumer"
    report.add(part, f"{n} samples pre-filled (producer, linger 5 ms)", f"{r['fill_s']:.1f} s",
               f"{n / r['fill_s']:,.0f} msg/s from one Python producer")
    report.add(part, "start-up: spawn -> READY", f"{r['ready_s']:.2f} s", "")
    report.add(part, "READY -> TERMINATE created (read + store all)", f"{r['ready_to_terminate_s']:.1f} s",
               f"**{r['samples_per_s']:,.0f} samples/s** into {r['dialect']}")
    report.add(part, "TERMINATE created -> exit", f"{r['terminate_to_exit_s']:.2f} s",
               "a new idempotent Producer delivers it, then the clients close")
    report.add(part, "spawn -> exit", f"{r['total_s']:.1f} s", f"{r['samples_per_s_total']:,.0f} samples/s overall")
    report.add(part, "rows in measurements", f"{stored}", "= N" if stored == n else "!= N")
    report.add(part, "CPU: consumer / PostgreSQL / broker",
               f"{r['consumer_cpu_s']:.1f} / {r['postgres_cpu_s']:.1f} / {r['broker_cpu_s']:.1f} s",
               f"{1e6 * r['consumer_cpu_s'] / n:.0f} us consumer CPU per sample; load {load_before} -> {load_after}")


# --------------------------------------------------------------------------- 5: fetch.wait.max.ms


FETCH_CHILD = """
import sys, time
from pipeline.settings import Settings
from pipeline.kafka import Consumer
wait, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = {} if wait == "default" else {"fetch.wait.max.ms": int(wait)}
with Consumer(Settings.from_env(), group_id=f"{topic}-{wait}", **extra) as consumer:
    consumer.assign([topic], from_end=True)
    print("READY", flush=True)
    seen = 0
    while seen < count:
        message = consumer.poll(0.2)   # as the monitor-producer's idle loop
        if message is not None:
            print(time.time() * 1000 - message.timestamp_ms, flush=True)
            seen += 1
"""


def bench_fetch_wait(settings: Settings, admin: TopicAdmin, args, report: Report) -> None:
    """An idle reader as the monitor-producer and the orchestrator's ProgressListener configure
    theirs (fetch.wait.max.ms=10) against librdkafka's default (500): the reader's and the
    broker's CPU while nothing arrives, and the delivery latency when something does."""
    broker_pids = kafka_pids(settings)
    if not broker_pids():
        return
    topic = f"bench-fetch-{uuid.uuid4().hex[:6]}"
    admin.create([topic])
    env = child_env(settings)
    count = 20
    results = {}
    load_before = load()
    try:
        with Producer(settings, **{"linger.ms": 0}) as producer:
            producer.send_now(Message(topic, "WARMUP", "x"))
            for wait in ("10", "default"):
                child = subprocess.Popen([sys.executable, "-c", FETCH_CHILD, wait, topic, str(count)],
                                         env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE)
                try:
                    wait_ready(child)
                    time.sleep(2.0)
                    proc = psutil.Process(child.pid)
                    c0, b0, w0 = cpu_seconds(proc), sum(cpu_seconds(psutil.Process(p)) for p in broker_pids()), time.monotonic()
                    time.sleep(args.fetch_seconds)
                    c1, b1, w1 = cpu_seconds(proc), sum(cpu_seconds(psutil.Process(p)) for p in broker_pids()), time.monotonic()
                    for _ in range(count):
                        producer.send_now(Message(topic, "PING", "x"))
                        time.sleep(0.25)
                    out, _ = child.communicate(timeout=30)
                finally:
                    if child.poll() is None:
                        child.kill()
                        child.wait()
                latencies = [float(line) for line in out.decode().split()]
                results[wait] = {
                    "reader_cpu_pct": 100 * (c1 - c0) / (w1 - w0), "broker_cpu_pct": 100 * (b1 - b0) / (w1 - w0),
                    "latency_p50_ms": percentile(latencies, 50), "latency_max_ms": max(latencies),
                }
    finally:
        admin.delete([topic])
    results["load_before"], results["load_after"] = load_before, load()
    report.results["fetch_wait"] = results
    part = "5 fetch.wait.max.ms"
    for wait, label in (("10", "10 ms (monitor-producer, ProgressListener)"), ("default", "500 ms (librdkafka default)")):
        r = results[wait]
        report.add(part, f"{label}: idle reader CPU / broker CPU",
                   f"{r['reader_cpu_pct']:.2f} / {r['broker_cpu_pct']:.1f} % of a core",
                   f"{args.fetch_seconds:g} s idle, polling 0.2 s")
        report.add(part, f"{label}: produce -> poll() returns, p50 / max",
                   f"{r['latency_p50_ms']:.1f} / {r['latency_max_ms']:.1f} ms", f"{count} messages, 0.25 s apart")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"parts to run, of {', '.join(PARTS)} (default: all); jitter comes with monitor")
    parser.add_argument("--seconds", type=float, default=60.0, help="monitor-producer sampling time")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="monitor-producer idle time before ORDER")
    parser.add_argument("--busy", type=float, default=0.5, help="dummy task's busy fraction of one core")
    parser.add_argument("--orders", type=int, default=3, help="runs of the 8-task order")
    parser.add_argument("--runs", type=int, default=10, help="runs of each process-start command")
    parser.add_argument("--samples", type=int, default=100_000, help="samples for the monitor-consumer")
    parser.add_argument("--fetch-seconds", type=float, default=15.0,
                        help="idle time of each reader in the fetch.wait.max.ms part")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    parts = set(args.parts or PARTS)
    if "jitter" in parts:
        parts.add("monitor")

    settings = Settings.from_env()
    engine = connect(settings.database_url)
    create_schema(engine)
    store, admin = OrderStore(engine), TopicAdmin(settings)
    admin.create([ORCHESTRATOR_TOPIC])
    warm_group_coordinator(settings)
    info = machine()
    info["loadavg_start"] = load()
    print(f"machine: {info}", flush=True)
    report = Report()
    if "monitor" in parts:
        bench_monitor(settings, store, admin, args, report)
    if "flow" in parts:
        bench_flow(settings, store, admin, args, report)
    if "consumer" in parts:
        bench_consumer(settings, store, admin, args, report)
    if "fetch" in parts:
        bench_fetch_wait(settings, admin, args, report)
    info["loadavg_end"] = load()
    print()
    print(markdown_table(["part", "metric", "value", "notes"], report.rows))
    print(f"\nload average (1/5/15 min): {info['loadavg_start']} at start, {info['loadavg_end']} at end")
    write_json(args.json, {"machine": info, "args": vars(args), "results": report.results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
