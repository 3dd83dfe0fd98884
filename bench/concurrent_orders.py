"""Benchmark: N concurrent orders of three light tasks, with the shared monitoring services.

For each N (default 1, 10, 50, 200), in a fresh state folder of its own (SQLite, the embedded
default; no model registered), on the broker of ``KAFKA_BOOTSTRAP_SERVERS`` (or infra.env):

    python -m orchestrator run ORDER.json --repeat N --max-concurrent N

and, measured from outside the pipeline:

- orders succeeded (the ``orders`` table) and light task runs per second (3N / wall time);
- samples stored against samples sent: the shared sampler logs what it sent per order
  (``TERMINATE received; K samples sent``), the database holds what was stored; every task
  run must have samples of all five resources;
- peak memory of the whole run: the machine's memory in use (MemTotal - MemAvailable, read
  every 0.2 s) above what was in use just before, and the monitoring services' own resident
  size (sampler + consumer);
- CPU of monitoring per monitored task: the sampler's and the consumer's CPU time over the
  run (from /proc), divided by the task-seconds they monitored (the sum of the task runs'
  durations), as percent of one core per running task.

    ./dev python bench/concurrent_orders.py [--sizes 1,10,50,200] [--monitors shared|per-order]
                                            [--heavy] [--replicas 2 --kill-one] [--json results.json]

``--heavy`` runs an order whose first task is CPU-heavy instead (denoise, then blur and
contrast, on a 733x517 image): 200 of them at once on two cores keep the broker short of CPU,
which must cost no order (the tasks queue for ``--max-running`` slots, a slow broker is waited
for).

``--replicas 2 --kill-one`` runs two consumer replicas and SIGKILLs one of them once samples
are being stored: rows must still equal the samples sent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine, markdown_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Held out from the examples and the tests: other image, other tasks.
ORDER = {
    "id": "bench-light",
    "image": str(REPO / "orders/images/flower.jpg"),
    "tasks": [{"name": "resize", "params": {"scale": 0.75}}, "grayscale", {"name": "rotate", "params": {"degrees": 90}}],
}
# The CPU-heavy order of --heavy: 200 copies at once once lost 127 orders to a starved broker.
HEAVY_ORDER = {"id": "bench-heavy", "tasks": ["denoise", "blur", "contrast"]}
HEAVY_SIZE = (733, 517)
RESOURCES = 6  # pipeline.protocol.RESOURCES: the task's five and the node's CPU pressure
SENT = re.compile(r"order_id=(\d+) STOP sent on the resource topic after (\d+) samples")


def memory_in_use() -> int:
    values = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, value = line.split(":", 1)
            values[name] = int(value.split()[0]) * 1024
    return values["MemTotal"] - values["MemAvailable"]


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Watcher(threading.Thread):
    """Peak memory in use, and the monitoring services' peak resident size."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.base = memory_in_use()
        self.peak = self.base
        self.monitor_rss_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, memory_in_use())
            self.monitor_rss_peak = max(self.monitor_rss_peak, sum(rss_bytes(p) for p in self.pids))


def monitor_pids(state: Path) -> dict[int, str]:
    """pid -> service name (sampler, consumer-1, ...)."""
    pids = {}
    for path in (state / "monitors").glob("*.pid"):
        try:
            pids[int(path.read_text())] = path.stem
        except ValueError:
            pass
    return pids


def _stored(state: Path) -> int:
    try:
        db = sqlite3.connect(state / "pipeline.db", timeout=1)
        try:
            return db.execute("select count(*) from measurements").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def heavy_order(folder: Path) -> dict:
    """The --heavy order, over the 1024x768 sample scaled to HEAVY_SIZE in ``folder``."""
    from PIL import Image

    image = folder / f"scene-{HEAVY_SIZE[0]}x{HEAVY_SIZE[1]}.jpg"
    with Image.open(REPO / "orders/images/scene-1024x768.jpg") as scene:
        scene.resize(HEAVY_SIZE).save(image)
    return {**HEAVY_ORDER, "image": str(image)}


