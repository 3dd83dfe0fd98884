"""`infra up --kafka-auth` on a real broker of this module's own: every role can do what the
pipeline asks of it (the pipeline's own Producer, Consumer and TopicAdmin, logged in as that
role through the settings) and is refused the rest, with the broker's own words."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import InfraError, KafkaClientError
from ops.infra.kafka_auth import MECHANISM, PROTOCOL, ROLES, with_role
from ops.infra.kafka_broker import KafkaBroker
from ops.infra.manager import Infra, Ports, ensure_kafka
from ops.infra.state import process_cmdline
from pipeline.kafka import Consumer, Producer, TopicAdmin
from pipeline.protocol import (ANOMALIES_TOPIC, ORCHESTRATOR_TOPIC, Deviation, Key, Message, MonitorStopped,
                               MonitorTerminated, OrderStopped, Progress, TaskStatus, order_topics,
                               resource_topic, task_topic)
from pipeline.settings import Settings
from devkit.orders import REPO
from devkit.servers import free_port_pair

REFUSED = "Topic authorization failed"  # librdkafka's words for TOPIC_AUTHORIZATION_FAILED
_order_ids = itertools.count(900_001)


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory):
    """A broker with authentication on free ports, its `up` report lines kept; stopped after."""
    state_dir = tmp_path_factory.mktemp("kafka-auth")
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(state_dir),
                                  "PIPELINE_CACHE_DIR": os.environ.get("PIPELINE_CACHE_DIR", "")
                                  or str(Path.home() / ".cache" / "image-pipeline")})
    infra = Infra(settings, Ports(kafka=free_port_pair(), postgres=settings.local_postgres_port))
    infra.up_lines = infra.up(with_postgres=False, kafka_auth=True)
    try:
        orchestrator = TopicAdmin(as_role(infra, "orchestrator"))
        orchestrator.create([ORCHESTRATOR_TOPIC, ANOMALIES_TOPIC])
        yield infra
    finally:
        infra.down()


def as_role(infra: Infra, role: str, password: str | None = None) -> Settings:
    """Settings whose clients log in to the broker as ``role``, as README's settings say."""
    return Settings.from_env({
        "PIPELINE_STATE_DIR": str(infra.settings.state_dir),
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka.bootstrap,
        "KAFKA_SECURITY_PROTOCOL": PROTOCOL,
        "KAFKA_SASL_MECHANISM": MECHANISM,
        "KAFKA_SASL_USERNAME": role,
        "KAFKA_SASL_PASSWORD": password or infra.kafka.users.password(role),
    })


@pytest.fixture
def order(infra: Infra):
    """A fresh order's task<ID> and resource<ID>, made and removed by the orchestrator role."""
    order_id = next(_order_ids)
    admin = TopicAdmin(as_role(infra, "orchestrator"))
    assert admin.create_exclusive(list(order_topics(order_id))) == set()
    yield order_id
    admin.delete(list(order_topics(order_id)))


def send(settings: Settings, message) -> None:
    with Producer(settings) as producer:
        producer.send_now(message, timeout=10)


def refused_sending(settings: Settings, message) -> str:
    with pytest.raises(KafkaClientError) as refused:
        send(settings, message)
    return str(refused.value)


def refused_login(settings: Settings) -> str:
    """What the broker says to a client that cannot log in (listing topics, quickly)."""
    with pytest.raises(KafkaClientError) as refused:
        TopicAdmin(settings).existing(timeout=3)
    return str(refused.value)


def read_keys(settings: Settings, topic: str, group: str, count: int, timeout: float = 15.0) -> list[str]:
    """The keys of the first ``count`` messages on ``topic``, read as ``group``, committed."""
    keys = []
    with Consumer(settings, group_id=group) as consumer:
        consumer.assign([topic], timeout=10)
        deadline = time.monotonic() + timeout
        while len(keys) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None:
                keys.append(message.key)
                consumer.mark_processed(message)
        consumer.commit()
    return keys


def progress(order_id: int) -> Message:
    """A task's PROGRESS (on ``orchestrator``)."""
    return Progress(order_id, "resize", 0, TaskStatus.SUCCEEDED, ("order/00-resize.png",)).encode()


def _anomaly(order_id: int) -> Message:
    return Deviation(order_id, "resize", 0, "cpu", 1_700_000_000_000, 2.0, 1.0, 0.5, 1.5, 3.0, "1").encode()


