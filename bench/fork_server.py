"""Benchmark: the fork server's own latencies, which tests/unit/test_fork_server.py asserts only
as behaviour: how long a start takes (request -> the forked task's first instruction, both on
CLOCK_BOOTTIME), how long ``stop()`` takes to end a task's process group (a task with a child,
both ending on SIGTERM), and how long the local runtime takes to spawn instead while a failed
server's retry interval runs (no new server tried).

No servers: the fork server and small task modules in a temporary folder, as the unit tests
use them. ``--runs`` of each (default 20); p50/p90/max in milliseconds.

    ./dev python bench/fork_server.py [--runs 20] [--json PATH]

Run it alone: other work on the machine skews the timings (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, loadavg, machine, markdown_table, median, write_json  # noqa: E402

from devkit.waiting import wait_for  # noqa: E402
from orchestrator.runtime.base import TaskLaunch  # noqa: E402
from orchestrator.runtime import fork_client  # noqa: E402
from orchestrator.runtime.fork_client import ForkServerClient  # noqa: E402
from orchestrator.runtime.local import LocalRuntime  # noqa: E402
from ops.infra.state import pid_alive  # noqa: E402
from pipeline.lifetime import PARENT_PID_VARIABLE  # noqa: E402
from pipeline.proctime import boottime_ns  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

MODULES = {
    # Writes CLOCK_BOOTTIME at its first instruction to argv[1], then exits.
    "bench_started": textwrap.dedent("""
        import time
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        import os, sys
        with open(sys.argv[1] + ".tmp", "w") as out:
            out.write(str(now))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    """),
    # A task with a child in its process group; says so in argv[1], then waits to be stopped.
    "bench_family": textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(sys.argv[1] + ".tmp", "w") as out:
            out.write(str(child.pid))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(600)
    """),
}


def percentiles(values_ms: list[float]) -> tuple[str, str, str]:
    ordered = sorted(values_ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{median(ordered):.1f}", f"{p90:.1f}", f"{ordered[-1]:.1f}"



def measure_fork(folder: Path, runs: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(folder)]), PYTHONUNBUFFERED="1")
    env[PARENT_PID_VARIABLE] = str(os.getpid())
    client = ForkServerClient(env, REPO_ROOT, folder / "logs")
    start_ms, stop_ms = [], []
    try:
        client.start("warm-up", "bench_started", [str(folder / "warm")], env, folder, folder / "t.log").wait(60)
        for i in range(runs):
            marker = folder / f"started-{i}"
            before = boottime_ns()
            handle = client.start("b", "bench_started", [str(marker)], env, folder, folder / "t.log")
            wait_for(marker.exists, "the task's start", every=0.001)
            start_ms.append((int(marker.read_text()) - before) / 1e6)
            handle.wait(60)

            family = folder / f"family-{i}"
            handle = client.start("f", "bench_family", [str(family)], env, folder, folder / "t.log")
            wait_for(family.exists, "the task's child", every=0.001)
            child = int(family.read_text())
            began = time.perf_counter()
            handle.stop(grace=60.0)
            wait_for(lambda: not pid_alive(child), "the child's end", every=0.001)
            stop_ms.append((time.perf_counter() - began) * 1000)
    finally:
        client.close()
    return {"start (request -> the task's first instruction)": start_ms,
            "stop() of a task and its child": stop_ms}


def measure_spawn_fallback(folder: Path, runs: int) -> dict[str, list[float]]:
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(folder / "state"),
                                  "PIPELINE_CACHE_DIR": str(folder / "cache"), "TASK_START": "fork-server"})
    runtime = LocalRuntime(settings, folder / "rt-logs")
    runtime.env["DATABASE_URL"] = "mysql://refused"  # the task exits at once with status 2
    runtime.fork_server = ForkServerClient(runtime.env, REPO_ROOT, runtime.log_dir,
                                           socket_path=folder / "no-such-folder" / "server.sock")
    launch = TaskLaunch(7, ("grayscale",), "grayscale", (), REPO_ROOT / "orders" / "images" / "pattern-320x320.png")
    spawn_ms = []
    fork_client.RETRY_SECONDS = 3600.0  # every run within the failed server's retry interval
    logging.getLogger("orchestrator.runtime.local").setLevel(logging.ERROR)  # its warning per start
    try:
        runtime.start_task(launch).wait(60)  # the failed server: the retry interval starts
        for _ in range(runs):
            began = time.perf_counter()
            handle = runtime.start_task(launch)
            spawn_ms.append((time.perf_counter() - began) * 1000)
            handle.wait(60)
            handle.stop()
    finally:
        runtime.close()
    return {"start_task() spawning within the retry interval": spawn_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="measurements of each")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fork-") as tmp:
        folder = Path(tmp)
        for name, code in MODULES.items():
            (folder / f"{name}.py").write_text(code)
        results = {**measure_fork(folder, args.runs), **measure_spawn_fallback(folder, args.runs)}
    print()
    print(markdown_table(["what", "p50 ms", "p90 ms", "max ms"],
                         [[name, *percentiles(values)] for name, values in results.items()]))
    print(f"\nload average (1 min) at the end: {loadavg()}")
    write_json(args.json, {"machine": info, "runs": args.runs, "milliseconds": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
