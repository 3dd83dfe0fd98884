"""Benchmark: the hop from one task's end to the next task's first work, TASK_START=spawn
against TASK_START=fork-server.

Against the Kafka broker and database of the settings (``$PIPELINE_STATE_DIR/infra.env``),
for each mode: ``--orders`` runs (default 10) of a three-task order (``--order``, default
``orders/example-simple.json``: resize, grayscale, edge_detect), one after another, with
``python -m orchestrator run --keep-topics --repeat K --max-concurrent 1``. From each order's
kept ``task<ID>`` topic (message timestamps are the senders' CreateTime): the **hop**, task i's
HALT -> task i+1's ORDER (the next task's first message, sent before it works), p50/p90/max per
mode; each task's own time, ORDER -> HALT, and its run from the kernel's process start to the
orchestrator's record of its end (``task_runs``); and what HALT's totals say the kernel
accounted for the task (CPU, peak RSS, storage reads). The kept topics are deleted afterwards.

    ./dev python bench/task_hop.py [--orders 10] [--order orders/example-simple.json]
        [--modes spawn,fork-server] [--json PATH]

Run it alone: other benchmarks or tests on the machine skew the timings (``pgrep -af
'bench/|pytest'`` should show nothing). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine, markdown_table, median, write_json  # noqa: E402
from order_flow import load, percentile, read_topic, warm_group_coordinator  # noqa: E402

from sqlalchemy import select as sql_select  # noqa: E402

from devkit.orders import child_env  # noqa: E402
from pipeline.db import connect, create_schema  # noqa: E402
from pipeline.db.schema import orders as orders_table, task_runs  # noqa: E402
from pipeline.kafka import TopicAdmin  # noqa: E402
from pipeline.protocol import ORCHESTRATOR_TOPIC, Key, TaskTotals, order_topics, task_topic  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

MODES = ("spawn", "fork-server")
DEFAULT_ORDER = REPO_ROOT / "orders" / "example-simple.json"


def order_file(source: Path, folder: Path, name: str) -> Path:
    """``source`` under a fresh name (to find its runs), its image made absolute."""
    order = json.loads(source.read_text())
    order.pop("$schema", None)
    order["id"] = name
    order["image"] = str((source.resolve().parent / order["image"]).resolve())
    path = folder / f"{name}.json"
    path.write_text(json.dumps(order))
    return path


def run_mode(settings: Settings, mode: str, source: Path, orders: int) -> dict:
    name = f"bench-hop-{mode}-{uuid.uuid4().hex[:6]}"
    env = child_env(settings)
    env["TASK_START"] = mode
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        path = order_file(source, Path(tmp), name)
        print(f"{mode}: running {orders} x {source.name} as {name}", flush=True)
        began = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path), "--keep-topics",
                              "--repeat", str(orders), "--max-concurrent", "1"],
                             env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        wall = time.monotonic() - began
    engine = connect(settings.database_url)
    with engine.connect() as conn:
        order_ids = [r[0] for r in conn.execute(
            sql_select(orders_table.c.id).where(orders_table.c.name == name).order_by(orders_table.c.id))]
        runs = conn.execute(sql_select(task_runs).where(task_runs.c.order_id.in_(order_ids))).mappings().all()
    if run.returncode != 0:
        delete_topics(settings, order_ids)
        raise RuntimeError(f"{mode}: orchestrator exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    fallbacks = run.stderr.count("fork server unavailable")
    hops, task_ms, run_ms, cpu_ms, rss_mib, read_kib = [], [], [], [], [], []
    for order_id in order_ids:
        started: dict[int, float] = {}
        halted: list[tuple[int, float, TaskTotals | None]] = []
        current = None
        for message in read_topic(settings, task_topic(order_id)):
            if message.key == Key.ORDER.value:
                current = int(message.header("index"))
                started[current] = message.timestamp_ms
            elif message.key == Key.HALT.value and current is not None:
                halted.append((current, message.timestamp_ms, TaskTotals.from_headers(message)))
        for position, halt_ms, totals in halted:
            task_ms.append(halt_ms - started[position])
            if position + 1 in started:
                hops.append(started[position + 1] - halt_ms)
            if totals is not None:
                cpu_ms.append(totals.cpu_ns / 1e6)
                rss_mib.append(totals.peak_rss_kib / 1024)
                if totals.read_bytes is not None:
                    read_kib.append(totals.read_bytes / 1024)
    for row in runs:
        if row["started_at"] is not None and row["finished_at"] is not None:
            run_ms.append(1000 * (row["finished_at"] - row["started_at"]).total_seconds())
    delete_topics(settings, order_ids)
    return {"mode": mode, "name": name, "order_ids": order_ids, "wall_s": wall, "fallbacks": fallbacks,
            "hop_ms": hops, "order_to_halt_ms": task_ms, "task_run_ms": run_ms, "cpu_ms": cpu_ms,
            "peak_rss_mib": rss_mib, "read_kib": read_kib, "load_before": load_before, "load_after": load()}


def delete_topics(settings: Settings, order_ids: list[int]) -> None:
    topics = [topic for order_id in order_ids for topic in order_topics(order_id)]
    if topics:
        TopicAdmin(settings).delete(topics)


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):.0f} / {percentile(values, 90):.0f} / {max(values):.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=10, help="runs of the order per mode")
    parser.add_argument("--order", type=Path, default=DEFAULT_ORDER, help="the order file to run")
    parser.add_argument("--modes", default=",".join(MODES), help="TASK_START values, comma-separated")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")

    settings = Settings.from_env()
    create_schema(connect(settings.database_url))
    TopicAdmin(settings).create([ORCHESTRATOR_TOPIC])
    warm_group_coordinator(settings)
    info = machine()
    info["loadavg_start"] = load()
    print(f"machine: {info}", flush=True)
    results = [run_mode(settings, mode, args.order, args.orders) for mode in modes]
    info["loadavg_end"] = load()

    rows = []
    for r in results:
        per_order = r["wall_s"] / max(len(r["order_ids"]), 1)
        rows.append([f"`{r['mode']}`", f"{len(r['order_ids'])} ({len(r['hop_ms'])} hops)",
                     f"**{stats(r['hop_ms'])}**", stats(r["order_to_halt_ms"]), stats(r["task_run_ms"]),
                     f"{median(r['cpu_ms']):.0f}" if r["cpu_ms"] else "-",
                     f"{median(r['peak_rss_mib']):.0f}" if r["peak_rss_mib"] else "-",
                     f"{median(r['read_kib']):.0f}" if r["read_kib"] else "-",
                     f"{r['wall_s']:.1f} s ({per_order:.2f} s/order)", r["fallbacks"],
                     f"{r['load_before']} -> {r['load_after']}"])
    print()
    print(markdown_table(
        ["TASK_START", "orders", "hop HALT(i) -> ORDER(i+1), ms p50 / p90 / max",
         "task ORDER -> HALT, ms p50 / p90 / max", "task run (process start -> end recorded), ms p50 / p90 / max",
         "task CPU ms (median)", "task peak RSS MiB (median)", "task storage reads KiB (median)",
         "orchestrator wall", "spawn fallbacks", "load"], rows))
    print(f"\nload average (1/5/15 min): {info['loadavg_start']} at start, {info['loadavg_end']} at end")
    write_json(args.json, {"machine": info, "args": {**vars(args), "order": str(args.order)},
                           "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
