"""The Kafka wrappers against a real broker: produce, consume, commit, resume, admin."""

from __future__ import annotations

import uuid

import pytest

from pipeline.errors import KafkaClientError
from pipeline.kafka import Consumer, Producer, TopicAdmin
from pipeline.protocol import Message


def _drain(consumer: Consumer, count: int, timeout: float = 20.0) -> list[Message]:
    import time

    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None:
            received.append(message)
    return received


def test_messages_round_trip_with_headers_and_timestamps(settings, topic):
    sent = [
        Message(topic, f"key-{i}", f"value-{i}", (("pid", b"42"), ("host", b"h")), 1_700_000_000_000 + i)
        for i in range(20)
    ]
    with Producer(settings) as producer:
        for message in sent:
            producer.send(message)
    with Consumer(settings) as consumer:
        consumer.assign([topic])
        received = _drain(consumer, len(sent))
    assert [(m.key, m.value, m.headers, m.timestamp_ms) for m in received] == [
        (m.key, m.value, m.headers, m.timestamp_ms) for m in sent
    ]


def test_a_restarted_consumer_resumes_after_the_last_commit_only(settings, topic):
    group = f"group-{uuid.uuid4().hex[:8]}"
    with Producer(settings) as producer:
        for i in range(10):
            producer.send(Message(topic, "k", str(i)))
    with Consumer(settings, group_id=group) as consumer:
        consumer.assign([topic])
        first = _drain(consumer, 10)
        for message in first[:4]:
            consumer.mark_processed(message)
        consumer.commit()  # 4 processed; 6 read but not processed: they must come again
    with Consumer(settings, group_id=group) as consumer:
        consumer.assign([topic])
        again = _drain(consumer, 6)
    assert [m.value for m in again] == [str(i) for i in range(4, 10)]


def test_reading_from_the_end_skips_what_was_there_before(settings, topic):
    with Producer(settings) as producer:
        producer.send_now(Message(topic, "old", "before"))
        with Consumer(settings) as consumer:
            consumer.assign([topic], from_end=True)
            producer.send_now(Message(topic, "new", "after"))
            received = _drain(consumer, 1)
    assert [m.value for m in received] == ["after"]


def test_delivery_to_a_missing_topic_surfaces_as_an_error(settings):
    producer = Producer(settings, **{"message.timeout.ms": 3000})
    producer.send(Message(f"missing-{uuid.uuid4().hex[:8]}", "k", "v"))
    with pytest.raises(KafkaClientError, match="delivery|not delivered"):
        producer.flush(timeout=10)


def test_admin_creates_and_deletes_topics_and_waits(settings):
    admin = TopicAdmin(settings)
    names = [f"adm-{uuid.uuid4().hex[:8]}", f"adm-{uuid.uuid4().hex[:8]}"]
    admin.create(names)
    assert set(names) <= admin.existing()
    admin.create(names)  # existing topics are fine
    admin.delete(names)
    assert not set(names) & admin.existing()
    admin.delete(names)  # missing topics are fine


def test_assigning_a_missing_topic_is_a_clear_error(settings):
    with Consumer(settings) as consumer, pytest.raises(KafkaClientError, match="does not exist"):
        consumer.assign([f"missing-{uuid.uuid4().hex[:8]}"], timeout=5)
