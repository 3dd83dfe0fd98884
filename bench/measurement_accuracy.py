"""Measurement accuracy (issue 10): the stored samples of every task run against what the
kernel accounted for the task's process tree, and what monitoring costs the work.

``accuracy`` runs an order of every catalog task over a large generated image, and an order
whose task forks worker children (the ``cpu_hog`` fault), through the real orchestrator,
broker and monitors. Every task and monitor process is started under
``bench/kernel_account.py``, which records the kernel's own figures at its exit (wait4's
rusage, so reaped children included, and /proc/<pid>/io): the ground truth, gathered
without the sampler. The samples of a run are integrated as the protocol defines them (each
a rate over the interval that ends at its timestamp; the first interval starts when the
process did) and printed beside the truth, with the share of each run's CPU that its closing
sample carries (the sample published on HALT, from the task's own totals less what the
periodic samples counted) beside its interval's share of the run's time: the closing sample
absorbs any undercount of the periodic samples, so a run adds up whatever they say, and only
a closing share well over the time share shows one.

``overhead`` runs an order of eight light tasks with monitoring and with ``--no-monitors``,
alternating, and compares their wall times; it also times the sampler itself on a running
task (CPU per sample).

    ./dev python bench/measurement_accuracy.py accuracy [--width 2400 --height 1700]
    ./dev python bench/measurement_accuracy.py accuracy --copies 3 --busy-cores 1   # under load
    ./dev python bench/measurement_accuracy.py overhead [--rounds 5]

Kafka comes from KAFKA_BOOTSTRAP_SERVERS or the local broker (started if needed); the
samples go to a fresh SQLite file in a temporary folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path

from _common import REPO_ROOT, loadavg, machine, markdown_table, write_json

sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy import select  # noqa: E402

from devkit.sample_series import closing_share  # noqa: E402
from pipeline.db import connect  # noqa: E402
from pipeline.db.schema import measurements, orders, resources, task_runs  # noqa: E402
from pipeline.invocation import TaskInvocation  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

KERNEL_ACCOUNT = REPO_ROOT / "bench" / "kernel_account.py"
ALL_TASKS = [
    {"name": "resize", "params": {"scale": 1.0}}, "grayscale", "flip", "rotate", "contrast",
    "equalize", "sepia", "blur", "sharpen", "edge_detect", "median", "jpeg", "watermark",
    {"name": "denoise", "params": {"search": 2}}, {"name": "upscale", "params": {"iterations": 3}},
]
FORKING = [{"name": "blur", "fault": "cpu_hog", "fault_at": 0.5}, "grayscale"]
LIGHT = ["flip", "grayscale", "sepia", "contrast", "jpeg", "rotate", "equalize", "edge_detect"]
CPU_TOLERANCE = IO_TOLERANCE = 0.05
MEMORY_FLOOR = 0.90
IO_SLACK_KIB = 4.0  # one page either way counts as agreement when the truth is near zero


def _orchestrate_accounted(record_dir: str, argv: list[str]) -> int:
    """``orchestrator run`` with every task and monitor process under kernel_account.py."""
    from orchestrator import cli
    from orchestrator.runtime import local

    counter = itertools.count()

    class Accounted(local.ProcessHandle):
        def __init__(self, name, command, env, log_path, ready_pipe):
            out = Path(record_dir) / f"{next(counter):04d}.json"
            super().__init__(name, [sys.executable, str(KERNEL_ACCOUNT), str(out), "--", *command],
                             env, log_path, ready_pipe)

    local.ProcessHandle = Accounted
    return cli.main(argv)


def _environment(folder: Path, task_start: str = "fork-server", monitors: str = "per-order") -> dict[str, str]:
    env = dict(os.environ)
    # Live scoring stays on, as by default: with no model registered in this fresh MLflow
    # store, the consumer looks for one and stores the samples unscored.
    env.update({"DATABASE_URL": f"sqlite:///{folder / 'bench.db'}", "ARTIFACT_DIR": str(folder / "artifacts"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "PYTHONPATH": str(REPO_ROOT)})
    # The ground truth: a spawned task's command runs under kernel_account.py (ProcessHandle
    # above); a forked one is accounted by the fork server when it reaps it, in the same form.
    env["TASK_START"] = task_start
    if task_start == "fork-server":
        env["PIPELINE_KERNEL_ACCOUNT_DIR"] = str(folder / "kernel")
    # Monitors per order, or the shared services of this run's own state folder (stopped at
    # the end, see _stop_shared).
    env["MONITORS"] = monitors
    bootstrap = Settings.from_env().kafka_bootstrap_servers  # the broker infra.env names
    if bootstrap:
        env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    env["PIPELINE_STATE_DIR"] = str(folder / "state")
    return env


def _stop_shared(env: dict[str, str]) -> None:
    from ops.infra.shared_monitors import SharedMonitors

    SharedMonitors(Settings.from_env(env)).stop()


def _photo(path: Path, width: int, height: int, seed: int = 7) -> Path:
    """A photo-like image: smooth gradients, shapes and sensor noise (compresses like one)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in (0.0, 1.3, 2.6)], axis=-1)
    noise = rng.normal(0, 18, size=(height, width, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def _order_file(folder: Path, name: str, image: Path, task_list: list) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"id": name, "image": str(image), "tasks": task_list}))
    return path


