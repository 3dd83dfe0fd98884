"""Broker health: librdkafka's connection chatter becomes one warning per outage and one line
when the broker is back (pipeline/kafka/health.py)."""

from __future__ import annotations

import logging
import socket

import confluent_kafka
import pytest

from devkit.servers import free_port
from devkit.waiting import wait_for
from pipeline.kafka import health
from pipeline.kafka.config import client_config
from pipeline.kafka.health import BrokerHealth, broker_health, reachable
from pipeline.settings import Settings

BOOTSTRAP = "127.0.0.1:9092"
REFUSED = ("FAIL", "rdkafka#consumer-2", "[thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to "
           "ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)")
DISCONNECTED = ("FAIL", "rdkafka#producer-1", "[thrd:127.0.0.1:9092/1]: 127.0.0.1:9092/1: Disconnected: "
                "connection closed by peer: receive 0 after POLLIN (after 3150ms in state UP)")


class FakeBroker:
    """The probe's answer and the clock, set by the test."""

    def __init__(self) -> None:
        self.up = True
        self.now = 1000.0

    def probe(self) -> bool:
        return self.up


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def tracker(broker: FakeBroker) -> BrokerHealth:
    return BrokerHealth(BOOTSTRAP, probe=broker.probe, clock=lambda: broker.now, threads=False)


def _lines(caplog: pytest.LogCaptureFixture, least: int = logging.INFO) -> list[str]:
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.levelno >= least]


def _transport_error(text: str = REFUSED[2]) -> confluent_kafka.KafkaError:
    return confluent_kafka.KafkaError(confluent_kafka.KafkaError._TRANSPORT, text)


