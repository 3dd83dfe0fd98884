"""Live scoring in the monitor-consumer: every stored batch of samples is scored against the
``champion`` expected-usage model, written to ``deviations`` and, when a resource stays out of
its band, published on the ``anomalies`` topic and logged.

Scoring runs on a thread of its own, fed batches after their samples are stored, so storage
and offset commits never wait for it. It prefers the pauses between arrivals (while the
consumer drains a backlog, storing goes first), but a batch waits at most
``MAX_SCORING_LAG`` seconds for one: on a node busy with many orders samples arrive all the
time, and a scorer waiting for a pause told the user of an anomaly 15-30 s late
(bench/detection.py measures what the console shows). Deviations lost with a killed consumer can be
recomputed with ``python -m monitor rescore``.

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

from sqlalchemy import Engine

import pandas as pd

from models.rows import RAW_COLUMNS, RunState, model_rows
from analysis.order_context import OrderContext
from analysis.scoring import Detector, contexts, model_detector
from pipeline.db.deviations import DeviationStore
from pipeline.kafka import Producer, TopicAdmin
from pipeline.protocol import ANOMALIES_TOPIC, RESOURCES, Deviation, Sample
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

FOLLOW_CHAMPION_SECONDS = 60.0  # the scorer checks this often whether the champion moved
MAX_SCORING_LAG = 1.0  # seconds a stored batch waits for the consumer to pause before it is scored anyway


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
        # Batches to score; a _Finished marker is set once everything before it is scored.
        self._batches: queue.Queue[list[Sample] | _Finished | None] = queue.Queue()
        self._caught_up = threading.Event()
        self._caught_up.set()
        self._worker = threading.Thread(target=self._work, name="live-scoring", daemon=True)

    def start(self) -> "LiveScorer":
        """Load the model (seconds of CPU: the consumer does this before it reports ready, so
        that it never runs beside the tasks it will judge), then score in the background."""
        self._load()
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
        if self.detector is None:
            return
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
        follow_at = time.monotonic() + FOLLOW_CHAMPION_SECONDS
        while True:
            if time.monotonic() >= follow_at:
                follow_at = time.monotonic() + FOLLOW_CHAMPION_SECONDS
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
                batch.set()
                continue
            if self.detector is None:
                continue
            self._caught_up.wait(MAX_SCORING_LAG)
            try:
                self.score(batch)
            except Exception:  # noqa: BLE001 - a scoring fault must never stop ingestion
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    logger.exception("%s scoring a batch failed (%d so far); its samples are "
                                     "stored", self.label, self.errors)

    def _follow_champion(self) -> None:
        """When the ``champion`` alias has moved since the model was loaded, load the new
        one: a long-lived shared consumer outlives many fits. Runs on the scoring thread,
        between batches."""
        if self.detector is None:
            return
        try:
            from mlflow import MlflowClient

            from models.registry import champion_version, load_expected_usage

            uri = self.settings.mlflow_tracking_uri
            version = champion_version(MlflowClient(tracking_uri=uri, registry_uri=uri))
            if version is None or version == self.model_version:
                return
            loaded = load_expected_usage(uri, version)
        except Exception as exc:  # noqa: BLE001 - keep scoring with the model there is
            logger.warning("%s cannot follow the champion (%s); still scoring with version %s",
                           self.label, exc, self.model_version)
            return
        if loaded is not None:
            self._use(*loaded)

    def _load(self) -> None:
        try:
            import torch

            from models.registry import load_expected_usage

            # One thread: a batch is a few hundred rows, and idle OpenMP workers spinning after
            # each call would take the cores that storing needs.
            torch.set_num_threads(1)
            loaded = load_expected_usage(self.settings.mlflow_tracking_uri)
            if loaded is not None:
                TopicAdmin(self.settings).create([ANOMALIES_TOPIC])
        except Exception as exc:  # noqa: BLE001 - scoring is optional; storing samples is not
            logger.warning("%s cannot load the expected-usage model (%s); samples are "
                           "stored but not scored", self.label, exc)
            return
        if loaded is None:
            logger.warning("%s no 'champion' expected-usage model registered yet; samples are "
                           "stored but not scored (train one with `python -m training fit`)", self.label)
            return
        self._store = DeviationStore(self.engine)
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
            self._pending.setdefault(run, []).append(raw)
        return self._score_rows(self._release())

    def _release(self, order_ids: Sequence[int] = ()) -> list[dict]:
        """The pending samples that can be scored: every tick but a run's newest, which goes
        once it is complete; every tick of ``order_ids``."""
        released = []
        for run, rows in list(self._pending.items()):
            ticks = Counter(r["ts_ms"] for r in rows)
            newest = max(ticks)
            done = run[0] in order_ids or ticks[newest] >= self._widths.get(run, len(RESOURCES))
            latest_complete = max((ts for ts in ticks if done or ts != newest), default=None)
            if latest_complete is not None:
                self._widths[run] = ticks[latest_complete]
            released += [r for r in rows if done or r["ts_ms"] != newest]
            if done:
                del self._pending[run]
            else:
                self._pending[run] = [r for r in rows if r["ts_ms"] == newest]
        return released

    def _score_rows(self, released: list[dict]) -> list[Deviation]:
        if not released:
            return []
        samples = contexts(model_rows(pd.DataFrame(released, columns=RAW_COLUMNS), self._states))
        results = self.detector.process(samples)
        self._store.write(results)
        for result in results:
            if result.raised:
                self._raise(result)
        self.scored += len(results)
        return results

    def _finish_orders(self, order_ids: Sequence[int]) -> None:
        if self.detector is not None:
            self._score_rows(self._release(order_ids))
        for order_id in order_ids:
            self._contexts.pop(order_id, None)
            if self.detector is not None and self.detector.overrun is not None:
                self.detector.overrun.forget(order_id)
        for table in (self._widths, self._states):
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

