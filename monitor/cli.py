"""Command line of ``python -m monitor``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.lifetime import StopSignals, exit_now, stop_with_parent
from pipeline.logs import configure_logging
from pipeline.settings import Settings

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monitor", description="Monitoring services: per order, "
                                     "or shared by every order (--all).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("producer", "sample the order's running task every second"),
                       ("consumer", "store and score the order's samples"),
                       ("rescore", "recompute an order's deviations with any model version"),
                       ("plot", "one deviation plot per task of an order")):
        command = commands.add_parser(name, help=text)
        if name in ("producer", "consumer"):
            which = command.add_mutually_exclusive_group(required=True)
            which.add_argument("order_id", type=int, nargs="?", help="the numeric orderID")
            which.add_argument("--all", action="store_true",
                               help="the shared service: every order's topics, until stopped "
                                    "(producer: the tasks running on this machine; consumer: a "
                                    "member of the group monitor-consumers-<deployment id>, add replicas to scale)")
        else:
            command.add_argument("order_id", type=int, help="the numeric orderID")
        if name == "producer":
            command.add_argument("--mode", choices=("order", "sidecar", "stop-only"), default="order",
                                 help="order: sample every task of the order (local runtime); "
                                      "sidecar: sample only the task of this pod (Kubernetes); "
                                      "stop-only: only the STOP/TERMINATE handshake")
        if name in ("rescore", "plot"):
            command.add_argument("--model", metavar="VERSION", default=None,
                                 help="expected-usage version (rescore: default the champion; "
                                      "plot: default the newest that scored the order)")
        if name == "plot":
            command.add_argument("--out", type=Path, default=Path("plots"), help="folder for the PNGs")
    return parser


# The monitor-producer runs below the tasks' priority: on a busy machine the scheduler gives
# the work being measured the CPU first (a sample is light and its interval is timed exactly
# anyway). The monitor-consumer does not: its CPU is a few percent of a core, but at nice 10
# beside eight busy orders on two cores it got less than that, fell behind, and told the user
# of anomalies 10-25 s late (bench/detection.py, what the console showed).
MONITOR_NICENESS = {"producer": 10, "consumer": 0}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if MONITOR_NICENESS.get(args.command):
        _lower_priority(MONITOR_NICENESS[args.command])
    signals = StopSignals().install()
    stop_with_parent()
    # An expected failure ends in one line through pipeline/entry.py (the __main__).
    settings = Settings.from_env()
    if getattr(args, "all", False):
        _serve(args.command, settings, signals)
        exit_now(0)
    elif args.command == "producer":
        from monitor.producer import Mode, MonitorProducer

        MonitorProducer(settings, args.order_id, signals, mode=Mode(args.mode)).run()
        exit_now(0)  # all sent and flushed: skip the interpreter's teardown
    elif args.command == "consumer":
        from monitor.consumer import MonitorConsumer

        MonitorConsumer(settings, signals, args.order_id).run()
        exit_now(0)  # all stored and committed: skip the interpreter's teardown
    elif args.command == "rescore":
        from analysis.rescore import rescore

        result = rescore(settings, args.order_id, args.model)
        print(f"order {result.order_id}: {result.scored} samples scored with expected-usage "
              f"version {result.model_version}; {sum(result.anomalies.values())} anomalous")
        for (task, position, resource), count in sorted(result.anomalies.items(), key=lambda i: i[0][1]):
            print(f"  task {position + 1} {task}: {resource} anomalous for {count} samples")
    else:
        from analysis.plots import log_to_mlflow, plot_order

        result = plot_order(settings, args.order_id, args.out, args.model)
        print("\n".join(str(path) for path in result.files))
        print(result.summary)
        run_id = log_to_mlflow(settings, args.order_id, result, args.out)
        if run_id:
            print(f"logged to MLflow run {run_id} (experiment deviation-plots)")
    return 0


RESTART_DELAY = 5.0


def _serve(command: str, settings: Settings, signals: StopSignals) -> None:
    """A shared service until stopped: one that fails (the broker or database away for
    longer than its clients wait) starts over, resuming from the committed offsets."""
    from monitor.consumer import MonitorConsumer
    from monitor.shared_sampler import SharedSampler

    # A long-lived service allocates many short-lived objects per message and few that
    # live: collect the young generation less often, and leave what start-up loaded alone.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    while not signals.requested.is_set():
        try:
            if command == "producer":
                SharedSampler(settings, signals).run()
            else:
                MonitorConsumer(settings, signals).run()
        except PipelineError as exc:
            logger.error("shared monitor-%s failed: %s; starting over in %gs", command, exc, RESTART_DELAY)
            signals.requested.wait(RESTART_DELAY)


def _lower_priority(niceness: int) -> None:
    # A monitor runs in a session of its own, and with the kernel's autogroup scheduling a
    # session competes as one unit whatever its processes' nice values: lower both.
    try:
        os.nice(niceness)
    except OSError:  # nothing lost but the courtesy
        pass
    try:
        with open("/proc/self/autogroup", "w") as handle:
            handle.write(str(niceness))
    except OSError:  # no autogroup scheduling here
        pass