def test_an_outage_is_one_warning_and_one_line_when_back_however_many_failures(caplog, broker, tracker):
    caplog.set_level(logging.DEBUG)
    broker.up = False
    tracker.on_log(logging.INFO, "%s [%s] %s", *DISCONNECTED)
    for _ in range(50):  # every retry of every client
        tracker.on_log(logging.ERROR, "%s [%s] %s", *REFUSED)
        tracker.on_error(_transport_error())
    tracker.on_error(confluent_kafka.KafkaError(confluent_kafka.KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert tracker.probe_once() is True
    broker.now += 2.0
    for _ in range(50):
        tracker.on_log(logging.ERROR, "%s [%s] %s", *REFUSED)
        assert tracker.probe_once() is True
    broker.now += 3.2
    broker.up = True
    assert tracker.probe_once() is False
    assert _lines(caplog) == [
        "WARNING broker 127.0.0.1:9092 unreachable, retrying",
        "WARNING broker 127.0.0.1:9092 reachable again after 5.2s",
    ]
    chatter = [r for r in caplog.records if r.name == "librdkafka"]
    assert len(chatter) == 152 and {r.levelno for r in chatter} == {logging.DEBUG}


def test_a_failure_while_the_broker_settles_after_coming_back_is_no_second_outage(caplog, broker, tracker):
    broker.up = False
    tracker.on_log(logging.ERROR, "%s [%s] %s", *REFUSED)
    tracker.probe_once()
    broker.up = True
    broker.now += 5.0
    tracker.probe_once()
    broker.now += 1.0  # still starting: it accepts the connection, then drops it
    tracker.on_log(logging.WARNING, "%s [%s] %s", *DISCONNECTED)
    tracker.on_error(_transport_error(DISCONNECTED[2]))
    assert tracker.probe_once() is False
    assert [line.split(" broker ")[1] for line in _lines(caplog)] == [
        "127.0.0.1:9092 unreachable, retrying", "127.0.0.1:9092 reachable again after 5.0s"]


def test_an_idle_connection_the_broker_closes_is_not_an_outage(caplog, broker, tracker):
    tracker.on_log(logging.INFO, "%s [%s] %s", *DISCONNECTED)
    tracker.on_error(confluent_kafka.KafkaError(confluent_kafka.KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert tracker.probe_once() is False
    assert _lines(caplog) == [] and not tracker.down


def test_a_second_real_outage_is_told_again(caplog, broker, tracker):
    for seconds in (4.0, 7.5):
        broker.up = False
        tracker.on_log(logging.ERROR, "%s [%s] %s", *REFUSED)
        tracker.probe_once()
        broker.now += seconds
        broker.up = True
        tracker.probe_once()
        broker.now += 60.0
    assert _lines(caplog) == [
        "WARNING broker 127.0.0.1:9092 unreachable, retrying",
        "WARNING broker 127.0.0.1:9092 reachable again after 4.0s",
        "WARNING broker 127.0.0.1:9092 unreachable, retrying",
        "WARNING broker 127.0.0.1:9092 reachable again after 7.5s",
    ]


def test_other_librdkafka_errors_stay_visible(caplog, tracker):
    caplog.set_level(logging.DEBUG)
    auth = ("FAIL", "rdkafka#producer-1", "[thrd:sasl_ssl://b:9093/bootstrap]: sasl_ssl://b:9093/bootstrap: "
            "SASL authentication error: Authentication failed (after 5ms in state AUTH_REQ)")
    hint = ("FAIL", "rdkafka#producer-1", "[thrd:b:9093/bootstrap]: b:9093/bootstrap: Disconnected while requesting "
            "ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL "
            "listener?) or broker version is < 0.10 (see api.version.request) (after 2ms in state APIVERSION_QUERY)")
    topic = ("PARTCNT", "rdkafka#producer-1", "[thrd:main]: Topic missing-1 partition count changed from 1 to 0")
    for args, level in ((auth, logging.ERROR), (hint, logging.ERROR), (topic, logging.WARNING)):
        tracker.on_log(level, "%s [%s] %s", *args)
    tracker.on_error(confluent_kafka.KafkaError(confluent_kafka.KafkaError._FENCED, "producer fenced", fatal=True))
    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("librdkafka", logging.ERROR), ("librdkafka", logging.ERROR), ("librdkafka", logging.WARNING),
        ("librdkafka", logging.ERROR)]
    assert caplog.records[0].getMessage() == "FAIL [rdkafka#producer-1] " + auth[2]
    assert "producer fenced" in caplog.records[3].getMessage()
    assert not tracker.down


@pytest.mark.parametrize("text, chatter", [
    (REFUSED[2], True),
    (DISCONNECTED[2], True),
    ("sasl_ssl://b:9093/bootstrap: Connect to ipv4#10.0.0.7:9093 failed: Connection refused (after 0ms in "
     "state CONNECT)", True),
    ("b:9092/bootstrap: Connection setup timed out in state CONNECT (after 30028ms in state CONNECT)", True),
    ("b:9092/bootstrap: Failed to resolve 'b:9092': Name or service not known (after 2ms in state CONNECT)", True),
    ("1/1 brokers are down", True),
    ("ssl://b:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed", False),
    ("b:9092/bootstrap: Disconnected: verify that security.protocol is correctly configured, broker might "
     "require SASL authentication (after 3ms in state UP)", False),
    ("Topic t partition count changed from 1 to 0", False),
])
def test_what_counts_as_connection_chatter(text, chatter):
    assert health.is_connection_failure(text) is chatter


def test_failures_that_go_on_although_the_port_answers_are_said_once(caplog, broker, tracker):
    detail = ("FAIL", "rdkafka#consumer-2", "[thrd:10.9.9.9:9092/1]: 10.9.9.9:9092/1: Connect to ipv4#10.9.9.9:9092 "
              "failed: No route to host (after 3ms in state CONNECT)")
    for _ in range(30):  # an advertised listener nobody can reach, the bootstrap port answering
        tracker.on_log(logging.ERROR, "%s [%s] %s", *detail)
        tracker.probe_once()
        broker.now += 1.0
    lines = _lines(caplog)
    assert len(lines) == 1 and "accepts connections but its clients keep failing" in lines[0]
    assert "No route to host" in lines[0]


def test_the_background_probe_says_when_a_real_port_listens_again(caplog):
    port = free_port()
    tracker = BrokerHealth(f"127.0.0.1:{port}")
    tracker.connection_failed("Connect to ipv4#127.0.0.1 failed: Connection refused")
    wait_for(lambda: tracker.down, "the outage noticed")
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        wait_for(lambda: not tracker.down, "the port answering again noticed")
    assert [line.split(" after ")[0] for line in _lines(caplog)] == [
        f"WARNING broker 127.0.0.1:{port} unreachable, retrying", f"WARNING broker 127.0.0.1:{port} reachable again"]


def test_reachable_tries_every_bootstrap_server():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert reachable(f"PLAINTEXT://127.0.0.1:1, 127.0.0.1:{port}")
    assert not reachable(f"127.0.0.1:{port}")
    assert health._addresses("[::1]:9093,b") == [("::1", 9093), ("b", 9092)]


def test_every_client_of_a_process_reports_to_one_tracker(tmp_path):
    settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:39092", "PIPELINE_STATE_DIR": str(tmp_path)})
    first, second = client_config(settings), client_config(settings, **{"group.id": "g"})
    assert first["error_cb"].__self__ is second["error_cb"].__self__ is broker_health("127.0.0.1:39092")
    assert first["logger"].log.__self__ is broker_health("127.0.0.1:39092")
    assert broker_health("127.0.0.1:39093") is not broker_health("127.0.0.1:39092")


def test_a_fresh_brokers_settling_retries_are_debug_only(caplog, tracker):
    caplog.set_level(logging.DEBUG)
    settling = ("GETPID", "rdkafka#producer-4", "[thrd:main]: Failed to acquire idempotence PID from broker "
                "127.0.0.1:39325/1: Broker: Coordinator load in progress: retrying")
    tracker.on_log(logging.WARNING, "%s [%s] %s", *settling)
    assert [(r.name, r.levelno) for r in caplog.records] == [("librdkafka", logging.DEBUG)]
    assert not tracker.down
