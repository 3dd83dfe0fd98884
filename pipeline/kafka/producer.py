"""A lazy producer that never loses an error silently."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import confluent_kafka

from pipeline.errors import KafkaClientError
from pipeline.kafka.config import client_config
from pipeline.kafka.topics import TopicNames
from pipeline.protocol import Message
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

STOPPED_DELIVERY_GRACE = 3.0
"""Once the producer's ``stop`` is set (the user's Ctrl-C or SIGTERM), how long a wait for
delivery goes on: a broker that is away would otherwise hold every wait for its full timeout
(an orchestrator whose broker had died took 65 s to leave on SIGTERM: two 30 s waits)."""


class Producer:
    """Produces :class:`~pipeline.protocol.Message` objects.

    Connects on first use. The first delivery error reported by a callback is raised on the
    next :meth:`send` or :meth:`flush`; a producer shared by many orders (``shared=True``)
    logs and counts delivery errors instead, so that one order's lost topic never fails the
    messages of another (:meth:`send_now` still raises its own message's error). Leaving the
    ``with`` block flushes. A message's topic is its logical name: it goes to that topic
    under TOPIC_PREFIX. Once ``stop`` is set, a wait for delivery lasts at most
    :data:`STOPPED_DELIVERY_GRACE` more.
    """

    def __init__(self, settings: Settings, shared: bool = False, stop: threading.Event | None = None,
                 **overrides: Any) -> None:
        self.shared = shared
        self._stop = stop
        self.delivery_errors = 0
        self._config = client_config(
            settings,
            **{"enable.idempotence": True, "linger.ms": 5, "acks": "all", **overrides},
        )
        self._names = TopicNames.of(settings)
        self._producer: confluent_kafka.Producer | None = None
        self._error: KafkaClientError | None = None

    def _client(self) -> confluent_kafka.Producer:
        if self._producer is None:
            self._producer = confluent_kafka.Producer(self._config)
        return self._producer

    def _on_delivery(self, err: confluent_kafka.KafkaError | None, msg: Any) -> None:
        if err is None:
            return
        if self.shared:
            self.delivery_errors += 1
            if self.delivery_errors == 1 or self.delivery_errors % 100 == 0:
                logger.warning("delivery to %s failed: %s (%d so far)", msg.topic(), err.str(),
                               self.delivery_errors)
        elif self._error is None:
            self._error = KafkaClientError(f"delivery to {msg.topic()} failed: {err.str()}")

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def send(self, message: Message, on_delivery: Any = None) -> None:
        """Queue ``message`` for delivery (asynchronous; see :meth:`flush`)."""
        self._raise_pending()
        client = self._client()
        kwargs: dict[str, Any] = {
            "key": message.key.encode("utf-8"),
            "value": message.value.encode("utf-8"),
            "headers": list(message.headers),
            "on_delivery": on_delivery or self._on_delivery,
        }
        if message.timestamp_ms is not None:
            kwargs["timestamp"] = message.timestamp_ms
        topic = self._names.physical(message.topic)
        while True:
            try:
                client.produce(topic, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, then retry.
                client.poll(0.5)
            except confluent_kafka.KafkaException as exc:
                raise KafkaClientError(f"cannot produce to {topic}: {exc}") from exc
        client.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued message is delivered; raise the first delivery error."""
        if self._producer is not None:
            began = time.monotonic()
            remaining = self._wait(timeout)
            if remaining:
                raise KafkaClientError(f"{remaining} message(s) not delivered within "
                                       f"{time.monotonic() - began:.0f}s")
        self._raise_pending()

    def send_now(self, message: Message, timeout: float = 30.0) -> None:
        """Send one message and wait until the broker has it; raise its delivery error."""
        outcome: list[str] = []

        def delivered(err: confluent_kafka.KafkaError | None, msg: Any) -> None:
            outcome.append(err.str() if err is not None else "")

        self.send(message, on_delivery=delivered)
        if self._producer is not None:
            self._wait(timeout)
        topic = self._names.physical(message.topic)
        if not outcome:
            raise KafkaClientError(f"{message.key} to {topic} not delivered within {timeout:g}s")
        if outcome[0]:
            raise KafkaClientError(f"delivery to {topic} failed: {outcome[0]}")

    def _wait(self, timeout: float) -> int:
        """Flush for up to ``timeout`` s, or :data:`STOPPED_DELIVERY_GRACE` once ``stop`` is
        set; the number of messages still undelivered."""
        assert self._producer is not None
        if self._stop is None:
            return self._producer.flush(timeout)
        deadline = time.monotonic() + timeout
        while True:
            if self._stop.is_set():
                deadline = min(deadline, time.monotonic() + STOPPED_DELIVERY_GRACE)
            left = deadline - time.monotonic()
            remaining = self._producer.flush(max(min(left, 0.5), 0.0))
            if remaining == 0 or left <= 0.5:
                return remaining

    def close(self) -> None:
        """Flush what is queued; the client is dropped even when flushing fails."""
        try:
            self.flush()
        finally:
            self._producer = None

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            # Already failing: try to deliver what is queued but keep the original error.
            try:
                self.close()
            except KafkaClientError as flush_error:
                logger.warning("while handling an error, flushing failed too: %s", flush_error)
