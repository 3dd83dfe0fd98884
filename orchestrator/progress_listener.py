"""Reads the shared ``orchestrator`` topic and hands each PROGRESS to the order it names.

Orders are told apart by PROGRESS's ``order_id`` header (the original mixed up concurrent
orders because PROGRESS carried no orderID). Messages for orders this process does not run
belong to another orchestrator and are ignored.

For an order monitored by the shared services, the same reader also follows ``task<ID>``
(:meth:`ProgressListener.watch_terminate`): the order's samples are all stored once the shared
consumer's TERMINATE is there, and only then may its topics go.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from pipeline.errors import KafkaClientError, ProtocolError
from pipeline.kafka import Consumer
from pipeline.protocol import ORCHESTRATOR_TOPIC, Key, Progress, task_topic
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
        self._terminated: dict[str, threading.Event] = {}  # task<ID> -> TERMINATE seen
        self._last_terminate: float | None = None  # monotonic time of the last TERMINATE read
        # Topics to start or stop reading; the reader thread alone touches the client.
        self._changes: queue.Queue[tuple[str, str]] = queue.Queue()

    def start(self) -> None:
        """Position at the topic's current end (so nothing sent later is missed), then read."""
        self._consumer.add([ORCHESTRATOR_TOPIC], from_end=True)
        self._thread.start()

    def watch_terminate(self, order_id: int) -> threading.Event:
        """An event set once TERMINATE is on ``task<order_id>`` (read from its start)."""
        topic = task_topic(order_id)
        with self._lock:
            event = self._terminated.setdefault(topic, threading.Event())
        self._changes.put(("add", topic))
        return event

    def confirmed_within(self, seconds: float) -> bool:
        """Whether the shared consumer confirmed one of this process's orders (TERMINATE) in
        the last ``seconds``: it is alive and serving, if maybe behind."""
        with self._lock:
            return self._last_terminate is not None and time.monotonic() - self._last_terminate <= seconds

    def register(self, order_id: int) -> "queue.Queue[Progress]":
        """The queue on which this order's PROGRESS messages will arrive."""
        with self._lock:
            return self._queues.setdefault(order_id, queue.Queue())

    def unregister(self, order_id: int) -> None:
        with self._lock:
            self._queues.pop(order_id, None)
            if self._terminated.pop(task_topic(order_id), None) is not None:
                self._changes.put(("remove", task_topic(order_id)))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_changes()
            try:
                message = self._consumer.poll(0.2)
            except KafkaClientError as exc:
                logger.error("reading %s failed: %s; retrying", ORCHESTRATOR_TOPIC, exc)
                self._stop.wait(1.0)
                continue
            if message is not None and message.key == Key.TERMINATE.value:
                with self._lock:
                    event = self._terminated.get(message.topic)
                    if event is not None:
                        self._last_terminate = time.monotonic()
                if event is not None:
                    event.set()
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

    def _apply_changes(self) -> None:
        """Start and stop reading the task topics asked for since the last call, in one go."""
        changes: dict[str, str] = {}
        while True:
            try:
                change, topic = self._changes.get_nowait()
            except queue.Empty:
                break
            changes[topic] = change  # the last word on a topic counts
        for change in ("add", "remove"):
            topics = [topic for topic, said in changes.items() if said == change]
            if not topics:
                continue
            try:
                if change == "add":
                    self._consumer.add_from_start(topics)
                else:
                    self._consumer.remove(topics)
            except KafkaClientError as exc:
                logger.warning("cannot %s %s: %s", "read" if change == "add" else "leave", ", ".join(topics), exc)
