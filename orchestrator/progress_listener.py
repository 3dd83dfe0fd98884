"""Reads the shared ``orchestrator`` topic and hands each PROGRESS to the order it names.

Orders are told apart by PROGRESS's ``order_id`` header (the original mixed up concurrent
orders because PROGRESS carried no orderID). Messages for orders this process does not run
belong to another orchestrator and are ignored.
"""

from __future__ import annotations

import logging
import queue
import threading

from pipeline.errors import KafkaClientError, ProtocolError
from pipeline.kafka import Consumer
from pipeline.protocol import ORCHESTRATOR_TOPIC, Key, Progress
from pipeline.settings import Settings

logger = logging.getLogger(__name__)


class ProgressListener:
    """A background reader; :meth:`register` before starting an order's first task."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = Consumer(settings)
        self._queues: dict[int, queue.Queue[Progress]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-listener", daemon=True)
        self.malformed = 0

    def start(self) -> None:
        """Position at the topic's current end (so nothing sent later is missed), then read."""
        self._consumer.assign([ORCHESTRATOR_TOPIC], from_end=True)
        self._thread.start()

    def register(self, order_id: int) -> "queue.Queue[Progress]":
        """The queue on which this order's PROGRESS messages will arrive."""
        with self._lock:
            return self._queues.setdefault(order_id, queue.Queue())

    def unregister(self, order_id: int) -> None:
        with self._lock:
            self._queues.pop(order_id, None)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._consumer.poll(0.2)
            except KafkaClientError as exc:
                logger.error("reading %s failed: %s; retrying", ORCHESTRATOR_TOPIC, exc)
                self._stop.wait(1.0)
                continue
            if message is None or message.key != Key.PROGRESS.value:
                continue
            try:
                progress = Progress.decode(message)
            except ProtocolError as exc:
                self.malformed += 1
                logger.warning("skipping malformed PROGRESS at offset %s: %s", message.offset, exc)
                continue
            with self._lock:
                target = self._queues.get(progress.order_id)
            if target is not None:
                target.put(progress)
