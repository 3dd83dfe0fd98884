"""A lazy consumer with at-least-once semantics: offsets are stored only after processing."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import confluent_kafka

from pipeline.errors import KafkaClientError
from pipeline.kafka.config import client_config
from pipeline.kafka.topics import TopicNames
from pipeline.protocol import Message
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

# Errors the client recovers from by itself (a restarting broker, a topic still propagating).
_TRANSIENT = {
    confluent_kafka.KafkaError._PARTITION_EOF,
    confluent_kafka.KafkaError._TRANSPORT,
    confluent_kafka.KafkaError._ALL_BROKERS_DOWN,
    confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART,
    confluent_kafka.KafkaError.LEADER_NOT_AVAILABLE,
    confluent_kafka.KafkaError.NOT_LEADER_FOR_PARTITION,
    # A fresh broker creates __consumer_offsets on first use; the coordinator moves meanwhile.
    confluent_kafka.KafkaError.NOT_COORDINATOR,
    confluent_kafka.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    confluent_kafka.KafkaError.COORDINATOR_NOT_AVAILABLE,
}


class Consumer:
    """Reads :class:`~pipeline.protocol.Message` objects from explicitly assigned partitions.

    Per-order topics have one partition and one reader, so a per-order reader assigns its
    partitions (:meth:`assign`, :meth:`add`) rather than subscribing: no group rebalance delays
    the start, and the group id still keeps committed offsets so a restarted reader resumes
    where the last commit left it. The shared services join a group instead (:meth:`subscribe`).

    Topics are named by their logical names in and out (assigned, subscribed, revoked and
    received alike); only the librdkafka client sees them under TOPIC_PREFIX.
    """

    def __init__(self, settings: Settings, group_id: str | None = None, **overrides: Any) -> None:
        self.group_id = group_id or f"reader-{uuid.uuid4().hex[:12]}"
        self._config = client_config(
            settings,
            **{
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                **overrides,
            },
        )
        self._names = TopicNames.of(settings)
        self._consumer: confluent_kafka.Consumer | None = None
        # (physical topic, partition) -> the next offset to commit
        self._pending: dict[tuple[str, int], int] = {}
        # subscribe(): called with the (topic, partition) pairs about to be taken away.
        self.on_revoke: Callable[[list[tuple[str, int]]], None] | None = None

    def _client(self) -> confluent_kafka.Consumer:
        if self._consumer is None:
            self._consumer = confluent_kafka.Consumer(self._config)
        return self._consumer

    def assign(self, topics: Sequence[str], from_end: bool = False, timeout: float = 30.0) -> None:
        """Read every partition of ``topics``.

        From the group's committed offset (or the beginning) by default; with ``from_end``,
        from each partition's current end. Either way the start offsets are resolved here,
        before this returns, so nothing produced after the call can be missed, and a broker
        whose group coordinator is still loading is waited for rather than skipped.
        """
        self._client().assign(self._positioned(topics, from_end, timeout))

    def add(self, topics: Sequence[str], from_end: bool = False, timeout: float = 30.0) -> None:
        """Read ``topics`` too, beside what is assigned already (offsets as :meth:`assign`)."""
        self._client().incremental_assign(self._positioned(topics, from_end, timeout))

    def add_from_start(self, topics: Sequence[str]) -> None:
        """Read single-partition ``topics`` (as every order's topics are) too, from their first
        message, asking the broker nothing first: a reader following hundreds of orders on a
        busy broker must not wait a metadata and an offset round trip per order."""
        try:
            self._client().incremental_assign([
                confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)
                for topic in self._names.physical_all(topics)])
        except confluent_kafka.KafkaException as exc:
            raise KafkaClientError(f"cannot read {', '.join(topics)}: {exc}") from exc

    def _positioned(self, topics: Sequence[str], from_end: bool, timeout: float) -> list:
        """Every partition of ``topics`` with the offset to start reading it from."""
        client = self._client()
        partitions = self._partitions(client, topics, timeout)
        if not from_end:
            return self._committed(client, partitions, timeout)
        for partition in partitions:
            partition.offset = _end_offset(client, partition, timeout)
        return partitions

    def remove(self, topics: Sequence[str]) -> None:
        """Stop reading ``topics`` (added with :meth:`add`); what was not committed is dropped."""
        if self._consumer is None:
            return
        wanted = set(self._names.physical_all(topics))
        partitions = [p for p in self._consumer.assignment() if p.topic in wanted]
        if partitions:
            self._consumer.incremental_unassign(partitions)
        self._forget([(p.topic, p.partition) for p in partitions])

    def _partitions(self, client, topics: Sequence[str], timeout: float) -> list:
        partitions = []
        for topic in self._names.physical_all(topics):
            try:
                metadata = client.list_topics(topic, timeout=timeout)
            except confluent_kafka.KafkaException as exc:
                raise KafkaClientError(f"cannot read metadata of {topic}: {exc}") from exc
            topic_meta = metadata.topics.get(topic)
            if topic_meta is None or topic_meta.error is not None or not topic_meta.partitions:
                raise KafkaClientError(f"topic {topic} does not exist")
            partitions += [confluent_kafka.TopicPartition(topic, p) for p in sorted(topic_meta.partitions)]
        return partitions

    def subscribe(self, patterns: Sequence[str]) -> None:
        """Join the consumer group and read whatever partitions of ``patterns`` (topic names or
        ``^``-regexes) the group assigns this member, as topics appear and members come and go.

        Assignment is incremental (cooperative-sticky): a new order's topic moves nothing
        else. Before partitions are taken away, :attr:`on_revoke` (if set) is called with
        their ``(topic, partition)`` pairs, so the caller can finish and commit them; the
        offsets of lost partitions are dropped uncommitted (their new owner reads them again).
        Patterns match logical names: only topics under TOPIC_PREFIX are ever assigned.
        """
        def revoked(_client, partitions) -> None:
            pairs = [(p.topic, p.partition) for p in partitions]
            if self.on_revoke is not None:
                self.on_revoke([(self._names.logical(t), p) for t, p in pairs])
            self._forget(pairs)

        def lost(_client, partitions) -> None:
            self._forget([(p.topic, p.partition) for p in partitions])

        self._client().subscribe([self._names.pattern(p) for p in patterns], on_revoke=revoked, on_lost=lost)

    def _forget(self, pairs) -> None:
        for pair in pairs:
            self._pending.pop(pair, None)

    def _committed(self, client, partitions, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = client.committed(partitions, timeout=min(5.0, timeout))
                break
            except confluent_kafka.KafkaException as exc:
                if time.monotonic() > deadline:
                    raise KafkaClientError(f"cannot read committed offsets of {self.group_id}: {exc}") from exc
                logger.debug("group coordinator not ready (%s); retrying", exc)
                time.sleep(0.2)
        for partition in found:
            if partition.offset < 0:
                partition.offset = confluent_kafka.OFFSET_BEGINNING
        return found

    def poll(self, timeout: float = 1.0) -> Message | None:
        """The next message, or None when nothing arrived within ``timeout`` seconds."""
        msg = self._client().poll(timeout)
        if msg is None:
            return None
        error = msg.error()
        if error is not None:
            if error.code() in _TRANSIENT or error.retriable():
                logger.debug("transient consumer error: %s", error.str())
                return None
            raise KafkaClientError(f"consumer error: {error.str()}")
        return _to_message(msg, self._names)

    def consume(self, max_messages: int, timeout: float = 1.0) -> list[Message]:
        """Up to ``max_messages`` messages, waiting at most ``timeout`` for the first: as soon
        as one arrives, what else is already there is taken without waiting for more
        (librdkafka's own batch call would wait out the whole timeout for a full batch)."""
        client = self._client()
        first = client.poll(timeout)
        if first is None:
            return []
        batch = [first, *client.consume(max_messages - 1, 0)] if max_messages > 1 else [first]
        messages = []
        for msg in batch:
            error = msg.error()
            if error is None:
                messages.append(_to_message(msg, self._names))
            elif not (error.code() in _TRANSIENT or error.retriable()):
                raise KafkaClientError(f"consumer error: {error.str()}")
            else:
                logger.debug("transient consumer error: %s", error.str())
        return messages

    def mark_processed(self, message: Message) -> None:
        """Remember that ``message`` is fully processed; :meth:`commit` makes it durable."""
        if message.offset is None or message.partition is None:
            raise ValueError("only a received message can be marked processed")
        self._pending[(self._names.physical(message.topic), message.partition)] = message.offset + 1

    def commit(self) -> None:
        """Commit the offsets of everything marked processed (synchronously)."""
        if not self._pending or self._consumer is None:
            return
        offsets = [confluent_kafka.TopicPartition(t, p, o) for (t, p), o in self._pending.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except confluent_kafka.KafkaException as exc:
            if _group_moving(exc):
                # The group is rebalancing, or the broker is away: the offsets stay pending
                # for the next commit (or, if their partitions move, their new owner reads
                # that tail again and the idempotent writes drop it).
                logger.info("offset commit deferred: %s", exc.args[0].str())
                return
            if not _topic_gone(exc):
                raise KafkaClientError(f"offset commit failed: {exc}") from exc
            # An order's topics go once it is over, possibly between reading and committing:
            # commit the others one by one; a deleted topic's offsets go with it.
            for offset in offsets:
                try:
                    self._consumer.commit(offsets=[offset], asynchronous=False)
                except confluent_kafka.KafkaException as one:
                    if not _topic_gone(one):
                        raise KafkaClientError(f"offset commit failed: {one}") from one
                    logger.debug("%s is gone; its offset is not committed", offset.topic)
        self._pending.clear()

    def close(self) -> None:
        """Leave the group and drop the client (uncommitted work is read again next time)."""
        if self._consumer is not None:
            try:
                self._consumer.close()
            finally:
                self._consumer = None

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()


def _end_offset(client: confluent_kafka.Consumer, partition, timeout: float) -> int:
    """The partition's current end; a topic created a moment ago may still be electing its
    leader ("not leader for partition"), which is waited for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.get_watermark_offsets(partition, timeout=min(5.0, timeout))[1]
        except confluent_kafka.KafkaException as exc:
            error = exc.args[0] if exc.args else None
            transient = isinstance(error, confluent_kafka.KafkaError) and (
                error.code() in _TRANSIENT or error.retriable())
            if not transient or time.monotonic() > deadline:
                raise KafkaClientError(f"cannot read the end of {partition.topic}: {exc}") from exc
            time.sleep(0.2)


_GROUP_MOVING = {
    confluent_kafka.KafkaError.REBALANCE_IN_PROGRESS,
    confluent_kafka.KafkaError.ILLEGAL_GENERATION,
    confluent_kafka.KafkaError.UNKNOWN_MEMBER_ID,
    confluent_kafka.KafkaError._ASSIGNMENT_LOST,
    confluent_kafka.KafkaError.NOT_COORDINATOR,
    confluent_kafka.KafkaError.COORDINATOR_NOT_AVAILABLE,
    confluent_kafka.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    # The broker away or restarting: the group's coordinator is not known yet.
    confluent_kafka.KafkaError._WAIT_COORD,
    confluent_kafka.KafkaError._TRANSPORT,
    confluent_kafka.KafkaError._ALL_BROKERS_DOWN,
    confluent_kafka.KafkaError._TIMED_OUT,
}


def _group_moving(exc: confluent_kafka.KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, confluent_kafka.KafkaError) and (error.code() in _GROUP_MOVING or error.retriable())


def _topic_gone(exc: confluent_kafka.KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, confluent_kafka.KafkaError) and \
        error.code() == confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART


def _to_message(msg: confluent_kafka.Message, names: TopicNames) -> Message:
    """The received message, on its logical topic."""
    ts_type, ts = msg.timestamp()
    key = msg.key()
    value = msg.value()
    message = Message(
        topic=names.logical(msg.topic()),
        key=key.decode("utf-8", errors="replace") if key is not None else "",
        value=value.decode("utf-8", errors="replace") if value is not None else "",
        headers=tuple(msg.headers() or ()),
        timestamp_ms=ts if ts_type != confluent_kafka.TIMESTAMP_NOT_AVAILABLE else None,
        partition=msg.partition(),
        offset=msg.offset(),
    )
    return message
