"""Command line of ``python -m orchestrator``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from orchestrator.abandoned import DRAIN_SECONDS, AbandonedOrders, Heartbeat
from orchestrator.anomalies import order_anomalies, unscored_reason, wait_for_scoring
from orchestrator.anomaly_feed import AnomalyFeed
from orchestrator.order_run import OrderRun, Services, TaskSlots
from orchestrator.orders import Order, load_orders
from orchestrator.progress_listener import ProgressListener
from orchestrator.report import Reporter, format_summary
from orchestrator.runtime import make_runtime
from pipeline.db import connect, create_schema
from pipeline.db.orders import OrderStore, RunStatus
from pipeline.db.owners import Owner
from pipeline.db.retry import retrying
from pipeline.errors import PipelineError
from ops.infra.manager import ensure_kafka, use_shared_monitors
from pipeline.kafka import Consumer, Producer, TopicAdmin
from pipeline.lifetime import StopSignals
from pipeline.logs import configure_logging
from pipeline.protocol import ANOMALIES_TOPIC, ORCHESTRATOR_TOPIC
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130
# Tasks running at once, per CPU core (--max-running): more only queue for the CPU, and on a
# small machine starve the broker and the monitors, whose answers every order waits for.
TASKS_PER_CORE = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description="Run image-processing orders.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run orders, concurrently, and wait for them")
    run.add_argument("orders", nargs="+", metavar="ORDER.json")
    run.add_argument("--repeat", type=int, default=1, metavar="N",
                     help="run every order N times (builds training history); default 1")
    run.add_argument("--keep-topics", action="store_true",
                     help="keep each order's task<ID>/resource<ID> topics after it ends")
    run.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                     help="orders running at the same time; default: as many as this machine's "
                          "free memory holds (about 150 MB an order with the shared monitors, "
                          "600 MB with monitors per order)")
    run.add_argument("--max-running", type=int, default=None, metavar="N",
                     help="tasks running at the same time across all orders (the others wait for a "
                          f"slot, their timeout not yet running); default {TASKS_PER_CORE} per CPU core, "
                          "so that the tasks leave the broker and the monitors CPU to answer")
    run.add_argument("--no-monitors", action="store_true",
                     help="run the tasks without sampling or storing their usage (to measure "
                          "what monitoring costs); nothing is stored but the orders and task runs")
    status = commands.add_parser("status", help="where orders stand: newest first, with their task runs, "
                                                "samples and anomalies")
    status.add_argument("order_id", type=int, nargs="?", help="only this order")
    status.add_argument("--limit", type=int, default=20, metavar="N", help="the newest N orders; default 20")
    status.add_argument("--json", action="store_true", help="as JSON, for scripts")
    submit = commands.add_parser(
        "submit", help="run orders inside the cluster: one orchestrator Job per order (RUNTIME=kubernetes)")
    submit.add_argument("orders", nargs="+", metavar="ORDER.json")
    submit.add_argument("--wait", action="store_true",
                        help="wait until the orchestrator Jobs finish; exit 1 if one failed")
    submit.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="with --wait: give up waiting after this long; default 3600")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command == "status":
        return show_status(args.order_id, args.limit, args.json)
    # Expected failures (bad settings or order files: status 2) end in one line through
    # pipeline/entry.py, as everywhere.
    settings = Settings.from_env()
    orders = load_orders(args.orders)  # every file checked before anything starts
    if args.command == "submit":
        return submit_orders(settings, orders, args.wait, args.timeout)
    if args.repeat < 1 or any(n is not None and n < 1 for n in (args.max_concurrent, args.max_running)):
        print("error: --repeat, --max-concurrent and --max-running must be at least 1", file=sys.stderr)
        return EXIT_INVALID
    return run_orders(settings, orders * args.repeat, args.keep_topics, args.max_concurrent,
                      monitoring=not args.no_monitors, max_running=args.max_running)


SIGNAL_CHECK_SECONDS = 0.2  # the main thread's longest wait without running Python's signal handlers


def run_orders(settings: Settings, orders, keep_topics: bool = False, max_concurrent: int | None = None,
               monitoring: bool = True, max_running: int | None = None) -> int:
    """Run ``orders`` concurrently; print the summary; the exit status."""
    settings = ensure_kafka(settings)
    shared = monitoring and use_shared_monitors(settings)
    if max_concurrent is None:
        max_concurrent = machine_capacity(shared)
    if max_running is None:
        max_running = TASKS_PER_CORE * len(os.sched_getaffinity(0))
    # Before touching the database or the broker: missing cluster credentials fail at once.
    runtime = make_runtime(settings, settings.state_dir / "logs")
    cancel = threading.Event()
    reporter = Reporter()
    try:
        # From here on every wait of this run ends on the first Ctrl-C or SIGTERM.
        _install_cancel(cancel, reporter)
        engine = connect(settings.database_url)
        retrying(lambda: create_schema(engine), "preparing the schema", settings.db_retry_seconds, cancel)
        store = OrderStore(engine, settings.db_retry_seconds, cancel, Owner.me())
        admin = TopicAdmin(settings, stop=cancel)
        admin.create([ORCHESTRATOR_TOPIC, ANOMALIES_TOPIC])
        listener = ProgressListener(settings)
        listener.start()
        feed = AnomalyFeed(Consumer(settings), reporter).start() if monitoring else None
        # Its own store, which does not wait out an outage: a beat missed is no news (the
        # orders' own writes say that the database is away).
        heartbeat = Heartbeat(OrderStore(engine, owner=store.owner)).start()
        try:
            with Producer(settings, shared=True, stop=cancel) as producer:
                abandoned = AbandonedOrders(store, admin, producer, listener, reporter,
                                            runtime if monitoring else None)
                abandoned.settle()
                services = Services(runtime, store, admin, producer, listener, reporter,
                                    cancel, keep_topics, monitoring, shared,
                                    settings.mlflow_tracking_uri if settings.live_scoring else None, feed,
                                    settings.artifact_dir, TaskSlots(max_running, cancel))
                workers = max(1, min(max_concurrent, len(orders)))
                if len(orders) > 1:
                    reporter.line(f"{len(orders)} orders, up to {workers} at once"
                                  + (f", {max_running} tasks running at a time" if workers > max_running else "")
                                  + (" (shared monitors)" if shared else ""))
                unscored = unscored_reason(settings) if monitoring else None
                if unscored:
                    reporter.once("unscored", f"note: orders are not scored: {unscored}")
                results = _run_all(orders, services, workers)
                abandoned.close(DRAIN_SECONDS, stop=cancel)
            if feed is not None:
                add_anomalies(engine, results, feed, cancel, expected=unscored is None)
        finally:
            heartbeat.close()
            listener.close()
            if feed is not None:
                feed.close()
    except PipelineError as exc:
        if not cancel.is_set():
            raise
        # A wait the cancel ended (the broker or the database not answering at the start).
        reporter.line(f"cancelled before the orders started: {exc}")
        return EXIT_CANCELLED
    finally:
        runtime.close()
    print(format_summary(results))
    if cancel.is_set():
        return EXIT_CANCELLED
    return EXIT_OK if all(r.status is RunStatus.SUCCEEDED for r in results) else EXIT_FAILED


def _run_all(orders, services: Services, workers: int) -> list:
    """Every order's result, ``workers`` at a time. A forced stop (the second Ctrl-C or
    SIGTERM, raised here as KeyboardInterrupt) leaves without waiting for the orders' threads."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="order")
    try:
        futures = [pool.submit(OrderRun(order, services).run) for order in orders]
        # Waited for in short turns, back in the interpreter between them: the kernel gives a
        # process's SIGTERM to any thread that does not block it, and Python runs the handler
        # only when the main thread runs; blocked in one long wait it never would.
        while wait(futures, timeout=SIGNAL_CHECK_SECONDS).not_done:
            pass
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def add_anomalies(engine, results, feed: AnomalyFeed, cancel: threading.Event, expected: bool = False) -> None:
    """Give each order's result the anomalies live scoring raised (read once scoring has
    reached its last samples, or a short while has passed; the feed prints the late ones).
    Where scoring was ``expected``, an order with samples but no deviation row says so."""
    started = [r.order_id for r in results if r.order_id is not None]
    behind = wait_for_scoring(engine, started, stop=cancel, expected=expected)
    for result in results:
        if result.order_id is not None:
            result.anomalies = order_anomalies(engine, result.order_id, feed.received(result.order_id))
            if result.anomalies is not None:
                result.anomalies.caught_up = result.order_id not in behind
            elif expected and result.rows:
                result.warnings.append(
                    "not scored so far: no deviation row is stored for its samples (live scoring is behind, "
                    "or the monitor-consumer has no model: see its log; `python -m monitor rescore "
                    f"{result.order_id}` scores it afterwards)")


