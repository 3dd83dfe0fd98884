"""What the user is told about an order's anomalies: one line the moment live scoring raises
one, and the list in the order's summary.

The summary reads the ``deviations`` table (what the monitor-consumer stored, whichever
consumer scored and whenever its message arrived) and adds the anomalies received on the
``anomalies`` topic that are not stored yet. An anomaly is an *episode*: every sample from the
one that raised it on is flagged, so only the first flagged sample of each run of flagged
samples of one task run and resource is listed, which is the sample the message was sent for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from models.registry_probe import champion_may_exist
from pipeline.db.deviations import DeviationStore, to_ms
from pipeline.db.schema import deviations, measurements, task_runs
from pipeline.protocol import Deviation
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

# Units of the resources (docs/protocol.md "Resources and units"); cpu_demand is cpu and
# cpu_wait together; the rest are a run's totals (analysis/scoring.py RunCheck).
UNITS = {"cpu": "%", "cpu_wait": "%", "cpu_demand": "%", "node_cpu_pressure": "%", "memory": " MiB",
         "disk_read": " KiB/s", "disk_write": " KiB/s", "cpu_seconds": " CPU-s",
         "operation_seconds": " CPU-s", "peak_memory": " MiB",
         "bytes_read": " KiB", "bytes_written": " KiB"}
RUN_TOTALS = ("cpu_seconds", "operation_seconds", "peak_memory", "bytes_read", "bytes_written")
# How long the summary waits for live scoring to reach an order's last samples: the shared
# consumer scores after it has confirmed the order's samples stored (TERMINATE).
SCORING_CATCH_UP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Flag:
    """One anomaly of an order: the sample at which it was raised."""

    position: int
    task: str
    resource: str
    timestamp_ms: int
    value: float
    lower: float
    upper: float
    score: float
    after_start: float | None = None  # seconds since its task run started (None: unknown)


@dataclass
class OrderAnomalies:
    """An order that live scoring judged, and what it raised (empty: nothing)."""

    versions: list[str]
    flags: list[Flag] = field(default_factory=list)
    caught_up: bool = True  # False: scoring had not reached the order's last samples


def number(value: float) -> str:
    """A usage figure: one decimal, two significant digits below 1 (a band of 0.093-0.12
    CPU-s read as 0.1-0.1)."""
    return f"{value:.2g}" if 0 < abs(value) < 1 else f"{value:.1f}"


def quantity(resource: str, value: float) -> str:
    return number(value) + UNITS.get(resource, "")


def describe(resource: str, value: float, lower: float, upper: float, score: float) -> str:
    """``cpu_demand 412.0% against band 85.0-110.0% (score +18.2)``."""
    unit = UNITS.get(resource, "")
    what = "run total; " if resource in RUN_TOTALS else ""
    return (f"{resource} {number(value)}{unit} against band {number(lower)}-{number(upper)}{unit} "
            f"({what}score {score:+.1f})")


def live_line(anomaly: Deviation, task_count: int) -> str:
    """The progress line for an anomaly as it arrives (after ``order <ID> <name>: ``)."""
    return (f"ANOMALY task {anomaly.index + 1}/{task_count} {anomaly.task} "
            + describe(anomaly.resource, anomaly.value, anomaly.lower, anomaly.upper, anomaly.score))


def unscored_reason(settings: Settings) -> str | None:
    """Why no order started now is scored live, when that is certain (said once per run):
    scoring is off, or the registry surely holds no champion (a SQLite store answers that with
    one query; another store is asked by the monitor-consumer itself)."""
    if not settings.live_scoring:
        return "live scoring is off (LIVE_SCORING=off)"
    if not champion_may_exist(settings.mlflow_tracking_uri):
        return "no expected-usage model is registered yet (train one with `python -m training fit`)"
    return None


def summary_lines(found: OrderAnomalies | None, order_id: int | None = None) -> list[str]:
    """The summary's anomaly lines; nothing for an order that was not scored."""
    if found is None:
        return []
    versions = ", ".join(found.versions)
    lines = [] if found.flags else [f"  no anomalies{'' if found.caught_up else ' so far'} "
                                    f"(scored by model version {versions})"]
    for flag in found.flags:
        when = (f"{flag.after_start:.1f}s after the task started" if flag.after_start is not None
                else "at " + datetime.fromtimestamp(flag.timestamp_ms / 1000).strftime("%H:%M:%S"))
        lines.append(f"  ANOMALY task {flag.position + 1} {flag.task}: "
                     f"{describe(flag.resource, flag.value, flag.lower, flag.upper, flag.score)}, {when}")
    if not found.caught_up:
        lines.append("  (live scoring had not reached the order's last samples yet; "
                     f"`python -m orchestrator status {order_id}` counts them later)")
    return lines


