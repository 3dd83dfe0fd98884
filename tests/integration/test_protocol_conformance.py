"""The messages of a real run, read back from Kafka and held against the protocol table of docs/protocol.md.

Two orders run at once through ``python -m orchestrator run --keep-topics``: ``main`` repeats
a task (blur, blur, grayscale), ``other`` runs different tasks on a different image. Then every
message on their ``task<ID>`` and ``resource<ID>`` topics and their PROGRESS messages on
``orchestrator`` are read from the beginning and checked exactly: keys, values, headers,
order, timestamps; the stored measurements must be exactly the samples sent, and neither
order may see the other's messages. Outputs go to a folder whose name holds ``:`` and a space,
so the percent-encoding of outputs is exercised for real.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import confluent_kafka
import psycopg2
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url

from pipeline.db.schema import measurements, orders, resources, tasks
from pipeline.kafka import TopicAdmin
from pipeline.kafka.config import client_config
from pipeline.protocol import (
    ORCHESTRATOR_TOPIC, RESOURCES, MonitorStopped, MonitorTerminated, Message, OrderStopped,
    Progress, Sample, TaskHalted, TaskStarted, TaskStatus, decode_resource_topic, decode_task_topic,
    order_topics,
)
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "orders" / "images"
CLI_TIMEOUT = 180
DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")


@dataclass
class OrderUnderTest:
    """One order of the run and everything read back about it."""

    name: str
    image: Path
    tasks: tuple[str, ...]
    id: int = 0
    task_topic: list[Message] = field(default_factory=list)
    resource_topic: list[Message] = field(default_factory=list)
    progress: list[Message] = field(default_factory=list)  # its PROGRESS on `orchestrator`

    @property
    def required_tasks(self) -> str:
        return ",".join(self.tasks)

    @property
    def samples(self) -> list[Message]:
        return [m for m in self.resource_topic if m.key != "STOP"]


@dataclass
class Run:
    settings: Settings
    result: subprocess.CompletedProcess
    began_ms: int
    ended_ms: int
    orders: dict[str, OrderUnderTest]


ORDERS = ("main", "other")


def _fresh_database(server_url: str) -> tuple[str, Callable[[], None]]:
    """A new empty database on the test server, and the function that drops it."""
    server = make_url(server_url)
    name = f"test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(host=server.host, port=server.port, user=server.username,
                            password=server.password, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()

    return server.set(database=name).render_as_string(hide_password=False), drop


def _write_order(folder: Path, order: OrderUnderTest) -> Path:
    path = folder / f"{order.name}.json"
    path.write_text(json.dumps({"id": order.name, "image": str(order.image), "tasks": list(order.tasks)}))
    return path


def _env(settings: Settings) -> dict[str, str]:
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(REPO)
    return env


def _read_topic(settings: Settings, topic: str) -> list[Message]:
    """Every message on ``topic``, from the beginning to the current end, partition by partition."""
    consumer = confluent_kafka.Consumer(client_config(
        settings, **{"group.id": f"conformance-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}))
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        assert metadata.error is None, f"{topic}: {metadata.error}"
        messages = []
        for partition in sorted(metadata.partitions):
            low, high = consumer.get_watermark_offsets(confluent_kafka.TopicPartition(topic, partition), timeout=10)
            if high <= low:
                continue
            consumer.assign([confluent_kafka.TopicPartition(topic, partition, low)])
            while True:
                raw = consumer.poll(10)
                assert raw is not None, f"{topic}[{partition}]: timed out before offset {high - 1}"
                if raw.error() is not None:
                    if raw.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(f"{topic}: {raw.error().str()}")
                ts_type, ts = raw.timestamp()
                messages.append(Message(
                    topic=raw.topic(), key=(raw.key() or b"").decode(), value=(raw.value() or b"").decode(),
                    headers=tuple(raw.headers() or ()),
                    timestamp_ms=ts if ts_type != confluent_kafka.TIMESTAMP_NOT_AVAILABLE else None,
                    partition=raw.partition(), offset=raw.offset(),
                ))
                if raw.offset() >= high - 1:
                    break
        return messages
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def run(infra_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Both orders run once, concurrently; all their messages read back."""
    root = tmp_path_factory.mktemp("conformance")
    database_url, drop_database = _fresh_database(infra_env["DATABASE_URL"])
    settings = Settings.from_env({
        "KAFKA_BOOTSTRAP_SERVERS": infra_env["KAFKA_BOOTSTRAP_SERVERS"],
        "DATABASE_URL": database_url,
        "PIPELINE_STATE_DIR": str(root / "state"),
        "ARTIFACT_DIR": str(root / "artifacts 12:00"),  # ':' and ' ' must be percent-encoded
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    })
    under_test = {
        "main": OrderUnderTest("conformance-main", IMAGES / "scene-640x480.jpg", ("blur", "blur", "grayscale")),
        "other": OrderUnderTest("conformance-other", IMAGES / "pattern-320x320.png", ("sharpen", "flip")),
    }
    files = [str(_write_order(root, order)) for order in under_test.values()]
    began_ms = int(time.time() * 1000)
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--keep-topics", *files],
                            cwd=REPO, env=_env(settings), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    ended_ms = math.ceil(time.time() * 1000)
    admin = TopicAdmin(settings)
    try:
        assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
        engine = create_engine(database_url)
        with engine.connect() as conn:
            ids = dict(conn.execute(select(orders.c.name, orders.c.id)).all())
        engine.dispose()
        # The shared topic also holds earlier tests' PROGRESS, whose fresh databases reuse
        # the same order ids: only this run's window counts.
        progress = [m for m in _read_topic(settings, ORCHESTRATOR_TOPIC)
                    if began_ms <= m.timestamp_ms <= ended_ms]
        for order in under_test.values():
            order.id = ids[order.name]
            task_topic, resource_topic = order_topics(order.id)
            order.task_topic = _read_topic(settings, task_topic)
            order.resource_topic = _read_topic(settings, resource_topic)
            order.progress = [m for m in progress if m.header("order_id") == str(order.id)]
        yield Run(settings, result, began_ms, ended_ms, under_test)
    finally:
        admin.delete([t for order in under_test.values() if order.id for t in order_topics(order.id)])
        drop_database()


