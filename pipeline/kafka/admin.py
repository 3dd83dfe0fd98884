"""Topic administration: create per-order topics and wait until they exist; delete them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import KafkaClientError
from pipeline.kafka.config import client_config
from pipeline.settings import Settings

logger = logging.getLogger(__name__)


class TopicAdmin:
    """Creates and deletes topics. Connects on first use."""

    def __init__(self, settings: Settings) -> None:
        self._config = client_config(settings)
        self._admin: AdminClient | None = None

    def _client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self._config)
        return self._admin

    def existing(self, timeout: float = 10.0) -> set[str]:
        """Names of the topics the cluster has now."""
        try:
            return set(self._client().list_topics(timeout=timeout).topics)
        except confluent_kafka.KafkaException as exc:
            raise KafkaClientError(f"cannot list topics: {exc}") from exc

    def create(self, topics: Sequence[str], partitions: int = 1, replication: int = -1,
               timeout: float = 30.0) -> None:
        """Create ``topics`` (existing ones are fine) and return once all are visible.

        ``replication=-1`` takes the broker's default, so the same code serves a single-node
        broker and a cluster.
        """
        futures = self._client().create_topics(
            [NewTopic(t, num_partitions=partitions, replication_factor=replication) for t in topics],
            operation_timeout=timeout,
        )
        for topic, future in futures.items():
            try:
                future.result(timeout)
            except confluent_kafka.KafkaException as exc:
                if exc.args[0].code() != confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaClientError(f"cannot create topic {topic}: {exc}") from exc
        self._wait(lambda names: set(topics) <= names, f"topics {', '.join(topics)} to appear", timeout)

    def delete(self, topics: Sequence[str], timeout: float = 30.0) -> None:
        """Delete ``topics`` (missing ones are fine) and return once all are gone."""
        if not topics:
            return
        futures = self._client().delete_topics(list(topics), operation_timeout=timeout)
        for topic, future in futures.items():
            try:
                future.result(timeout)
            except confluent_kafka.KafkaException as exc:
                if exc.args[0].code() != confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise KafkaClientError(f"cannot delete topic {topic}: {exc}") from exc
        self._wait(lambda names: not set(topics) & names, f"topics {', '.join(topics)} to go", timeout)

    def _wait(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.existing(timeout)):
            if time.monotonic() > deadline:
                raise KafkaClientError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.1)