def first_of_episodes(rows: Iterable[Deviation]) -> list[Deviation]:
    """The flagged rows whose previous row of the same task run and resource was not flagged."""
    previous: dict[tuple[int, str], bool] = {}
    firsts = []
    for row in sorted(rows, key=lambda r: r.timestamp_ms):
        series = (row.index, row.resource)
        if row.anomaly and not previous.get(series, False):
            firsts.append(row)
        previous[series] = row.anomaly
    return firsts


def order_anomalies(engine: Engine, order_id: int, received: Sequence[Deviation] = ()) -> OrderAnomalies | None:
    """The order's anomalies, from ``deviations`` and the messages ``received``; None when
    nothing scored it. A database that cannot be read leaves the messages alone."""
    flags: dict[tuple[int, str, int], Flag] = {}
    versions: set[str] = set()
    starts: dict[int, list[int]] = {}
    try:
        store = DeviationStore(engine)
        for version in store.versions(order_id):
            versions.add(version)
            for row in first_of_episodes(store.read(order_id, version)):
                flags.setdefault((row.index, row.resource, row.timestamp_ms), Flag(
                    row.index, row.task, row.resource, row.timestamp_ms, row.value, row.lower, row.upper,
                    row.score))
        starts = _run_starts(engine, order_id)
    except SQLAlchemyError as exc:
        logger.warning("order_id=%d anomalies not read from the database (%s); listing those received",
                       order_id, str(exc).splitlines()[0])
    for a in received:
        versions.add(a.model_version)
        flags.setdefault((a.index, a.resource, a.timestamp_ms), Flag(
            a.index, a.task, a.resource, a.timestamp_ms, a.value, a.lower, a.upper, a.score))
    if not versions:
        return None
    ordered = sorted(flags.values(), key=lambda f: (f.timestamp_ms, f.position, f.resource))
    return OrderAnomalies(sorted(versions, key=_version_key),
                          [replace(f, after_start=_after_start(starts.get(f.position, []), f.timestamp_ms))
                           for f in ordered])


def wait_for_scoring(engine: Engine, order_ids: Sequence[int], timeout: float = SCORING_CATCH_UP_TIMEOUT,
                     stop: threading.Event | None = None, expected: bool = False) -> set[int]:
    """Wait (at most ``timeout`` in all) until live scoring has reached the last stored
    sample of each scored order; the orders it has not reached. Unscored orders are not
    waited for, unless scoring is ``expected``: then an order with samples and no deviation
    row yet is waited for too."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout
    pending = set(order_ids)
    while pending:
        try:
            pending = {order_id for order_id in pending if not _scoring_caught_up(engine, order_id, expected)}
        except SQLAlchemyError as exc:
            logger.warning("cannot tell whether live scoring caught up: %s", str(exc).splitlines()[0])
            return set()
        if not pending or stop.wait(min(0.25, max(deadline - time.monotonic(), 0))) \
                or time.monotonic() >= deadline:
            break
    if pending:
        logger.info("live scoring has not reached the last samples of orders %s after %gs",
                    ", ".join(map(str, sorted(pending))), timeout)
    return pending


def _scoring_caught_up(engine: Engine, order_id: int, expected: bool = False) -> bool:
    with engine.connect() as conn:
        scored = conn.execute(select(func.max(deviations.c.ts)).where(deviations.c.order_id == order_id)).scalar()
        if scored is None and not expected:
            return True  # not scored at all: nothing to wait for
        stored = conn.execute(select(func.max(measurements.c.ts))
                              .where(measurements.c.order_id == order_id)).scalar()
    return stored is None or (scored is not None and to_ms(scored) >= to_ms(stored))


def _run_starts(engine: Engine, order_id: int) -> dict[int, list[int]]:
    """Start times (ms) of every attempt per position."""
    with engine.connect() as conn:
        rows = conn.execute(select(task_runs.c.position, task_runs.c.started_at)
                            .where(task_runs.c.order_id == order_id)).all()
    starts: dict[int, list[int]] = {}
    for position, started in rows:
        starts.setdefault(position, []).append(to_ms(started))
    return {position: sorted(times) for position, times in starts.items()}


def _after_start(starts: list[int], timestamp_ms: int) -> float | None:
    """Seconds since the attempt that was running at ``timestamp_ms`` started."""
    began = [s for s in starts if s <= timestamp_ms]
    return (timestamp_ms - began[-1]) / 1000 if began else None


def _version_key(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