def _positions(order: OrderUnderTest) -> list[tuple[int, str, int]]:
    """(position, task name, ORDER timestamp) of each task run, from task<ID>."""
    started = [m for m in order.task_topic if m.key == "ORDER"]
    return [(i, order.tasks[i], m.timestamp_ms) for i, m in enumerate(started)]


# --- the run as a whole -------------------------------------------------------------------


def test_both_orders_succeed_at_the_same_time_each_with_its_own_id(run: Run):
    main, other = run.orders["main"], run.orders["other"]
    assert main.id != other.id
    for order in (main, other):
        assert re.search(rf"^order {order.id} {order.name} \(.*\): SUCCEEDED", run.result.stdout, re.M), \
            run.result.stdout
    engine = create_engine(run.settings.database_url)
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(orders))}
    engine.dispose()
    assert {rows[main.id].status, rows[other.id].status} == {"SUCCEEDED"}
    # The cross-talk checks below only mean something if the two really overlapped.
    assert rows[main.id].started_at < rows[other.id].finished_at
    assert rows[other.id].started_at < rows[main.id].finished_at


# --- task<ID> -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ORDERS)
def test_task_topic_is_order_halt_per_task_then_stop_then_terminate(run: Run, which: str):
    order = run.orders[which]
    expected = ["ORDER", "HALT"] * len(order.tasks) + ["STOP", "TERMINATE"]
    assert [m.key for m in order.task_topic] == expected
    assert [m.value for m in order.task_topic if m.key != "ORDER"] == \
           ["HALT"] * len(order.tasks) + ["STOP", "TERMINATE"]


def test_order_values_are_required_tasks_task_name_and_order_id(run: Run):
    main = run.orders["main"]
    assert [m.value for m in main.task_topic if m.key == "ORDER"] == [
        f"blur,blur,grayscale:blur:{main.id}",
        f"blur,blur,grayscale:blur:{main.id}",
        f"blur,blur,grayscale:grayscale:{main.id}",
    ]
    other = run.orders["other"]
    assert [m.value for m in other.task_topic if m.key == "ORDER"] == [
        f"sharpen,flip:sharpen:{other.id}",
        f"sharpen,flip:flip:{other.id}",
    ]


@pytest.mark.parametrize("which", ORDERS)
def test_order_headers_name_each_tasks_own_process_and_host(run: Run, which: str):
    started = [m for m in run.orders[which].task_topic if m.key == "ORDER"]
    pids = [m.header("pid") for m in started]
    assert all(pid is not None and pid.isdigit() and int(pid) > 0 for pid in pids), pids
    assert len(set(pids)) == len(pids), f"each task runs as its own process: {pids}"
    assert all(m.header("host") for m in started)


# --- orchestrator -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ORDERS)
def test_one_progress_per_task_with_all_outputs_so_far(run: Run, which: str):
    order = run.orders[which]
    assert [m.key for m in order.progress] == ["PROGRESS"] * len(order.tasks)
    artifacts = run.settings.artifact_dir / f"order-{order.id}"
    previous: list[str] = []
    for index, (message, task) in enumerate(zip(order.progress, order.tasks)):
        assert (message.header("order_id"), message.header("task"), message.header("index"),
                message.header("status")) == (str(order.id), task, str(index), "succeeded")
        parts = message.value.split(":")  # an output holds no raw ':', so this splits exactly
        assert len(parts) == index + 1, message.value
        assert parts[:-1] == previous, "earlier outputs are repeated unchanged"
        output = Path(unquote(parts[-1]))
        assert output.is_file(), output
        assert output.parent == artifacts, output
        assert ":" in str(output), "the artifact folder's ':' came through the encoding"
        previous = parts