def _truth(record_dir: Path) -> tuple[dict[tuple[int, int, int], dict], list[dict]]:
    """Kernel records of task runs by (order, position, attempt), and the monitors'."""
    runs, monitors = {}, []
    for path in sorted(record_dir.glob("*.json")):
        record = json.loads(path.read_text())
        command = record["command"]
        if command[1:3] == ["-m", "monitor"]:
            record["kind"], record["order_id"] = command[3], int(command[4])
            monitors.append(record)
            continue
        invocation = TaskInvocation.from_args(command[3:])
        record["task"] = invocation.task_name
        runs[(invocation.order_id, invocation.position, invocation.attempt)] = record
    return runs, monitors


def _stored(database_url: str) -> dict[tuple[int, int, int], dict[str, list[tuple[float, float]]]]:
    """(timestamp ms, value) series per run and resource."""
    engine = connect(database_url)
    query = (select(measurements.c.order_id, measurements.c.position, measurements.c.attempt,
                    resources.c.name, measurements.c.ts, measurements.c.value)
             .join(resources, resources.c.id == measurements.c.resource_id)
             .order_by(measurements.c.ts))
    series: dict = {}
    with engine.connect() as conn:
        for order_id, position, attempt, resource, ts, value in conn.execute(query):
            stamp = ts.replace(tzinfo=ts.tzinfo or timezone.utc).timestamp() * 1000
            series.setdefault((order_id, position, attempt), {}).setdefault(resource, []).append((stamp, value))
    engine.dispose()
    return series


def _integral(points: list[tuple[float, float]], started_ms: float) -> float:
    """Sum of rate x interval, each interval ending at its sample's timestamp."""
    total, previous = 0.0, started_ms
    for stamp, value in points:
        total += value * max(stamp - previous, 0.0) / 1000.0
        previous = stamp
    return total


def _compare(truth: dict, series: dict) -> tuple[list[list[object]], list[dict]]:
    rows, records = [], []
    for key in sorted(truth):
        true = truth[key]
        got = series.get(key, {})
        start = true["started_ms"]
        cpu = _integral(got.get("cpu", []), start) / 100.0
        read = _integral(got.get("disk_read", []), start)
        write = _integral(got.get("disk_write", []), start)
        wait = _integral(got.get("cpu_wait", []), start) / 100.0
        peak = max((v for _, v in got.get("memory", [])), default=0.0)
        true_read, true_write = true.get("read_bytes", 0) / 1024, true.get("write_bytes", 0) / 1024
        true_peak = true["peak_rss_kib"] / 1024
        ok = {
            "cpu": abs(cpu - true["cpu_seconds"]) <= CPU_TOLERANCE * true["cpu_seconds"],
            "read": abs(read - true_read) <= max(IO_TOLERANCE * true_read, IO_SLACK_KIB),
            "write": abs(write - true_write) <= max(IO_TOLERANCE * true_write, IO_SLACK_KIB),
            "memory": peak >= MEMORY_FLOOR * true_peak,
        }
        samples = len(got.get("cpu", []))
        wall = (true["ended_ms"] - start) / 1000
        share = closing_share(got["cpu"], start) if got.get("cpu") else None
        rows.append([f"{key[1] + 1}. {true['task']} (order {key[0]})",
                     f"{wall:.2f}", samples,
                     f"{cpu:.3f}", f"{true['cpu_seconds']:.3f}",
                     f"{read:.0f}", f"{true_read:.0f}", f"{write:.0f}", f"{true_write:.0f}",
                     f"{peak:.1f}", f"{true_peak:.1f}", f"{wait:.3f}",
                     f"{share.cpu_share:.3f}" if share else "-", f"{share.time_share:.3f}" if share else "-",
                     "yes" if all(ok.values()) else "NO: " + ",".join(k for k, v in ok.items() if not v)])
        records.append({"order_id": key[0], "position": key[1], "attempt": key[2], "task": true["task"],
                        "wall_s": wall, "samples": samples, "cpu_s": [cpu, true["cpu_seconds"]],
                        "read_kib": [read, true_read], "write_kib": [write, true_write],
                        "peak_mib": [peak, true_peak], "cpu_wait_s": wait, "within_bounds": ok,
                        "closing": None if share is None else {
                            "cpu_share": share.cpu_share, "time_share": share.time_share,
                            "cpu_s": share.closing_cpu_s, "seconds": share.closing_s,
                            "periodic_samples": share.periodic}})
    return rows, records


