"""A lazy producer that never loses an error silently."""

from __future__ import annotations

import logging
from typing import Any

import confluent_kafka

from pipeline.errors import KafkaClientError
from pipeline.kafka.config import client_config
from pipeline.protocol import Message
from pipeline.settings import Settings

logger = logging.getLogger(__name__)


class Producer:
    """Produces :class:`~pipeline.protocol.Message` objects.

    Connects on first use. The first delivery error reported by a callback is raised on the
    next :meth:`send` or :meth:`flush`. Leaving the ``with`` block flushes.
    """

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self._config = client_config(
            settings,
            **{"enable.idempotence": True, "linger.ms": 5, "acks": "all", **overrides},
        )
        self._producer: confluent_kafka.Producer | None = None
        self._error: KafkaClientError | None = None

    def _client(self) -> confluent_kafka.Producer:
        if self._producer is None:
            self._producer = confluent_kafka.Producer(self._config)
        return self._producer

    def _on_delivery(self, err: confluent_kafka.KafkaError | None, msg: Any) -> None:
        if err is not None and self._error is None:
            self._error = KafkaClientError(f"delivery to {msg.topic()} failed: {err.str()}")

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def send(self, message: Message) -> None:
        """Queue ``message`` for delivery (asynchronous; see :meth:`flush`)."""
        self._raise_pending()
        client = self._client()
        kwargs: dict[str, Any] = {
            "key": message.key.encode("utf-8"),
            "value": message.value.encode("utf-8"),
            "headers": list(message.headers),
            "on_delivery": self._on_delivery,
        }
        if message.timestamp_ms is not None:
            kwargs["timestamp"] = message.timestamp_ms
        while True:
            try:
                client.produce(message.topic, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, then retry.
                client.poll(0.5)
            except confluent_kafka.KafkaException as exc:
                raise KafkaClientError(f"cannot produce to {message.topic}: {exc}") from exc
        client.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued message is delivered; raise the first delivery error."""
        if self._producer is not None:
            remaining = self._producer.flush(timeout)
            if remaining:
                raise KafkaClientError(f"{remaining} message(s) not delivered within {timeout:g}s")
        self._raise_pending()

    def send_now(self, message: Message, timeout: float = 30.0) -> None:
        """Send one message and wait until the broker has it."""
        self.send(message)
        self.flush(timeout)

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