def test_passwords_are_private_and_never_shown(infra):
    home = infra.kafka.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for secret in ("users.env", "server.properties", "admin.properties"):
        assert stat.S_IMODE((home / secret).stat().st_mode) == 0o600, secret
    assert not list(home.glob("*.args")) and not list(home.glob(".*.tmp"))
    passwords = infra.kafka.users.passwords()
    assert sorted(passwords) == sorted(ROLES) and len(set(passwords.values())) == len(ROLES)
    shown = "\n".join(infra.up_lines + infra.status()) + process_cmdline(infra.kafka.status().pid)
    assert "SASL/SCRAM-SHA-512" in shown
    assert not any(password in shown for password in passwords.values())
    # The CLI acts as the orchestrator: infra.env carries its login, and only its.
    published = (infra.settings.state_dir / "infra.env").read_text()
    assert f"KAFKA_SECURITY_PROTOCOL={PROTOCOL}" in published and "KAFKA_SASL_USERNAME=orchestrator" in published
    assert passwords["orchestrator"] in published
    assert not any(passwords[role] in published for role in ROLES if role != "orchestrator")


def test_the_cli_logs_in_as_the_orchestrator(infra):
    settings = ensure_kafka(infra.settings.with_kafka(infra.kafka.bootstrap))
    assert settings.kafka_options["sasl.username"] == "orchestrator"
    assert {ORCHESTRATOR_TOPIC, ANOMALIES_TOPIC} <= TopicAdmin(settings).existing()


def test_orchestrator_runs_an_orders_topics(infra, order):
    orchestrator = as_role(infra, "orchestrator")
    send(as_role(infra, "task"), progress(order))
    send(orchestrator, OrderStopped(order).encode())  # STOP for a task that failed
    send(as_role(infra, "consumer"), MonitorTerminated(order).encode())
    assert read_keys(orchestrator, task_topic(order), "reader-auth-test", 2) == [Key.STOP.value, Key.TERMINATE.value]
    assert Key.PROGRESS.value in read_keys(orchestrator, ORCHESTRATOR_TOPIC, f"reader-auth-{order}", 1)
    assert set(order_topics(order)) <= TopicAdmin(orchestrator).existing()
    send(orchestrator, MonitorStopped(order).encode())  # an abandoned order's last samples
    assert REFUSED in refused_sending(orchestrator, _anomaly(order))  # live scoring's, not its


def test_task_writes_its_order_topic_and_progress_only(infra, order):
    task = as_role(infra, "task")
    send(task, progress(order))
    send(task, OrderStopped(order).encode())
    assert REFUSED in refused_sending(task, MonitorStopped(order).encode())
    with pytest.raises(KafkaClientError, match="TOPIC_AUTHORIZATION_FAILED"):
        TopicAdmin(task).create([task_topic(next(_order_ids))])
    with pytest.raises(KafkaClientError):  # it reads nothing
        with Consumer(task, group_id="monitor-producer-auth") as consumer:
            consumer.assign([task_topic(order)], timeout=2)


def test_sampler_reads_task_topics_and_writes_samples(infra, order):
    sampler = as_role(infra, "sampler")
    send(as_role(infra, "task"), OrderStopped(order).encode())
    assert read_keys(sampler, task_topic(order), f"monitor-producer-{order}", 1) == [Key.STOP.value]
    assert read_keys(sampler, task_topic(order), "monitor-sampler-auth-test", 1) == [Key.STOP.value]
    send(sampler, MonitorStopped(order).encode())
    assert REFUSED in refused_sending(sampler, progress(order))
    assert REFUSED in refused_sending(sampler, OrderStopped(order).encode())
    with pytest.raises(KafkaClientError, match="TOPIC_AUTHORIZATION_FAILED"):
        TopicAdmin(sampler).create([resource_topic(next(_order_ids))])


def test_consumer_reads_samples_and_answers(infra, order):
    consumer = as_role(infra, "consumer")
    send(as_role(infra, "sampler"), MonitorStopped(order).encode())
    assert read_keys(consumer, resource_topic(order), f"monitor-consumer-{order}", 1) == [Key.STOP.value]
    assert read_keys(consumer, resource_topic(order), "monitor-consumers-auth-test", 1) == [Key.STOP.value]
    send(consumer, MonitorTerminated(order).encode())
    send(consumer, _anomaly(order))
    TopicAdmin(consumer).create([ANOMALIES_TOPIC])  # live scoring makes sure it is there
    assert REFUSED in refused_sending(consumer, MonitorStopped(order).encode())
    assert REFUSED in refused_sending(consumer, progress(order))
    with pytest.raises(KafkaClientError, match="TOPIC_AUTHORIZATION_FAILED"):
        TopicAdmin(consumer).create([task_topic(next(_order_ids))])