def _closing_summary(records: list[dict]) -> str:
    """The closing sample's share of CPU beside its share of time, over the runs it does not
    make up alone (at least one periodic sample)."""
    shared = [r["closing"] for r in records if r["closing"] and r["closing"]["periodic_samples"] > 0]
    alone = sum(1 for r in records if r["closing"] and r["closing"]["periodic_samples"] == 0)
    if not shared:
        return f"closing sample: all {alone} runs are one closing sample alone"
    excess = sorted(c["cpu_share"] - c["time_share"] for c in shared)
    cpu = sorted(c["cpu_share"] for c in shared)
    return (f"closing sample, {len(shared)} runs with periodic samples ({alone} more are one closing sample "
            f"alone): share of CPU {cpu[0]:.3f} to {cpu[-1]:.3f} (median {statistics.median(cpu):.3f}); "
            f"share of CPU less share of time {excess[0]:+.3f} to {excess[-1]:+.3f} "
            f"(median {statistics.median(excess):+.3f})")


def bench_accuracy(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    record_dir = folder / "kernel"
    record_dir.mkdir()
    image = _photo(folder / f"photo-{args.width}x{args.height}.jpg", args.width, args.height)
    files = [_order_file(folder, "all-tasks", image, ALL_TASKS),
             _order_file(folder, "forking", REPO_ROOT / "orders" / "images" / "scene-1024x768.jpg", FORKING)]
    (folder / "state").mkdir()
    env = _environment(folder, args.task_start, args.monitors)
    began = time.monotonic()
    # --copies N runs N copies of both orders at once: the accounting must hold on a busy
    # machine, as must --busy-cores K, K processes spinning beside the pipeline.
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_cores)]
    try:
        result = subprocess.run([sys.executable, __file__, "_accounted", str(record_dir), "run",
                                 "--repeat", str(args.copies), "--max-concurrent", str(2 * args.copies),
                                 *map(str, files)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        _stop_shared(env)
    if result.returncode != 0:
        raise SystemExit(f"orchestrator failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}")
    truth, monitors = _truth(record_dir)
    rows, records = _compare(truth, _stored(env["DATABASE_URL"]))
    header = ["task", "wall s", "samples", "CPU-s stored", "CPU-s true", "KiB read stored", "true",
              "KiB written stored", "true", "peak MiB stored", "true", "CPU-wait s stored",
              "closing share of CPU", "of time", "within bounds"]
    print(markdown_table(header, rows))
    print("\n" + _closing_summary(records))
    producer_rows = []
    for m in monitors:
        if m["kind"] == "producer":
            wall = (m["ended_ms"] - m["started_ms"]) / 1000
            producer_rows.append([m["order_id"], f"{wall:.1f}", f"{m['cpu_seconds']:.2f}",
                                  f"{100 * m['cpu_seconds'] / wall:.2f}"])
    print("\nmonitor-producer processes (start-up included):")
    print(markdown_table(["order", "alive s", "CPU-s", "% of a core"], producer_rows))
    return {"runs": records, "monitors": monitors, "seconds": time.monotonic() - began,
            "all_within_bounds": all(all(r["within_bounds"].values()) for r in records)}


def _run_light(folder: Path, env: dict, order: Path, monitors: bool) -> dict:
    extra = [] if monitors else ["--no-monitors"]
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(order), *extra],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"light order failed:\n{result.stderr[-3000:]}")
    engine = connect(env["DATABASE_URL"])
    with engine.connect() as conn:
        order_row = conn.execute(select(orders).order_by(orders.c.id.desc()).limit(1)).mappings().one()
        runs = conn.execute(select(task_runs).where(task_runs.c.order_id == order_row["id"])).mappings().all()
    engine.dispose()
    span = (max(r["finished_at"] for r in runs) - min(r["started_at"] for r in runs)).total_seconds()
    return {"monitors": monitors, "command_s": wall, "task_span_s": span,
            "order_s": (order_row["finished_at"] - order_row["created_at"]).total_seconds()}


