"""Live scoring in the monitor-consumer: every stored batch of samples is scored against the
``champion`` expected-usage model, written to ``deviations`` and, when a resource stays out of
its band, published on the ``anomalies`` topic and logged.

Scoring runs on a thread of its own, fed batches after their samples are stored, so storage
and offset commits never wait for it. It prefers the pauses between arrivals (while the
consumer drains a backlog, storing goes first), but a batch waits at most
``MAX_SCORING_LAG`` seconds for one: on a node busy with many orders samples arrive all the
time, and a scorer waiting for a pause told the user of an anomaly 15-30 s late
(bench/detection.py measures what the console shows). A batch holding a run's closing sample
waits for nothing: the run's verdict on its totals is due at its end. Deviations lost with a killed consumer can be
recomputed with ``python -m monitor rescore``.

The model is the one the ``champion`` alias points at, looked up again before the first samples
of every order created after the last look-up (and at least every
``FOLLOW_CHAMPION_SECONDS``): an order started once ``python -m training fit`` has returned is
scored with the model that fit registered, the first one included (a shared consumer may start
before any fit). While the registry surely holds no champion (models/registry_probe.py) a
look-up is one SQL query, and neither MLflow nor PyTorch is imported.

Samples become model rows through models.rows.model_rows, the function training uses. A tick's
resources arrive as separate messages and may straddle two batches, so the newest tick of a
running task waits until it is complete (as many resources as the tick before it) or a later
tick arrives, at most about a second; an order's last samples go when its STOP is stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

import pandas as pd

from models.rows import RAW_COLUMNS, RunState, model_rows
from analysis.order_context import OrderContext
from analysis.scoring import Detector, contexts, model_detector
from models.registry_probe import champion_may_exist
from pipeline.db.deviations import DeviationStore, to_ms
from pipeline.db.schema import orders
from pipeline.kafka import Producer, TopicAdmin
from pipeline.protocol import ANOMALIES_TOPIC, RESOURCES, Deviation, Sample
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

FOLLOW_CHAMPION_SECONDS = 60.0  # the scorer checks at least this often whether the champion moved
# An order created up to this long before the last look-up still gets one of its own: its
# created_at is the orchestrator's clock, which may run ahead of this host's.
CLOCK_SKEW_SECONDS = 2.0
MAX_SCORING_LAG = 0.5  # seconds a stored batch waits for the consumer to pause before it is scored anyway


class _Finished(threading.Event):
    """In the queue after the last batch of some orders: their contexts go once it is reached."""

    def __init__(self, order_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.order_ids = order_ids


class LiveScorer:
    """Scores samples, batch by batch, with the champion model: one order's (a per-order
    consumer) or every order's (the shared consumer; the model is loaded once)."""

    def __init__(self, settings: Settings, engine: Engine, producer: Producer, label: str) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.label = label  # for the log: the order, or "shared"
        self.detector: Detector | None = None
        self.model_version: str | None = None
        self.scored = self.anomalies = self.errors = 0
        self._contexts: dict[int, OrderContext] = {}
        self._pending: dict[tuple, list[dict]] = {}  # run -> raw samples not yet scored
        self._widths: dict[tuple, int] = {}  # run -> resources in its last complete tick
        self._states: dict[tuple, RunState] = {}  # run -> what its scored ticks left
        self._closing: dict[tuple, tuple[int, int]] = {}  # run -> its closing tick's time and width
        self._store = DeviationStore(engine)
        self._looked_up_at = 0.0  # when the champion alias was last looked up (time.time())
        self._covered: set[int] = set()  # orders whose first samples were seen (and the alias looked up for)
        self._follow_failure: str | None = None  # the last look-up's failure, said once
        # Batches to score; a _Finished marker is set once everything before it is scored.
        self._batches: queue.Queue[list[Sample] | _Finished | None] = queue.Queue()
        self._caught_up = threading.Event()
        self._caught_up.set()
        self._worker = threading.Thread(target=self._work, name="live-scoring", daemon=True)

    def start(self) -> "LiveScorer":
        """Load the champion if there is one (seconds of CPU: the consumer does this before it
        reports ready, so that it never runs beside the tasks it will judge), then score in the
        background. Without one, :attr:`detector` stays None until an order created after a fit
        (or the periodic look-up) finds it."""
        self._follow_champion()
        self._worker.start()
        return self

    def submit(self, batch: Sequence[Sample]) -> None:
        """Queue a stored batch for scoring; returns at once."""
        if batch:
            self._batches.put(list(batch))

    def consumer_busy(self, busy: bool) -> None:
        """Messages are arriving (True) or the consumer is idle (False)."""
        if busy:
            self._caught_up.clear()
        else:
            self._caught_up.set()

    def finish(self, order_ids: Sequence[int], wait: bool = True, timeout: float = 30.0) -> None:
        """The orders' last samples are stored: forget them once what is queued is scored;
        with ``wait``, return only then (a per-order consumer, which exits next)."""
        done = _Finished(tuple(order_ids))
        if wait:
            self._caught_up.set()
        self._batches.put(done)
        if wait and not done.wait(timeout):
            logger.warning("%s scoring did not catch up within %gs (orders %s)", self.label, timeout,
                           ", ".join(map(str, order_ids)))

    def close(self, timeout: float = 60.0) -> None:
        """Score what is queued, then stop."""
        self._caught_up.set()
        self._batches.put(None)
        self._worker.join(timeout)
        if self._worker.is_alive():
            logger.warning("%s scoring did not finish within %gs", self.label, timeout)

    def summary(self) -> str:
        if self.detector is None:
            return "not scored"
        return f"{self.scored} scored with version {self.model_version}, {self.anomalies} anomalies"

    def _work(self) -> None:
        while True:
            if time.time() >= self._looked_up_at + FOLLOW_CHAMPION_SECONDS:
                self._follow_champion()
            try:
                batch = self._batches.get(timeout=5.0)
            except queue.Empty:
                continue
            if batch is None:
                break
            if isinstance(batch, _Finished):
                try:
                    self._finish_orders(batch.order_ids)
                except Exception:  # noqa: BLE001 - a scoring fault must never stop ingestion
                    self.errors += 1
                    logger.exception("%s scoring the last samples of orders %s failed; they are "
                                     "stored", self.label, batch.order_ids)
                self._covered.difference_update(batch.order_ids)
                batch.set()
                continue
            self._follow_new_orders(batch)
            if self.detector is None:
                continue
            if not any(s.closing for s in batch):  # a run's verdict is due at its end
                self._caught_up.wait(MAX_SCORING_LAG)
            try:
                self.score(batch)
            except Exception:  # noqa: BLE001 - a scoring fault must never stop ingestion
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    logger.exception("%s scoring a batch failed (%d so far); its samples are "
                                     "stored", self.label, self.errors)

    def _follow_new_orders(self, batch: Sequence[Sample]) -> None:
        """Look the champion up again before scoring the first samples of an order created
        after the last look-up: an order started once ``python -m training fit`` has returned
        is scored with the model that fit registered. One look-up covers every such order of
        the batch."""
        new = {s.order_id for s in batch} - self._covered
        if not new:
            return
        self._covered |= new
        try:
            with self.engine.connect() as conn:
                created = conn.execute(select(orders.c.created_at).where(orders.c.id.in_(new))).scalars().all()
        except SQLAlchemyError:
            created = None  # cannot tell: look up anyway
        if created is None or any(to_ms(c) / 1000 > self._looked_up_at - CLOCK_SKEW_SECONDS for c in created):
            self._follow_champion()

    def _follow_champion(self) -> None:
        """Score with the version the ``champion`` alias points at from the next batch on: the
        first champion (the consumer may start before any fit) or a new one (a long-lived
        shared consumer outlives many fits). Runs on the scoring thread, between batches (and
        once in :meth:`start`)."""
        self._looked_up_at = time.time()  # before: the look-up sees what was registered by then
        uri = self.settings.mlflow_tracking_uri
        try:
            if self.detector is None and not champion_may_exist(uri):
                return  # one SQL query at most: no MLflow, no PyTorch
            from mlflow import MlflowClient

            from models.registry import champion_version, load_expected_usage

            version = champion_version(MlflowClient(tracking_uri=uri, registry_uri=uri))
            if version is None or version == self.model_version:
                self._follow_failure = None
                return
            if self.detector is None:
                import torch

                # One thread: a batch is a few hundred rows, and idle OpenMP workers spinning
                # after each call would take the cores that storing needs.
                torch.set_num_threads(1)
            loaded = load_expected_usage(uri, version)
            if loaded is not None and self.detector is None:
                TopicAdmin(self.settings).create([ANOMALIES_TOPIC])
        except Exception as exc:  # noqa: BLE001 - scoring is optional; storing samples is not
            if str(exc) != self._follow_failure:  # said once, not once per order
                self._follow_failure = str(exc)
                if self.detector is None:
                    logger.warning("%s cannot load the expected-usage model (%s); samples are stored "
                                   "but not scored", self.label, exc)
                else:
                    logger.warning("%s cannot follow the champion (%s); still scoring with version %s",
                                   self.label, exc, self.model_version)
            return
        self._follow_failure = None
        if loaded is not None:
            self._use(*loaded)

    def _use(self, model, version: str) -> None:
        """Score with ``model`` (registered as ``version``) from the next batch on."""
        self.model_version = version
        self.detector = model_detector(model, self.settings, version)
        logger.info("%s scoring with expected-usage version %s", self.label, version)

    def score(self, batch: Sequence[Sample]) -> list[Deviation]:
        """Score, store and publish the complete ticks of one batch (already stored as
        measurements) and of earlier ones that were waiting."""
        for s in sorted(batch, key=lambda s: s.timestamp_ms):
            raw = self._context_of(s.order_id).raw(s.task_name, s.resource, s.timestamp_ms, s.value, s.index, s.attempt)
            if raw is None:
                continue
            run = (raw["order_id"], raw["position"], raw["attempt"])
            if run in self._states and raw["ts_ms"] <= self._states[run].last_ms:
                continue  # a redelivered sample of a tick already scored
            if s.closing:
                self._closing[run] = (raw["ts_ms"], s.closing)
                if s.output_bytes is not None:  # from HALT: the orchestrator may not have stored it yet
                    raw["output_bytes"] = float(s.output_bytes)
                if s.operation_ns is not None:
                    raw["operation_seconds"] = s.operation_ns / 1e9
            self._pending.setdefault(run, []).append(raw)
        released, ended = self._release()
        return self._score_rows(released, ended)

    def _release(self, order_ids: Sequence[int] = ()) -> tuple[list[dict], list[tuple]]:
        """The pending samples that can be scored: every tick but a run's newest, which goes
        once it is complete; every tick of ``order_ids``. And the runs that are over: their
        closing sample (all its resources, as its ``closing`` header counts them) is released."""
        released, ended = [], []
        for run, rows in list(self._pending.items()):
            ticks = Counter(r["ts_ms"] for r in rows)
            newest = max(ticks)
            closing_ms, closing_width = self._closing.get(run, (None, 0))
            over = closing_ms is not None and ticks.get(closing_ms, 0) >= closing_width
            if over:
                ended.append(run)
                del self._closing[run]
            done = over or run[0] in order_ids or ticks[newest] >= self._widths.get(run, len(RESOURCES))
            latest_complete = max((ts for ts in ticks if done or ts != newest), default=None)
            if latest_complete is not None:
                self._widths[run] = ticks[latest_complete]
            released += [r for r in rows if done or r["ts_ms"] != newest]
            if done:
                del self._pending[run]
            else:
                self._pending[run] = [r for r in rows if r["ts_ms"] == newest]
        return released, ended

    def _score_rows(self, released: list[dict], ended: Sequence[tuple] = ()) -> list[Deviation]:
        """Score the released samples, then give the runs that ended their verdicts."""
        if not released and not ended:
            return []
        results = []
        if released:
            samples = contexts(model_rows(pd.DataFrame(released, columns=RAW_COLUMNS), self._states))
            results = self.detector.process(samples)
        results += self.detector.end_runs(ended)
        self._store.write(results)
        for result in results:
            if result.raised:
                self._raise(result)
        self.scored += len(results)
        return results

    def _finish_orders(self, order_ids: Sequence[int]) -> None:
        """The orders' last samples are stored: score what waits and judge every run of theirs
        not judged yet (one whose closing sample never came: a task killed)."""
        if self.detector is not None:
            self._score_rows(*self._release(order_ids))
            runs = self.detector.runs
            left = [run for order_id in order_ids for run in (runs.open_runs(order_id) if runs else [])]
            self._score_rows([], left)
        for order_id in order_ids:
            self._contexts.pop(order_id, None)
            if self.detector is not None and self.detector.runs is not None:
                self.detector.runs.forget(order_id)
        for table in (self._widths, self._states, self._closing):
            for run in [run for run in table if run[0] in order_ids]:
                del table[run]

    def _context_of(self, order_id: int) -> OrderContext:
        context = self._contexts.get(order_id)
        if context is None:
            context = self._contexts[order_id] = OrderContext(self.engine, order_id)
        return context

    def _raise(self, anomaly: Deviation) -> None:
        self.anomalies += 1
        logger.warning(
            "ANOMALY order_id=%d task=%s index=%d resource=%s value=%.1f expected=%.1f band=[%.1f, %.1f] "
            "score=%+.1f model_version=%s", anomaly.order_id, anomaly.task, anomaly.index, anomaly.resource,
            anomaly.value, anomaly.expected, anomaly.lower, anomaly.upper, anomaly.score, anomaly.model_version)
        self.producer.send(anomaly.encode())

