"""The cluster's Kafka as ``k8s/kafka.yaml`` runs it, on this machine: its ``broker.sh`` formats
the log directory with the SCRAM users of the Secrets ``deploy`` makes and starts the broker
with its ``server.properties`` (only the ports, the host and the log directory changed), its
``create-acls.sh`` adds the ACLs of ``acls.txt``, and then every role may do what the pipeline's
code does with its credentials and is refused the rest.

The broker runs from the jars of the local broker (``ops/infra/kafka_broker.py``); the
image's ``kafka-storage.sh`` and ``kafka-server-start.sh`` are stand-ins that start the same
classes. ``kafka-acls.sh`` is a stand-in that records its arguments; the test creates the ACLs
those arguments ask for through the Admin API, as the real tool would.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import confluent_kafka
import pytest
from confluent_kafka.admin import (
    AclBinding, AclBindingFilter, AclOperation, AclPermissionType, AdminClient, NewTopic, ResourcePatternType,
    ResourceType,
)

from devkit.servers import free_port
from ops import deploy
from pipeline.cluster_roles import KAFKA_USERS, kafka_secret
from ops.infra.kafka_broker import KafkaBroker
from pipeline.settings import Settings

K8S = Path(__file__).resolve().parents[3] / "k8s"
CLUSTER_ID = "ImPpLnK8sKfKa4Ab1cD2eQ"
logger = logging.getLogger(__name__)


@dataclass
class Broker:
    bootstrap: str
    prefix: str  # TOPIC_PREFIX of this test
    settings: dict[str, str]  # the ConfigMap pipeline-settings
    passwords: dict[str, str]  # user -> password, from its Secret
    acl_calls: list[list[str]]  # the arguments of every kafka-acls.sh run

    def config(self, user: str, password: str | None = None, **extra) -> dict:
        """librdkafka's settings of a pod of ``user``: the ConfigMap plus its Secret, through
        the pipeline's Settings."""
        settings = Settings.from_env({
            **self.settings, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "TOPIC_PREFIX": self.prefix,
            "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": password or self.passwords[user],
            "PIPELINE_STATE_DIR": "/nonexistent"})
        return {"bootstrap.servers": settings.kafka_bootstrap_servers, **settings.kafka_options,
                "logger": logger, **extra}

    def topic(self, logical: str) -> str:
        return self.prefix + logical


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Broker]:
    folder = tmp_path_factory.mktemp("cluster-kafka")
    state = Settings.from_env({"PIPELINE_STATE_DIR": str(folder / "state"),
                               "PIPELINE_CACHE_DIR": os.environ.get("PIPELINE_CACHE_DIR", "")
                               or str(Path.home() / ".cache" / "image-pipeline")})
    jars = KafkaBroker(state)
    jars.ensure_jars()
    java = shutil.which("java")
    assert java, "the Kafka tests need a Java 17+ runtime"
    port, controller = free_port(), free_port()

    objects = {(o["kind"], o["metadata"]["name"]): o for o in deploy.render(K8S)}
    scripts = folder / "scripts"
    scripts.mkdir()
    for name, text in objects[("ConfigMap", "kafka-config")]["data"].items():
        if name == "server.properties":
            text = (text.replace("://:9092", f"://127.0.0.1:{port}").replace(":9092", f":{port}")
                    .replace("://:9093", f"://127.0.0.1:{controller}").replace("localhost:9093", f"127.0.0.1:{controller}")
                    .replace("/var/lib/kafka/data/kraft-logs", str(folder / "data")))
        (scripts / name).write_text(text)
    # The Secrets kafka-<user> as the pod sees them: <user>/username and <user>/password.
    made = {s["metadata"]["name"]: s["stringData"] for s in deploy.role_secrets("ns", {})}
    passwords = {}
    for user in KAFKA_USERS:
        data = made[kafka_secret(user)]
        (folder / "users" / user).mkdir(parents=True)
        (folder / "users" / user / "username").write_text(data["KAFKA_SASL_USERNAME"])
        (folder / "users" / user / "password").write_text(data["KAFKA_SASL_PASSWORD"])
        passwords[data["KAFKA_SASL_USERNAME"]] = data["KAFKA_SASL_PASSWORD"]
    bin_dir = folder / "kafka" / "bin"
    bin_dir.mkdir(parents=True)
    classpath = f"{jars.libs_dir}/*"
    _stub(bin_dir / "kafka-storage.sh", f'exec "{java}" -cp "{classpath}" kafka.tools.StorageTool "$@"\n')
    _stub(bin_dir / "kafka-server-start.sh",
          f'exec "{java}" -Xms256m -Xmx512m -cp "{classpath}" kafka.Kafka "$@"\n')
    _stub(bin_dir / "kafka-acls.sh", 'n=$(ls "$ACL_CALLS" | wc -l)\nprintf "%s\\n" "$@" > "$ACL_CALLS/$n"\n')
    (folder / "run").mkdir()
    (folder / "calls").mkdir()
    env = {**os.environ, "KAFKA_HOME": str(folder / "kafka"), "KAFKA_SCRIPTS": str(scripts),
           "KAFKA_USERS_DIR": str(folder / "users"), "KAFKA_CONFIG_DIR": str(folder / "run"),
           "CLUSTER_ID": CLUSTER_ID, "KAFKA_ADVERTISED_HOST": "127.0.0.1", "ACL_CALLS": str(folder / "calls")}

    formatted = subprocess.run(["sh", str(scripts / "broker.sh"), "format"], env=env, capture_output=True,
                               text=True, timeout=120)
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    assert (folder / "run" / "server.properties").stat().st_mode & 0o077 == 0, "it holds the admin's password"
    with open(folder / "broker.log", "wb") as log:
        process = subprocess.Popen(["sh", str(scripts / "broker.sh"), "start"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    prefix = f"t{secrets.token_hex(3)}."
    settings = objects[("ConfigMap", "pipeline-settings")]["data"]
    found = Broker(f"127.0.0.1:{port}", prefix, settings, passwords, [])
    try:
        admin = AdminClient(found.config("admin"))
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (folder / "broker.log").read_text()[-3000:]
            try:
                admin.list_topics(timeout=2)
                break
            except confluent_kafka.KafkaException:
                assert time.monotonic() < deadline, (folder / "broker.log").read_text()[-3000:]
                time.sleep(0.5)

        acls = subprocess.run(["sh", str(scripts / "create-acls.sh")], capture_output=True, text=True,
                              timeout=60, env={**env, "KAFKA_BOOTSTRAP_SERVERS": found.bootstrap,
                                               "TOPIC_PREFIX": prefix})
        assert acls.returncode == 0, acls.stdout + acls.stderr
        calls = sorted((folder / "calls").iterdir(), key=lambda p: int(p.name))
        found.acl_calls = [p.read_text().splitlines() for p in calls]
        bindings = [b for call in found.acl_calls if "--add" in call for b in _bindings(call)]
        for future in admin.create_acls(bindings).values():
            future.result(30)
        yield found
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _bindings(call: list[str]) -> list[AclBinding]:
    """The ACLs one ``kafka-acls.sh --add`` asks for, as kafka-acls.sh makes them."""
    options: dict[str, list[str]] = {}
    for flag, value in zip(call, call[1:]):
        if flag.startswith("--") and not value.startswith("--"):
            options.setdefault(flag, []).append(value)
    resource = ResourceType.TOPIC if "--topic" in options else ResourceType.GROUP
    name = (options.get("--topic") or options["--group"])[0]
    pattern = ResourcePatternType[options["--resource-pattern-type"][0].upper()]
    return [AclBinding(resource, name, pattern, options["--allow-principal"][0], "*", AclOperation[op.upper()],
                       AclPermissionType.ALLOW) for op in options["--operation"]]


# ------------------------------------------------------------------ clients

def produce(config: dict, topic: str, idempotent: bool = False) -> str:
    """``ok``, or the name of the error the delivery report gave."""
    reports = []
    producer = confluent_kafka.Producer({**config, "enable.idempotence": idempotent, "message.timeout.ms": 15000})
    producer.produce(topic, b"value", key=b"key", on_delivery=lambda error, _message: reports.append(error))
    producer.flush(20)
    if not reports:
        return "no report"
    return "ok" if reports[0] is None else reports[0].name()


class _Lines:
    """librdkafka's log lines of one client."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, _level: int, message: str, *args) -> None:
        self.lines.append(message % args if args else message)


def consume(config: dict, group: str, topic: str) -> str:
    """Read one message of ``topic`` in ``group`` and commit it: ``ok``, or the error's name."""
    # A group the user may not use shows only in librdkafka's group log (it keeps looking for
    # the group's coordinator), so that log is read.
    lines = _Lines()
    consumer = confluent_kafka.Consumer({**config, "group.id": group, "enable.auto.commit": False,
                                         "logger": lines, "debug": "cgrp"})
    partition = confluent_kafka.TopicPartition(topic, 0)
    try:
        deadline = time.monotonic() + 20
        while True:  # what a reader asks first: its group's committed offsets
            try:
                consumer.committed([partition], timeout=1)
                break
            except confluent_kafka.KafkaException as exc:  # also: the coordinator still loading
                consumer.poll(0.2)  # hands over the log lines
                if any("GROUP_AUTHORIZATION_FAILED" in line for line in lines.lines):
                    return "GROUP_AUTHORIZATION_FAILED"
                if time.monotonic() > deadline:
                    return exc.args[0].name()
        consumer.assign([confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                return message.error().name()
            consumer.commit(message=message, asynchronous=False)
            return "ok"
        return "nothing read"
    except confluent_kafka.KafkaException as exc:
        return exc.args[0].name()
    finally:
        consumer.close()


def admin_call(config: dict, action: str, topic: str) -> str:
    """Create or delete ``topic``: ``ok``, or the error's name."""
    admin = AdminClient(config)
    futures = (admin.create_topics([NewTopic(topic, 1, 1)], operation_timeout=15) if action == "create"
               else admin.delete_topics([topic], operation_timeout=15))
    try:
        futures[topic].result(20)
        return "ok"
    except confluent_kafka.KafkaException as exc:
        return exc.args[0].name()


# ------------------------------------------------------------------ the tests

def test_each_user_signs_in_with_its_secret_and_nobody_else_does(broker):
    for user in KAFKA_USERS:
        AdminClient(broker.config(user)).list_topics(timeout=10)  # raises when refused
    refused = {
        "a wrong password": broker.config("task", password="not-the-password-of-task"),
        "an unknown user": broker.config("mallory", password=broker.passwords["task"]),
        "no SASL at all": {"bootstrap.servers": broker.bootstrap, "logger": logger},
        "SASL PLAIN, not SCRAM": {**broker.config("task"), "sasl.mechanism": "PLAIN"},
    }
    for what, config in refused.items():
        with pytest.raises(confluent_kafka.KafkaException):
            AdminClient(config).list_topics(timeout=4)
        assert what


def test_the_acl_job_adds_exactly_acls_txt_under_the_topic_prefix(broker):
    listed = [call for call in broker.acl_calls if "--list" in call]
    added = [call for call in broker.acl_calls if "--add" in call]
    assert len(listed) == 1 and listed == broker.acl_calls[:1], "it waits for the broker first"
    table = deploy.render(K8S)
    acls_txt = next(o for o in table if o["metadata"]["name"] == "kafka-config")["data"]["acls.txt"]
    expected = set()
    for line in acls_txt.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            user, resource, pattern, name, operations = line.split()
            name = broker.prefix + name if resource == "topic" else name
            expected |= {(f"User:{user}", resource.upper(), name, pattern.upper(), op.upper())
                         for op in operations.split(",")}
    assert len(added) == len(acls_txt.strip().splitlines()) - 1
    for call in added:
        assert call[call.index("--command-config") + 1].endswith("admin.properties")
    admin = AdminClient(broker.config("admin"))
    stored = admin.describe_acls(AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                                                  AclOperation.ANY, AclPermissionType.ANY)).result(30)
    assert {(b.principal, b.restype.name, b.name, b.resource_pattern_type.name, b.operation.name)
            for b in stored} == expected
    assert all(b.permission_type == AclPermissionType.ALLOW and b.host == "*" for b in stored)


def test_every_role_may_do_what_it_does_and_nothing_else(broker):
    t = broker.topic
    orchestrator, task, sampler, consumer = (broker.config(user) for user in ("orchestrator", "task", "sampler", "consumer"))
    results: dict[str, str] = {}

    def check(what: str, outcome: str, expected: str = "ok") -> None:
        results[what] = f"{outcome} (expected {expected})"
        assert outcome == expected, what

    # The orchestrator creates its topics and an order's, and starts the order.
    for name in ("orchestrator", "anomalies", "task7", "resource7"):
        check(f"orchestrator creates {name}", admin_call(orchestrator, "create", t(name)))
    check("orchestrator sends ORDER on task7", produce(orchestrator, t("task7"), idempotent=True))
    # The task reports (idempotence off, as services/runtime/runner.py).
    check("task sends PROGRESS on orchestrator", produce(task, t("orchestrator")))
    check("task sends HALT on task7", produce(task, t("task7")))
    # The sampler reads its order's task topic in its group and samples (idempotent producer).
    check("sampler reads task7", consume(sampler, "monitor-producer-7", t("task7")))
    check("sampler sends samples on resource7", produce(sampler, t("resource7"), idempotent=True))
    # The consumer stores the samples (per order, or shared), confirms, reports anomalies.
    check("consumer reads resource7", consume(consumer, "monitor-consumer-7", t("resource7")))
    check("shared consumer reads resource7", consume(consumer, "monitor-consumers-0123abcd", t("resource7")))
    check("consumer sends TERMINATE on task7", produce(consumer, t("task7")))
    check("consumer sends an anomaly", produce(consumer, t("anomalies")))
    check("consumer makes sure anomalies exists", admin_call(consumer, "create", t("anomalies")),
          "TOPIC_ALREADY_EXISTS")
    # The orchestrator follows the order and relays a STOP.
    check("orchestrator reads orchestrator", consume(orchestrator, "reader-0123456789ab", t("orchestrator")))
    check("orchestrator reads task7", consume(orchestrator, "reader-0123456789ab", t("task7")))
    check("orchestrator reads anomalies", consume(orchestrator, "reader-ba9876543210", t("anomalies")))
    check("orchestrator sends STOP on resource7", produce(orchestrator, t("resource7"), idempotent=True))

    refused_topic, refused_group = "TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED"
    for what, outcome, expected in [
        ("task writes resource7", produce(task, t("resource7")), refused_topic),
        ("task writes anomalies", produce(task, t("anomalies")), refused_topic),
        ("task reads task7", consume(task, "reader-x", t("task7")), refused_group),
        ("task creates a topic", admin_call(task, "create", t("task8")), refused_topic),
        ("task deletes task7", admin_call(task, "delete", t("task7")), refused_topic),
        ("sampler writes task7", produce(sampler, t("task7")), refused_topic),
        ("sampler writes orchestrator", produce(sampler, t("orchestrator")), refused_topic),
        ("sampler reads resource7", consume(sampler, "monitor-producer-7", t("resource7")), refused_topic),
        ("sampler reads in another's group", consume(sampler, "monitor-consumer-7", t("task7")), refused_group),
        ("consumer reads task7", consume(consumer, "monitor-consumer-7", t("task7")), refused_topic),
        ("consumer writes orchestrator", produce(consumer, t("orchestrator")), refused_topic),
        ("consumer writes resource7", produce(consumer, t("resource7")), refused_topic),
        ("consumer deletes resource7", admin_call(consumer, "delete", t("resource7")), refused_topic),
        ("consumer creates a topic", admin_call(consumer, "create", t("task8")), refused_topic),
        ("orchestrator writes anomalies", produce(orchestrator, t("anomalies")), refused_topic),
        ("orchestrator reads resource7", consume(orchestrator, "reader-0123456789ab", t("resource7")), refused_topic),
        ("orchestrator reads in a monitor's group", consume(orchestrator, "monitor-consumer-7", t("task7")),
         refused_group),
        ("orchestrator creates another topic", admin_call(orchestrator, "create", t("other")), refused_topic),
        # The prefix bounds every role: the same names without it are another deployment's.
        ("orchestrator creates task9 outside its prefix", admin_call(orchestrator, "create", "task9"),
         refused_topic),
        ("task writes orchestrator outside its prefix", produce(task, "orchestrator"), refused_topic),
    ]:
        check(what, outcome, expected)

    # The order ends: the orchestrator removes its topics.
    for name in ("task7", "resource7"):
        check(f"orchestrator deletes {name}", admin_call(orchestrator, "delete", t(name)))