def test_the_shared_monitors_log_in_as_their_roles(infra, order, tmp_path):
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(infra.settings.state_dir),
                                  "KAFKA_BOOTSTRAP_SERVERS": infra.kafka.bootstrap,
                                  "DATABASE_URL": f"sqlite:///{tmp_path / 'pipeline.db'}",
                                  "LIVE_SCORING": "off"})
    monitors = infra.monitors(with_role(settings, "orchestrator"))  # as `run` starts them
    monitors.start()
    try:
        users = {s.name: _environment(s.pid).get("KAFKA_SASL_USERNAME") for s in monitors.status()}
        # Each joined its group over order's topics: it logged in, and its ACLs let it.
        joined = _joined_groups(infra, ("monitor-sampler-", "monitor-consumers-"))
    finally:
        monitors.stop()
    assert users == {"sampler": "sampler", "consumer-1": "consumer"}
    assert joined == {"monitor-sampler-", "monitor-consumers-"}


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.partition("=")[::2] for entry in entries if entry)


def _joined_groups(infra: Infra, prefixes: tuple[str, ...], timeout: float = 30.0) -> set[str]:
    """Which of the groups named with ``prefixes`` have a member within ``timeout``."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(infra.kafka.client_config())  # the admin sees every group
    joined: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(joined) < len(prefixes) and time.monotonic() < deadline:
        groups = [g.group_id for g in admin.list_consumer_groups().result(10).valid]
        for group, future in (admin.describe_consumer_groups(groups).items() if groups else ()):
            if future.result(10).members:
                joined |= {p for p in prefixes if group.startswith(p)}
        time.sleep(0.5)
    return joined


def test_a_role_cannot_use_another_roles_groups(infra, order):
    send(as_role(infra, "task"), OrderStopped(order).encode())
    with Consumer(as_role(infra, "sampler"), group_id="reader-auth-test") as consumer:
        consumer.subscribe([task_topic(order)])
        with pytest.raises(KafkaClientError, match="Group authorization failed"):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                assert consumer.poll(0.5) is None


def test_a_wrong_password_is_refused(infra, caplog):
    producer = Producer(as_role(infra, "task", password="not-the-password"))  # not flushed when left
    with caplog.at_level(logging.ERROR, logger="librdkafka"), pytest.raises(KafkaClientError):
        producer.send_now(progress(1), timeout=3)
    assert "Authentication failed" in caplog.text and "invalid credentials" in caplog.text


def test_rotating_a_password(infra, order):
    old = infra.kafka.users.password("sampler")
    lines = infra.rotate_password("sampler")
    new = infra.kafka.users.password("sampler")
    assert new != old and not any(new in line or old in line for line in lines)
    send(as_role(infra, "sampler"), MonitorStopped(order).encode())
    refused_login(as_role(infra, "sampler", password=old))


def test_a_broker_made_without_users_gets_none_later(tmp_path):
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path)})
    broker = KafkaBroker(settings, port=free_port_pair())
    broker.data_dir.mkdir(parents=True)
    (broker.data_dir / "meta.properties").write_text("formatted without users\n")
    with pytest.raises(InfraError, match="without --kafka-auth"):
        broker.start(auth=True)
    assert not broker.users.exists()


def test_an_order_runs_end_to_end_with_every_process_in_its_own_role(infra, tmp_path):
    """The local runtime starts tasks as `task` and monitors as `sampler`/`consumer`: with the
    orchestrator's login alone, a task's PROGRESS would be refused."""
    from devkit.orders import child_env, stored_orders, write_order

    settings = dataclasses.replace(as_role(infra, "orchestrator"),
                                   database_url=f"sqlite:///{tmp_path / 'pipeline.db'}",
                                   artifact_dir=tmp_path / "artifacts")
    env = {**child_env(settings), "MONITORS": "per-order", "LIVE_SCORING": "off"}
    path = write_order(tmp_path, "in-roles", ["grayscale", "blur"])
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    order = stored_orders(settings)["in-roles"]
    assert order.status == "SUCCEEDED"
    assert {s["task"] for s in order.samples} == {"grayscale", "blur"}
    assert "authorization failed" not in (result.stdout + result.stderr).lower()
