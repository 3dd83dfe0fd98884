"""Command line of ``python -m training``."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

from pipeline.logs import configure_logging
from pipeline.settings import Settings, mask_url

EXIT_OK, EXIT_ERROR = 0, 1
MAX_TORCH_THREADS = 4  # training shares the machine with the pipeline's tasks and monitors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Train the expected-usage model from stored measurements.")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="compare with two baselines over folds, train, log and register in MLflow")
    fit.add_argument("--since", type=_timestamp, metavar="ISO",
                     help="only orders created at or after this time (e.g. 2026-11-01 or 2026-11-01T08:00)")
    fit.add_argument("--until", type=_timestamp, metavar="ISO", help="only orders created before this time")
    fit.add_argument("--epochs", type=_positive, default=200, metavar="N",
                     help="most epochs; early stopping usually ends sooner (default 200)")
    fit.add_argument("--seed", type=int, default=0, metavar="N",
                     help="seed of the split and the training; same data + seed = same model on the CPU")
    fit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where to train (default auto: CUDA when available)")
    fit.add_argument("--experiment", default="expected-usage", metavar="NAME",
                     help="MLflow experiment (default expected-usage)")
    fit.add_argument("--min-orders", type=_positive, default=20, metavar="N",
                     help="refuse to train on fewer orders with measurements (default 20; at least 3)")
    fit.add_argument("--folds", type=_at_least_two, default=3, metavar="N",
                     help="folds of whole orders over which the network, the GBM and the quantile table "
                          "are compared (default 3; at least 2)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    collect = commands.add_parser(
        "collect", help="run orders over generated images of several sizes at several concurrency levels "
                        "(a history that teaches input size and load)")
    collect.add_argument("--sizes", default="640x480,1024x768,1600x1200", metavar="WxH[,WxH...]",
                         help="image sizes to generate (default 640x480,1024x768,1600x1200)")
    collect.add_argument("--modes", default="RGB,L", metavar="MODE[,MODE...]",
                         help="colour (RGB) and grey (L) images of each size (default RGB,L)")
    collect.add_argument("--concurrency", default="1,4,8", metavar="N[,N...]",
                         help="orders run at once, one level after another (default 1,4,8)")
    collect.add_argument("--orders", type=_positive, default=12, metavar="N",
                         help="orders at each concurrency level (default 12)")
    collect.add_argument("--sequences", default=None, metavar="T,T;T,T",
                         help="task sequences, ';'-separated (default: six sequences over the heavy and light tasks)")
    collect.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the generated images")
    collect.add_argument("--out", default=None, metavar="DIR",
                         help="where images and order files go (default $PIPELINE_STATE_DIR/history)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command == "collect":
        return _collect(args)
    # MLflow draws a progress bar per artifact download (the champion, the input example).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Imported here: torch and MLflow take seconds to import, --help should not.
    import torch
    from mlflow.exceptions import MlflowException

    from training.fit import FitOptions, run_fit

    torch.set_num_threads(max(1, min(MAX_TORCH_THREADS, os.cpu_count() or 1)))
    try:
        settings = Settings.from_env()
        options = FitOptions(since=args.since, until=args.until, epochs=args.epochs, seed=args.seed,
                             device=args.device, experiment=args.experiment, min_orders=args.min_orders,
                             folds=args.folds)
        report = run_fit(settings, options, progress=not args.no_progress)
    except MlflowException as exc:  # the rest end in one line through pipeline/entry.py
        print(f"error: MLflow at {mask_url(settings.mlflow_tracking_uri)}: "
              f"{str(exc.message).splitlines()[0]}", file=sys.stderr)
        return EXIT_ERROR
    print(report.table)
    print(report.verdict)
    print(report.champion)
    print(report.alarms)
    print(f"comparison over the folds took {report.evaluation_seconds:.1f}s, training the registered model "
          f"{report.training_seconds:.1f}s; batched inference "
          f"{report.predictions_per_second:,.0f} predictions/s on the CPU; MLflow run {report.run_id} "
          f"in {mask_url(settings.mlflow_tracking_uri)}")
    return EXIT_OK


def _collect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training import collect

    settings = Settings.from_env()
    plan = collect.CollectPlan(
        sizes=collect.parse_sizes(args.sizes), modes=collect.parse_modes(args.modes),
        concurrency=collect.parse_levels(args.concurrency),
        sequences=collect.parse_sequences(args.sequences) if args.sequences else collect.DEFAULT_SEQUENCES,
        orders=args.orders, seed=args.seed)
    folder = Path(args.out) if args.out else settings.state_dir / "history"
    statuses = collect.collect(plan, folder, settings.to_env())
    failed = [level for level, status in statuses.items() if status]
    print(f"collected {plan.orders} order(s) at each of concurrency {', '.join(map(str, plan.concurrency))}"
          + (f"; some orders failed at concurrency {', '.join(map(str, failed))} (left out of training)"
             if failed else "") + "; train with `python -m training fit`")
    return EXIT_OK


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time (e.g. 2026-11-01T08:00)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _positive(text: str) -> int:
    return _whole(text, 1)


def _at_least_two(text: str) -> int:
    return _whole(text, 2)


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least {least}")
    return value