# --- resource<ID> -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ORDERS)
def test_resource_topic_is_samples_then_one_stop(run: Run, which: str):
    order = run.orders[which]
    assert order.samples, "no samples at all"
    assert [(m.key, m.value) for m in order.resource_topic[len(order.samples):]] == [("STOP", "STOP")]


@pytest.mark.parametrize("which", ORDERS)
def test_samples_have_the_composite_key_a_decimal_value_and_the_sample_time(run: Run, which: str):
    order = run.orders[which]
    for message in order.samples:
        required, task, order_id, resource = message.key.split(":")
        assert (required, order_id) == (order.required_tasks, str(order.id)), message.key
        assert task in order.tasks and resource in RESOURCES, message.key
        assert DECIMAL.fullmatch(message.value), f"{message.key}: {message.value!r} is not a plain decimal"
        value = float(message.value)
        assert math.isfinite(value) and value >= 0, message.value
        assert run.began_ms <= message.timestamp_ms <= run.ended_ms, \
            f"{message.key}: timestamp {message.timestamp_ms} outside the run"


@pytest.mark.parametrize("which", ORDERS)
def test_every_task_run_is_sampled_for_every_resource_under_its_own_name(run: Run, which: str):
    """Samples name only the task, so the two blurs are told apart by time: a sample belongs to
    the task whose ORDER came last before it."""
    order = run.orders[which]
    positions = _positions(order)
    seen: dict[int, set[str]] = defaultdict(set)
    for message in order.samples:
        _, task, _, resource = message.key.split(":")
        before = [p for p in positions if p[2] <= message.timestamp_ms]
        assert before, f"sample at {message.timestamp_ms} before the first task started"
        position, running, _ = before[-1]
        assert task == running, f"sample names {task} while task {position} ({running}) ran"
        seen[position].add(resource)
    assert {p: seen[p] for p, _, _ in positions} == {p: set(RESOURCES) for p, _, _ in positions}


# --- storage ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ORDERS)
def test_stored_measurements_are_exactly_the_samples_sent(run: Run, which: str):
    order = run.orders[which]
    engine = create_engine(run.settings.database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(tasks.c.name, resources.c.name, measurements.c.value, measurements.c.ts)
            .join(tasks, tasks.c.id == measurements.c.task_id)
            .join(resources, resources.c.id == measurements.c.resource_id)
            .where(measurements.c.order_id == order.id)
        ).all()
    engine.dispose()
    assert len(rows) == len(order.samples)
    stored = sorted((task, resource, value, round(ts.timestamp() * 1000)) for task, resource, value, ts in rows)
    sent = sorted((m.key.split(":")[1], m.key.split(":")[3], float(m.value), m.timestamp_ms)
                  for m in order.samples)
    assert stored == sent


# --- isolation and decoding ---------------------------------------------------------------


def test_concurrent_orders_never_see_each_others_messages(run: Run):
    for order in run.orders.values():
        named = {m.value.split(":")[2] for m in order.task_topic if m.key == "ORDER"}
        named |= {m.key.split(":")[2] for m in order.samples}
        assert named == {str(order.id)}, f"{order.name}'s topics name orders {named}"
        assert {m.key.split(":")[0] for m in order.samples} == {order.required_tasks}
        folders = {Path(unquote(part)).parent.name for m in order.progress for part in m.value.split(":")}
        assert folders == {f"order-{order.id}"}, f"{order.name}'s PROGRESS lists outputs of {folders}"
    all_progress = [m for m in _read_topic(run.settings, ORCHESTRATOR_TOPIC)
                    if m.header("order_id") in {str(o.id) for o in run.orders.values()}
                    and run.began_ms <= m.timestamp_ms <= run.ended_ms]
    assert len(all_progress) == sum(len(o.tasks) for o in run.orders.values())


@pytest.mark.parametrize("which", ORDERS)
def test_the_protocol_decoders_accept_every_message(run: Run, which: str):
    order = run.orders[which]
    decoded = [decode_task_topic(m, order.id) for m in order.task_topic]
    assert [type(d) for d in decoded] == \
           [TaskStarted, TaskHalted] * len(order.tasks) + [OrderStopped, MonitorTerminated]
    started = [d for d in decoded if isinstance(d, TaskStarted)]
    assert [(d.required_tasks, d.task_name, d.order_id) for d in started] == \
           [(order.tasks, task, order.id) for task in order.tasks]

    samples = [decode_resource_topic(m, order.id) for m in order.resource_topic]
    assert all(isinstance(s, Sample) for s in samples[:-1]) and isinstance(samples[-1], MonitorStopped)

    progress = [Progress.decode(m) for m in order.progress]
    assert [(p.order_id, p.task, p.index, p.status) for p in progress] == \
           [(order.id, task, i, TaskStatus.SUCCEEDED) for i, task in enumerate(order.tasks)]
    assert [len(p.outputs) for p in progress] == list(range(1, len(order.tasks) + 1))
    assert all(Path(output).is_file() for p in progress for output in p.outputs)
