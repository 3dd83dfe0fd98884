"""Topic administration: create per-order topics and wait until they exist; delete them.

Topic names here are logical (see :mod:`pipeline.kafka.topics`): TOPIC_PREFIX is put in front
of them on the way to the broker, and taken off, with every topic outside it, on the way back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Sequence

import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import KafkaClientError
from pipeline.kafka.config import client_config
from pipeline.kafka.topics import TopicNames
from pipeline.settings import Settings

logger = logging.getLogger(__name__)


class TopicAdmin:
    """Creates and deletes topics. Connects on first use."""

    def __init__(self, settings: Settings) -> None:
        self._config = client_config(settings)
        self._bootstrap = settings.kafka_bootstrap_servers
        self._names = TopicNames.of(settings)
        self._admin: AdminClient | None = None

    def _client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self._config)
        return self._admin

    def existing(self, timeout: float = 10.0) -> set[str]:
        """Names of the topics the cluster has now under this TOPIC_PREFIX (logical names)."""
        try:
            return self._names.logical_all(self._client().list_topics(timeout=timeout).topics)
        except confluent_kafka.KafkaException as exc:
            raise KafkaClientError(f"cannot list topics: {exc}") from exc

    def create(self, topics: Sequence[str], partitions: int = 1, replication: int = -1,
               timeout: float = 30.0) -> None:
        """Create ``topics`` (existing ones are fine) and return once all are visible.

        ``replication=-1`` takes the broker's default, so the same code serves a single-node
        broker and a cluster.
        """
        errors = [e for e in self._create(topics, partitions, replication, timeout).values() if e]
        if errors:
            raise errors[0]
        self._wait(lambda names: set(topics) <= names, f"topics {', '.join(topics)} to appear", timeout)

    def create_exclusive(self, topics: Sequence[str], partitions: int = 1, replication: int = -1,
                         timeout: float = 30.0) -> set[str]:
        """Create those of ``topics`` that do not exist yet and return the ones that did.

        The broker lets exactly one of two concurrent creators of a name have it, so no
        caller ever takes a topic another one created for its own (as listing first and
        creating after could: two deployments handing out the same orderID at once). The
        topics created here are visible when this returns; when one cannot be created, those
        created here are deleted again before the error is raised.
        """
        not_created = self._create(topics, partitions, replication, timeout)
        existed = {t for t, error in not_created.items() if error is None}
        created = [t for t in topics if t not in not_created]
        errors = [e for e in not_created.values() if e]
        if errors:
            try:
                self.delete(created, timeout)
            except KafkaClientError as undo:
                logger.warning("topics %s created but not deleted again: %s", ", ".join(created), undo)
            raise errors[0]
        self._wait(lambda names: set(created) <= names, f"topics {', '.join(created)} to appear", timeout)
        return existed

    def _create(self, topics: Sequence[str], partitions: int, replication: int,
                timeout: float) -> dict[str, KafkaClientError | None]:
        """Ask the broker for ``topics``; those it did not create, each with the error why
        (None: the topic exists already)."""
        topics = list(dict.fromkeys(topics))  # a name twice in one request crashes librdkafka
        if not topics:
            return {}
        futures = self._client().create_topics(
            [NewTopic(self._names.physical(t), num_partitions=partitions, replication_factor=replication)
             for t in topics],
            operation_timeout=timeout,
        )
        not_created: dict[str, KafkaClientError | None] = {}
        for topic in topics:
            physical = self._names.physical(topic)
            try:
                futures[physical].result(timeout)
            except confluent_kafka.KafkaException as exc:
                exists = exc.args[0].code() == confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS
                not_created[topic] = None if exists else KafkaClientError(f"cannot create topic {physical}: {exc}")
            except concurrent.futures.TimeoutError:
                not_created[topic] = KafkaClientError(
                    f"cannot create topic {physical}: no answer from {self._bootstrap} within {timeout:g}s")
        return not_created

    def delete(self, topics: Sequence[str], timeout: float = 30.0) -> None:
        """Delete ``topics`` (missing ones are fine) and return once all are gone."""
        topics = list(dict.fromkeys(topics))  # a name twice in one request crashes librdkafka
        if not topics:
            return
        futures = self._client().delete_topics(self._names.physical_all(topics), operation_timeout=timeout)
        for topic, future in futures.items():
            try:
                future.result(timeout)
            except confluent_kafka.KafkaException as exc:
                if exc.args[0].code() != confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise KafkaClientError(f"cannot delete topic {topic}: {exc}") from exc
            except concurrent.futures.TimeoutError:
                raise KafkaClientError(f"cannot delete topic {topic}: no answer from {self._bootstrap} "
                                       f"within {timeout:g}s") from None
        self._wait(lambda names: not set(topics) & names, f"topics {', '.join(topics)} to go", timeout)

    def _wait(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.existing(timeout)):
            if time.monotonic() > deadline:
                raise KafkaClientError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.1)