# What one concurrent order holds in memory: its task process (and, per order, its two
# monitor processes), measured with bench/concurrent_orders.py.
ORDER_MEMORY_SHARED = 150 * 2**20
ORDER_MEMORY_PER_ORDER = 600 * 2**20
MAX_DEFAULT_CONCURRENCY = 256


def machine_capacity(shared_monitors: bool) -> int:
    """How many orders this machine's free memory holds at once."""
    try:
        with open("/proc/meminfo", "rb") as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith(b"MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 4
    per_order = ORDER_MEMORY_SHARED if shared_monitors else ORDER_MEMORY_PER_ORDER
    return max(1, min(MAX_DEFAULT_CONCURRENCY, available // per_order))


def show_status(order_id: int | None, limit: int, as_json: bool) -> int:
    """Print where the orders stand (``status``); 2 for an unknown order or a bad limit."""
    from orchestrator.status import format_statuses, order_statuses, to_json

    if limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return EXIT_INVALID
    settings = Settings.from_env()
    reports = order_statuses(connect(settings.database_url), order_id, limit, settings.db_retry_seconds)
    print(to_json(reports) if as_json else format_statuses(reports))
    return EXIT_OK


def submit_orders(settings: Settings, orders: list[Order], wait: bool, timeout: float) -> int:
    """Start one in-cluster orchestrator Job per (checked) order; with ``wait``, report their ends."""
    from orchestrator.submit import Submitter

    try:
        submitter = Submitter(settings)
        submitted = []
        for order in orders:
            item = submitter.submit(order)
            submitted.append(item)
            print(f"order {order.name} ({order.source}) submitted: Job {settings.k8s_namespace}/{item.job} "
                  f"runs it as service account orchestrator")
            print(f"  follow it: kubectl -n {settings.k8s_namespace} logs -f job/{item.job}")
        if not wait:
            return EXIT_OK
        print(f"waiting for {len(submitted)} orchestrator Job(s) (at most {timeout:g}s)")
        outcomes = submitter.wait(submitted, timeout)
    except KeyboardInterrupt:
        # The Jobs run on in the cluster; only the waiting stops.
        return EXIT_CANCELLED
    for job, outcome in outcomes.items():
        print(f"Job {job}: {outcome}")
    return EXIT_OK if all(o == "succeeded" for o in outcomes.values()) else EXIT_FAILED


def _install_cancel(cancel: threading.Event, reporter: Reporter) -> None:
    """First Ctrl-C/SIGTERM: stop running tasks, complete the monitors' handshake, mark the
    orders CANCELLED. Second: leave at once (children are stopped on the way out)."""
    StopSignals(cancel, lambda name: reporter.line(
        f"{name}: cancelling; stopping tasks and monitors (press Ctrl-C again to force)")).install()
