"""Orders whose orchestrator died, and the heartbeat that tells a live orchestrator apart.

An orchestrator killed outright (SIGKILL, out of memory, a lost node) cannot record how its
orders ended; its local tasks and monitors stop with it (pipeline.lifetime). The next
orchestrator to start marks such orders FAILED (pipeline/db/owners.py says how "dead" is
decided), tells any monitor still serving them to stop, stores what is left on their
``resource<ID>`` (the shared consumer, or a monitor-consumer started for it), and then removes
their topics.
"""

from __future__ import annotations

import logging
import threading
import time

from orchestrator.progress_listener import ProgressListener
from orchestrator.report import Reporter
from orchestrator.runtime import Runtime
from pipeline.db.orders import SHARED_MONITORS, OrderRecord, OrderStore, RunStatus
from pipeline.db.owners import HEARTBEAT_SECONDS
from pipeline.errors import PipelineError
from pipeline.kafka import Producer, TopicAdmin
from pipeline.protocol import MonitorStopped, OrderStopped, order_topics, resource_topic, task_topic

logger = logging.getLogger(__name__)

# How long the shared consumer gets to store an abandoned order's last samples (it has been
# storing them all along; this covers its backlog) before the order's topics are deleted.
SHARED_DRAIN_SECONDS = 60.0
# How long a monitor-consumer started for an abandoned order gets to store what is left.
DRAIN_SECONDS = 120.0


class AbandonedOrders:
    """Marks the abandoned orders at start; :meth:`close` waits for their topics' removal."""

    def __init__(self, store: OrderStore, admin: TopicAdmin, producer: Producer,
                 listener: ProgressListener, reporter: Reporter, runtime: Runtime | None = None) -> None:
        self._store, self._admin, self._producer, self._runtime = store, admin, producer, runtime
        self._listener, self._reporter = listener, reporter
        self._drains: list[threading.Thread] = []

    def settle(self) -> list[OrderRecord]:
        """Mark every abandoned order FAILED, say so, and stop what may still serve it."""
        marked = self._store.mark_abandoned()
        if not marked:
            return marked
        existing = self._admin.existing()
        for record in marked:
            self._reporter.line(f"order {record.id} {record.name}: was {record.status.value}, but its "
                                f"orchestrator is gone; marked FAILED")
            if record.status is not RunStatus.RUNNING:
                # Still PENDING: its orchestrator may have died before it claimed the order's
                # topics, so topics of that name may be another deployment's (order_run.py).
                continue
            topics = [t for t in order_topics(record.id) if t in existing]
            if not topics:
                continue
            if task_topic(record.id) in topics:
                self._stop_monitors(record.id)
            if record.monitors == SHARED_MONITORS:
                self._drain_then_remove(record.id, topics)
            elif resource_topic(record.id) in topics and self._runtime is not None:
                self._store_rest_then_remove(record.id, topics)
            else:
                self._remove(record.id, topics)
        return marked

    def _stop_monitors(self, order_id: int) -> None:
        """STOP on ``task<ID>``: a monitor still serving the order (the shared ones, a pod in a
        cluster) stores what it has, sends TERMINATE and lets the order go."""
        try:
            self._producer.send_now(OrderStopped(order_id).encode())
        except PipelineError as exc:
            logger.warning("order_id=%d could not send STOP: %s", order_id, exc)

    def _drain_then_remove(self, order_id: int, topics: list[str]) -> None:
        terminated = self._listener.watch_terminate(order_id)

        def wait() -> None:
            if not terminated.wait(SHARED_DRAIN_SECONDS):
                logger.warning("order_id=%d the shared consumer did not confirm its samples within "
                               "%gs; removing its topics anyway", order_id, SHARED_DRAIN_SECONDS)
            self._listener.unregister(order_id)
            self._remove(order_id, topics)

        self._follow(order_id, wait)

    def _store_rest_then_remove(self, order_id: int, topics: list[str]) -> None:
        """Its own monitors stopped with its orchestrator, maybe before storing every sample
        (or the database was away): a STOP closes ``resource<ID>`` and a monitor-consumer of
        its own stores what is left from its committed offset on, then the topics go."""
        try:
            self._producer.send_now(MonitorStopped(order_id).encode())
            handle = self._runtime.start_monitor("consumer", order_id)
        except PipelineError as exc:
            logger.warning("order_id=%d its last samples cannot be stored (%s); topics kept", order_id, exc)
            return

        def wait() -> None:
            code = handle.wait(DRAIN_SECONDS)
            handle.stop(grace=5.0)
            if code == 0:
                self._remove(order_id, topics)
            else:
                logger.warning("order_id=%d the monitor-consumer storing its last samples ended with %s; "
                               "topics kept", order_id, "a timeout" if code is None else f"status {code}")

        self._follow(order_id, wait)

    def _follow(self, order_id: int, wait) -> None:
        thread = threading.Thread(target=wait, name=f"drain-{order_id}", daemon=True)
        thread.start()
        self._drains.append(thread)

    def _remove(self, order_id: int, topics: list[str]) -> None:
        try:
            self._admin.delete(topics)
        except PipelineError as exc:
            logger.warning("order_id=%d topics not deleted: %s", order_id, exc)

    def close(self, timeout: float = DRAIN_SECONDS, stop: threading.Event | None = None) -> None:
        """Wait for the abandoned orders' last samples to be stored and their topics removed;
        ``stop`` (a cancel) ends the wait (their topics are kept then, for the next run)."""
        deadline = time.monotonic() + timeout
        for thread in self._drains:
            while thread.is_alive() and time.monotonic() < deadline and not (stop and stop.is_set()):
                thread.join(0.2)


class Heartbeat:
    """Refreshes ``orders.heartbeat_at`` of this orchestrator's unfinished orders."""

    def __init__(self, store: OrderStore) -> None:
        self._store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._store.heartbeat()
            except PipelineError as exc:  # the orders' own writes report the outage
                logger.debug("heartbeat not recorded: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