def run_size(n: int, args: argparse.Namespace, env_base: dict[str, str]) -> dict:
    state = Path(tempfile.mkdtemp(prefix=f"bench-orders-{n}-", dir="/tmp"))
    env = {**env_base, "PIPELINE_STATE_DIR": str(state), "MONITORS": args.monitors,
           "DATABASE_URL": f"sqlite:///{state / 'pipeline.db'}", "LOG_LEVEL": "INFO"}
    order_file = state / "order.json"
    order_file.write_text(json.dumps(heavy_order(state) if args.heavy else ORDER))
    if args.monitors == "shared":  # started before the clock runs, as `infra up` does
        subprocess.run([sys.executable, "-c", "from pipeline.settings import Settings;"
                        "from ops.infra.shared_monitors import SharedMonitors;"
                        f"print(*SharedMonitors(Settings.from_env()).start({args.replicas}), sep='\\n')"],
                       env=env, cwd=REPO, check=True)
    names = monitor_pids(state)
    pids = list(names)
    cpu_before = {p: cpu_seconds(p) for p in pids}
    watcher = Watcher(pids)
    watcher.start()
    began = time.monotonic()
    orchestrator = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(order_file), "--repeat",
                                     str(n), "--max-concurrent", str(n)], env=env, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    if args.kill_one:  # SIGKILL one consumer replica once samples are being stored
        victim = state / "monitors" / "consumer-1.pid"
        while orchestrator.poll() is None and killed is None:
            if _stored(state) > 0:
                killed = int(victim.read_text())
                os.kill(killed, 9)
                pids.remove(killed)
            time.sleep(0.1)
    stdout, stderr = orchestrator.communicate()
    result = subprocess.CompletedProcess(orchestrator.args, orchestrator.returncode, stdout, stderr)
    wall = time.monotonic() - began
    time.sleep(1.0)  # the services' last log lines
    watcher.done.set()
    watcher.join()
    monitor_cpu = sum(cpu_seconds(p) - cpu_before[p] for p in pids)  # (a killed replica's not counted)
    sampler_cpu = sum(cpu_seconds(p) - cpu_before[p] for p in pids if names[p] == "sampler")
    db = sqlite3.connect(state / "pipeline.db")
    statuses = dict(db.execute("select status, count(*) from orders group by status").fetchall())
    runs = db.execute("select count(*), sum((julianday(finished_at) - julianday(started_at)) * 86400) "
                      "from task_runs where status = 'SUCCEEDED'").fetchone()
    stored = dict(db.execute("select order_id, count(*) from measurements group by order_id").fetchall())
    unsampled = db.execute(
        "select count(*) from task_runs r where (select count(distinct resource_id) from measurements m "
        "where m.order_id = r.order_id and m.position = r.position and m.attempt = r.attempt) < ?",
        (RESOURCES,)).fetchone()[0]
    db.close()
    sent: dict[int, int] = {}
    log = state / "logs" / "monitor-sampler.log"
    if log.exists():
        for match in SENT.finditer(log.read_text()):
            sent[int(match.group(1))] = int(match.group(2))
    if args.monitors == "shared":
        subprocess.run([sys.executable, "-c", "from pipeline.settings import Settings;"
                        "from ops.infra.shared_monitors import SharedMonitors;"
                        "SharedMonitors(Settings.from_env()).stop()"], env=env, cwd=REPO, check=True)
    else:  # the per-order producers log per order
        for path in (state / "logs").glob("order-*/monitor-producer.log"):
            for match in SENT.finditer(path.read_text()):
                sent[int(match.group(1))] = int(match.group(2))
    task_seconds = runs[1] or 0.0
    row = {
        "n": n, "succeeded": statuses.get("SUCCEEDED", 0), "orders": n, "wall_s": round(wall, 1),
        "task_runs": runs[0], "task_runs_per_s": round(runs[0] / wall, 2),
        "samples_stored": sum(stored.values()), "samples_sent": sum(sent.values()),
        "orders_with_sent_eq_stored": sum(1 for o, k in sent.items() if stored.get(o) == k),
        "task_runs_missing_a_resource": unsampled,
        "peak_memory_mb": round((watcher.peak - watcher.base) / 2**20),
        "monitor_rss_peak_mb": round(watcher.monitor_rss_peak / 2**20),
        "monitor_cpu_s": round(monitor_cpu, 2), "task_seconds": round(task_seconds, 1),
        "monitor_cpu_per_task_pct": round(100 * monitor_cpu / task_seconds, 3) if task_seconds else None,
        "sampler_cpu_s": round(sampler_cpu, 2),
        "sampler_cpu_per_task_pct": round(100 * sampler_cpu / task_seconds, 3) if task_seconds else None,
        "replicas": args.replicas, "killed_replica_pid": killed,
        "exit_status": result.returncode, "stderr_tail": result.stderr[-600:] if result.returncode else "",
    }
    if not args.keep:
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,50,200")
    parser.add_argument("--monitors", choices=("shared", "per-order"), default="shared")
    parser.add_argument("--heavy", action="store_true",
                        help="orders with a CPU-heavy first task (denoise, blur, contrast on 733x517)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--keep", action="store_true", help="keep each run's state folder")
    parser.add_argument("--replicas", type=int, default=1, help="shared consumer replicas")
    parser.add_argument("--kill-one", action="store_true",
                        help="SIGKILL consumer replica 1 once samples are being stored (use --replicas 2)")
    args = parser.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    from pipeline.settings import Settings

    bootstrap = Settings.from_env().kafka_bootstrap_servers
    if not bootstrap:
        raise SystemExit("start the broker first: ./dev python -m pipeline infra up")
    env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    rows = [run_size(int(n), args, env) for n in args.sizes.split(",")]
    print(markdown_table(
        ["N", "succeeded", "wall s", "task runs/s", "samples stored / sent", "runs missing a resource",
         "peak memory in use", "monitors' peak RSS", "monitoring CPU per running task (sampler alone)"],
        [[r["n"], f'{r["succeeded"]}/{r["orders"]}', r["wall_s"], r["task_runs_per_s"],
          f'{r["samples_stored"]} / {r["samples_sent"]}', r["task_runs_missing_a_resource"],
          f'{r["peak_memory_mb"]} MB', f'{r["monitor_rss_peak_mb"]} MB',
          f'{r["monitor_cpu_per_task_pct"]} % ({r["sampler_cpu_per_task_pct"]} %)']
         for r in rows]))
    print(f"order: {'heavy' if args.heavy else 'light'}; monitors: {args.monitors}; machine: {machine()}; load average after: {loadavg()}")
    write_json(args.json, {"machine": machine(), "monitors": args.monitors, "rows": rows})


if __name__ == "__main__":
    main()
