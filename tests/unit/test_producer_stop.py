"""A producer's waits for delivery end soon after its ``stop`` is set (the user's Ctrl-C or
SIGTERM), however long they were asked to wait: a broker that is away must not hold a
cancelled run for the full delivery timeout."""

from __future__ import annotations

import threading

import pytest

from pipeline.errors import KafkaClientError
from pipeline.kafka import Producer
from pipeline.protocol import OrderStopped
from pipeline.settings import Settings


def _unreachable(tmp_path) -> Settings:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    return Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})


def test_a_stopped_producer_gives_up_on_an_unreachable_broker_instead_of_waiting_its_timeout(tmp_path):
    stop = threading.Event()
    producer = Producer(_unreachable(tmp_path), shared=True, stop=stop)
    producer.send(OrderStopped(7).encode())
    stop.set()
    # An hour asked for: were the stop not heeded, this test would never end.
    with pytest.raises(KafkaClientError, match="1 message\\(s\\) not delivered within [0-9]s"):
        producer.flush(timeout=3600)


def test_a_stop_set_while_it_waits_ends_the_wait(tmp_path):
    stop = threading.Event()
    producer = Producer(_unreachable(tmp_path), stop=stop)
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    try:
        with pytest.raises(KafkaClientError, match="not delivered"):
            producer.send_now(OrderStopped(7).encode(), timeout=3600)
    finally:
        timer.cancel()
