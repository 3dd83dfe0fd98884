"""Command line of ``python -m monitor``."""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import PipelineError
from pipeline.logs import configure_logging
from pipeline.settings import Settings
from monitor.signals import StopSignals


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monitor", description="Per-order monitoring services.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("producer", "sample the order's running task every second"),
                       ("consumer", "store the order's samples in the database")):
        command = commands.add_parser(name, help=text)
        command.add_argument("order_id", type=int, help="the numeric orderID")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    signals = StopSignals().install()
    try:
        settings = Settings.from_env()
        if args.command == "producer":
            from monitor.producer import MonitorProducer

            MonitorProducer(settings, args.order_id, signals).run()
        else:
            from monitor.consumer import MonitorConsumer

            MonitorConsumer(settings, args.order_id, signals).run()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
