"""Follows the shared ``anomalies`` topic while orders run, so that an anomaly raised by live
scoring shows up where the user looks: a progress line the moment it arrives, and the order's
summary at the end (orchestrator/anomalies.py), rather than only in the monitor-consumer's log.

The topic is read from its end at start, like ``orchestrator``: what is on it already belongs
to earlier runs. Only anomalies of orders this process registered are shown; the others are
another orchestrator's. The topic is created up front by the command, but the feed does not
depend on it: if it is not there yet, the reader keeps looking for it (quietly) and reads it
from its beginning once it appears, since everything on a topic that appeared after the start
is new.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from orchestrator.anomalies import live_line
from orchestrator.report import Reporter
from pipeline.errors import KafkaClientError, ProtocolError
from pipeline.kafka import Consumer
from pipeline.protocol import ANOMALIES_TOPIC, Deviation, Message

logger = logging.getLogger(__name__)

ATTACH_RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class _Order:
    name: str
    task_count: int


class AnomalyFeed:
    """A background reader of ``anomalies``; :meth:`register` each order before its tasks start."""

    def __init__(self, consumer: Consumer, reporter: Reporter) -> None:
        self._consumer = consumer
        self._reporter = reporter
        self._orders: dict[int, _Order] = {}
        self._received: dict[int, list[Deviation]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._attached = False
        self._thread = threading.Thread(target=self._run, name="anomaly-feed", daemon=True)
        self.malformed = 0

    def start(self) -> "AnomalyFeed":
        """Position at the topic's current end (nothing sent later is missed), then read."""
        self._attach(from_end=True)
        self._thread.start()
        return self

    def register(self, order_id: int, name: str, task_count: int) -> None:
        """Show this order's anomalies from now on (kept until :meth:`close`: scoring may
        raise one after the order's last task ended)."""
        with self._lock:
            self._orders[order_id] = _Order(name, task_count)
            self._received.setdefault(order_id, [])

    def received(self, order_id: int) -> list[Deviation]:
        """The anomalies of ``order_id`` received so far, in arrival order."""
        with self._lock:
            return list(self._received.get(order_id, ()))

    def handle(self, message: Message) -> Deviation | None:
        """Decode one message; print and keep it when it is one of ours. A message that does
        not decode is counted and skipped."""
        try:
            anomaly = Deviation.decode(message)
        except ProtocolError as exc:
            self.malformed += 1
            log = logger.warning if self.malformed == 1 or self.malformed % 100 == 0 else logger.debug
            log("skipping malformed message on %s at offset %s (%d so far): %s", ANOMALIES_TOPIC,
                message.offset, self.malformed, exc)
            return None
        with self._lock:
            order = self._orders.get(anomaly.order_id)
            if order is None:
                return None  # another orchestrator's order
            self._received[anomaly.order_id].append(anomaly)
        self._reporter.line(f"order {anomaly.order_id} {order.name}: {live_line(anomaly, order.task_count)}")
        return anomaly

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._consumer.close()
        if self.malformed:
            logger.warning("skipped %d malformed message(s) on %s", self.malformed, ANOMALIES_TOPIC)

    def _attach(self, from_end: bool) -> None:
        try:
            self._consumer.add([ANOMALIES_TOPIC], from_end=from_end)
        except KafkaClientError as exc:
            if from_end:  # said once; the retries are quiet
                logger.info("not reading %s yet (%s); it is read once it appears", ANOMALIES_TOPIC, exc)
            return
        self._attached = True
        if not from_end:
            logger.info("%s appeared; reading it", ANOMALIES_TOPIC)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._attached:
                if self._stop.wait(ATTACH_RETRY_SECONDS):
                    return
                self._attach(from_end=False)
                continue
            try:
                message = self._consumer.poll(0.2)
            except KafkaClientError as exc:
                logger.error("reading %s failed: %s; retrying", ANOMALIES_TOPIC, exc)
                self._stop.wait(1.0)
                continue
            if message is not None:
                self.handle(message)