def _sampler_cost(samples: int = 200) -> dict:
    """CPU the sampler spends per sample of a running task (a busy child with a worker)."""
    from monitor.sampler import ProcessTreeSampler

    code = ("import subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "end = time.time() + 60\nwhile time.time() < end: pass\n")
    task = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        sampler = ProcessTreeSampler(task.pid)
        before = time.process_time()
        for _ in range(samples):
            sampler.sample()
        per_sample = (time.process_time() - before) / samples
    finally:
        task.kill()
        task.wait()
    processes = sum(1 for name in os.listdir("/proc") if name.isdigit())
    return {"cpu_ms_per_sample": per_sample * 1000, "percent_of_a_core_at_1_hz": per_sample * 100,
            "processes_on_machine": processes}


def bench_overhead(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    env = _environment(folder, args.task_start, args.monitors)
    order = _order_file(folder, "light", REPO_ROOT / "orders" / "images" / "scene-640x480.jpg", LIGHT)
    _run_light(folder, env, order, monitors=True)  # warm-up: broker topics, page cache
    runs = []
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_cores)]
    try:
        for _ in range(args.rounds):
            for monitors in (True, False):
                runs.append(_run_light(folder, env, order, monitors))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        _stop_shared(env)
    rows = []
    summary = {}
    for monitors in (True, False):
        mine = [r for r in runs if r["monitors"] is monitors]
        figures = {name: statistics.median(r[name] for r in mine) for name in ("task_span_s", "order_s", "command_s")}
        summary["on" if monitors else "off"] = figures
        rows.append(["on" if monitors else "off", len(mine), f"{figures['task_span_s']:.2f}",
                     f"{figures['order_s']:.2f}", f"{figures['command_s']:.2f}"])
    ratios = {name: summary["on"][name] / summary["off"][name] for name in summary["on"]}
    rows.append(["ratio on/off", "", f"{ratios['task_span_s']:.2f}x", f"{ratios['order_s']:.2f}x",
                 f"{ratios['command_s']:.2f}x"])
    print(markdown_table(["monitoring", "runs", "tasks, first start to last end (s)", "order, created to finished (s)",
                          "command (s)"], rows))
    cost = _sampler_cost()
    print(f"\nsampler: {cost['cpu_ms_per_sample']:.2f} ms CPU per sample of a two-process task "
          f"= {cost['percent_of_a_core_at_1_hz']:.2f} % of a core at one sample a second "
          f"({cost['processes_on_machine']} processes on the machine)")
    return {"runs": runs, "medians": summary, "ratios": ratios, "sampler": cost}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_accounted":
        return _orchestrate_accounted(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="stored samples against the kernel's accounting")
    accuracy.add_argument("--width", type=int, default=2400)
    accuracy.add_argument("--height", type=int, default=1700)
    accuracy.add_argument("--copies", type=int, default=1, help="copies of the orders run at once")
    accuracy.add_argument("--busy-cores", type=int, default=0, help="spinning processes beside the run")
    overhead = commands.add_parser("overhead", help="a light order with monitoring on and off")
    overhead.add_argument("--rounds", type=int, default=5)
    overhead.add_argument("--busy-cores", type=int, default=0, help="spinning processes beside the runs")
    for sub in (accuracy, overhead):
        sub.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        sub.add_argument("--task-start", choices=("fork-server", "spawn"), default="fork-server",
                         help="how tasks start (TASK_START); default the product's, fork-server")
        sub.add_argument("--monitors", choices=("per-order", "shared"), default="per-order",
                         help="MONITORS: per-order (every monitor accounted too) or shared")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}; load average before: {loadavg()}")
    payload = bench_accuracy(args) if args.command == "accuracy" else bench_overhead(args)
    print(f"load average after: {loadavg()}")
    write_json(args.json, {"machine": machine(), **payload})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
