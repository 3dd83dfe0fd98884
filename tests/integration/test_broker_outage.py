"""A broker that goes away for a few seconds: the clients ride it out, lose no message, and the
log says so in two lines instead of librdkafka's error per retry per client.

The broker is this module's own, on free ports, so that stopping it disturbs no other test.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.infra.kafka_broker import KafkaBroker
from pipeline.kafka import Consumer, Producer, TopicAdmin
from pipeline.protocol import Message
from pipeline.settings import Settings
from devkit.servers import free_port_pair
from devkit.waiting import PATIENCE, wait_for

SENT_IN_EACH_PHASE = 10  # messages sent before the outage, during it and after it


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state")}), port=free_port_pair())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class Sender(threading.Thread):
    """Sends numbered messages every 0.1 s until stopped, whatever the broker does."""

    def __init__(self, producer: Producer, topic: str) -> None:
        super().__init__(daemon=True)
        self.producer, self.topic = producer, topic
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.producer.send(Message(self.topic, "k", str(self.sent)))
            self.sent += 1


class Reader(threading.Thread):
    """Reads the topic until stopped."""

    def __init__(self, settings: Settings, topic: str) -> None:
        super().__init__(daemon=True)
        self.settings, self.topic = settings, topic
        self.received: list[str] = []
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        with Consumer(self.settings) as consumer:
            consumer.assign([self.topic])
            self.ready.set()
            while not self.stop.is_set():
                message = consumer.poll(0.2)
                if message is not None:
                    self.received.append(message.value)


def test_a_broker_outage_is_one_warning_then_one_line_and_loses_no_message(own_broker, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": own_broker.bootstrap,
                                  "PIPELINE_STATE_DIR": str(tmp_path / "state")})
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    TopicAdmin(settings).create([topic])
    reader = Reader(settings, topic)
    reader.start()
    assert reader.ready.wait(PATIENCE)
    with Producer(settings) as producer:
        sender = Sender(producer, topic)
        sender.start()
        try:
            # Each phase waits for its event: messages through before the outage, the outage
            # seen and messages sent during it, the broker seen back and messages sent after.
            wait_for(lambda: len(reader.received) >= SENT_IN_EACH_PHASE, "messages through the broker")
            stopping = time.monotonic()
            own_broker.stop()
            sent_before = sender.sent
            wait_for(lambda: "unreachable, retrying" in caplog.text, "the outage noticed")
            noticed = time.monotonic()
            wait_for(lambda: sender.sent - sent_before >= SENT_IN_EACH_PHASE, "messages sent in the outage")
            sent_during = sender.sent - sent_before
            starting = time.monotonic()
            own_broker.start()  # same port, same data
            wait_for(lambda: "reachable again" in caplog.text, lambda: caplog.text)
            back = time.monotonic()
            sent_back = sender.sent
            wait_for(lambda: sender.sent - sent_back >= SENT_IN_EACH_PHASE, "messages sent after the outage")
        finally:
            sender.stop.set()
            sender.join()
        producer.flush(PATIENCE)
    try:
        wait_for(lambda: len(reader.received) >= sender.sent, "every message read")
    finally:
        reader.stop.set()
        reader.join(PATIENCE)
    assert sent_during >= SENT_IN_EACH_PHASE
    assert reader.received == [str(i) for i in range(sender.sent)]  # all, once, in order
    ours = [r.getMessage() for r in caplog.records if r.name == "pipeline.kafka.health"]
    assert len(ours) == 2, ours
    assert ours[0] == f"broker {own_broker.bootstrap} unreachable, retrying"
    assert ours[1].startswith(f"broker {own_broker.bootstrap} reachable again after ")
    # The outage it reports (from the first failed connection to the probe that answered, on
    # this process's monotonic clock, to 0.1 s) lies between what this test saw of it: at
    # least from the warning to the restart, at most from the stop to the line back.
    reported = float(ours[1].rsplit(" ", 1)[1].rstrip("s"))
    assert starting - noticed - 0.05 <= reported <= back - stopping + 0.05
    assert not [r for r in caplog.records if r.name == "librdkafka" and r.levelno >= logging.ERROR], caplog.text
