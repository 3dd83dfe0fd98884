"""Benchmark: how long after a SIGTERM `orchestrator run` has ended, in each phase it waits in.

SIGTERM is what Kubernetes, systemd and `timeout` send; the goal is an exit within 10 s in
every phase (the first signal cancels: exit 130). Phases, each run REPEAT times:

- ``task``: a task running (a ``stall`` fault: it sleeps until stopped);
- ``slot``: an order's task waiting for a running slot (``--max-running 1``, two stalled orders);
- ``shared-consumer``: the tasks over, the shared consumer not confirming (it is SIGSTOPped);
- ``broker``: the broker not answering at the start (a broker of the benchmark's own, SIGSTOPped).

Each phase runs in a fresh state folder (SQLite, the embedded default) on the broker of
``KAFKA_BOOTSTRAP_SERVERS`` (or infra.env); the time is from the signal to the process's exit.

    ./dev python bench/stop_latency.py [--repeat 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, loadavg, machine, markdown_table, median, write_json  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from devkit.orders import start_orchestrator, write_order  # noqa: E402
from devkit.servers import free_port_pair  # noqa: E402
from devkit.waiting import Output  # noqa: E402
from ops.infra.kafka_broker import KafkaBroker  # noqa: E402
from ops.infra.shared_monitors import SharedMonitors  # noqa: E402
from pipeline.settings import Monitors, Settings  # noqa: E402

STALL = [{"name": "grayscale", "fault": "stall", "fault_at": 0}]
RETRY = {"max_attempts": 1, "task_timeout_seconds": 600}


def _settings(folder: Path, bootstrap: str, monitors: Monitors = Monitors.SHARED) -> Settings:
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(folder / "state"), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                                  "DATABASE_URL": f"sqlite:///{folder / 'pipeline.db'}",
                                  "ARTIFACT_DIR": str(folder / "artifacts")})
    return dataclasses.replace(settings, monitors=monitors)


def _stop(run: Output) -> tuple[float, int]:
    """SIGTERM now; the seconds until the process has exited, and its status."""
    signalled = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    code = run.process.wait(120)
    return time.monotonic() - signalled, code


def task(folder: Path, bootstrap: str) -> tuple[float, int]:
    run = Output(start_orchestrator(_settings(folder, bootstrap), str(write_order(folder, "t", STALL, retry=RETRY))))
    run.wait_for_line("task 1/1 grayscale started")
    return _stop(run)


def slot(folder: Path, bootstrap: str) -> tuple[float, int]:
    orders = [str(write_order(folder, f"s{i}", STALL, retry=RETRY)) for i in range(2)]
    run = Output(start_orchestrator(_settings(folder, bootstrap), *orders, "--max-running", "1"))
    run.wait_for_line("task 1/1 grayscale started")
    run.wait_for_line("running 1 task(s)", count=2)
    return _stop(run)


def shared_consumer(folder: Path, bootstrap: str) -> tuple[float, int]:
    settings = _settings(folder, bootstrap)
    services = SharedMonitors(settings)
    services.start()
    [consumer] = [s.pid for s in services.status() if s.name.startswith("consumer-")]
    os.kill(consumer, signal.SIGSTOP)
    try:
        run = Output(start_orchestrator(settings, str(write_order(folder, "c", ["grayscale"]))))
        run.wait_for_line("task 1/1 grayscale done")
        time.sleep(1.0)  # well into the wait for TERMINATE (a benchmark: the time is the figure)
        return _stop(run)
    finally:
        os.kill(consumer, signal.SIGCONT)
        services.stop()


def broker(folder: Path, _bootstrap: str) -> tuple[float, int]:
    own = KafkaBroker(Settings.from_env({"PIPELINE_STATE_DIR": str(folder / "broker")}), port=free_port_pair())
    own.start()
    pid = own.status().pid
    os.kill(pid, signal.SIGSTOP)
    try:
        settings = _settings(folder, own.bootstrap, Monitors.PER_ORDER)
        run = Output(start_orchestrator(settings, str(write_order(folder, "b", ["grayscale"]))))
        run.wait_for_line("is slow to answer")
        return _stop(run)
    finally:
        os.kill(pid, signal.SIGCONT)
        own.stop()


PHASES = {"task": task, "slot": slot, "shared-consumer": shared_consumer, "broker": broker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    bootstrap = Settings.from_env().kafka_bootstrap_servers
    if not bootstrap:
        raise SystemExit("start the broker first: ./dev python -m pipeline infra up")
    rows = []
    for name in args.phases.split(","):
        seconds, codes = [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix=f"bench-stop-{name}-") as folder:
                took, code = PHASES[name](Path(folder), bootstrap)
            seconds.append(took)
            codes.append(code)
            print(f"{name}: exited {code} {took:.2f}s after SIGTERM", flush=True)
        rows.append({"phase": name, "seconds": [round(s, 2) for s in seconds], "exit_statuses": codes})
    print(markdown_table(["phase", "SIGTERM to exit, median", "max", "runs", "exit statuses"],
                         [[r["phase"], f'{median(r["seconds"]):.2f} s', f'{max(r["seconds"]):.2f} s',
                           len(r["seconds"]), ", ".join(map(str, sorted(set(r["exit_statuses"]))))]
                          for r in rows]))
    print(f"machine: {machine()}; load average after: {loadavg()}")
    write_json(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
