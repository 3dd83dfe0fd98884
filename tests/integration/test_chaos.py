"""Faults while orders run, against real servers: malformed messages on every topic, a broker
restart, a database restart across a task boundary, an orchestrator killed outright.

The restarts use a broker and a PostgreSQL server of this module's own (on free ports), so
that restarting them disturbs no other test. What is asserted is what a user sees (the
console) and what is stored (every sample the order's producer put on ``resource<ID>``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db import connect
from pipeline.db.orders import OrderStore, RunStatus
from ops.infra.kafka_broker import KafkaBroker
from ops.infra.postgres import LocalPostgres
from pipeline.errors import ProtocolError
from pipeline.kafka import Producer, TopicAdmin
from pipeline.protocol import (
    ANOMALIES_TOPIC, ORCHESTRATOR_TOPIC, Message, Sample, decode_resource_topic, order_topics, resource_topic,
    task_topic,
)
from pipeline.settings import Settings
from devkit.orders import (
    all_stored_orders, pipeline_processes, run_orchestrator, start_orchestrator, write_order,
)
from devkit.servers import free_port, free_port_pair, fresh_database, settings_for
from devkit.waiting import PATIENCE, Output, read_to_end, wait_for
from tests.integration.test_order_flow import _wait_for_process

# A first task that runs for about 14 s (a CPU hog from its second second on), then a quick one.
LONG_THEN_SHORT = [{"name": "blur", "fault": "cpu_hog", "fault_at": 1.0}, "grayscale"]


@pytest.fixture(scope="module")
def own_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KafkaBroker, LocalPostgres]]:
    """A broker and a PostgreSQL server that only this module uses, so it may restart them."""
    state = tmp_path_factory.mktemp("chaos-infra")
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(state)})
    broker = KafkaBroker(settings, port=free_port_pair())
    postgres = LocalPostgres(settings, port=free_port())
    broker.start()
    try:
        postgres.start()
        try:
            yield broker, postgres
        finally:
            postgres.stop()
            shutil.rmtree(postgres.home, ignore_errors=True)
    finally:
        broker.stop()


@pytest.fixture
def own_settings(own_servers, tmp_path: Path) -> Iterator[Settings]:
    broker, postgres = own_servers
    with fresh_database(postgres.url) as url:
        yield settings_for({"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}, url, tmp_path)


def _running_order_id(settings: Settings) -> int:
    """The id of the order this test's orchestrator is running (its first task started)."""
    def running() -> int | None:
        try:
            found = [o for o in all_stored_orders(settings) if o.status == "RUNNING" and o.runs]
        except SQLAlchemyError:  # the orchestrator has not created the tables yet
            return None
        return found[0].id if found else None

    return wait_for(running, "an order started", every=0.2)


def _wait_for_samples_stored(settings: Settings, order_id: int) -> None:
    """Until samples of the order are stored: its monitors sample, publish and store."""
    store = OrderStore(connect(settings.database_url))
    wait_for(lambda: store.count_measurements(order_id) > 0, f"samples of order {order_id} stored", every=0.2)


def _keep_console(name: str, console: str) -> None:
    """With CHAOS_CONSOLE_DIR set, keep what the user saw (docs and closing notes quote it)."""
    folder = os.environ.get("CHAOS_CONSOLE_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.txt").write_text(console)


def _wait_for_task(settings: Settings, name: str) -> psutil.Process:
    return _wait_for_process(settings, lambda cmd: cmd[2:3] == [f"services.{name}.main"])


def _running(process: psutil.Process) -> bool:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def _assert_every_sample_stored(settings: Settings, order_id: int) -> None:
    """Every sample on ``resource<ID>`` is stored, once (the topic was kept to count them);
    then the topics go (a later test's fresh database reuses the id)."""
    produced = _valid_samples_on_topic(settings, order_id)
    order = next(o for o in all_stored_orders(settings) if o.id == order_id)
    stored = Counter((s["task"], s["resource"], s["ts"]) for s in order.samples)
    assert len(order.samples) == len(produced) > 20
    assert max(stored.values()) == 1
    TopicAdmin(settings).delete(list(order_topics(order_id)))


def _valid_samples_on_topic(settings: Settings, order_id: int) -> set[tuple[str, str, int, int]]:
    """Distinct well-formed samples on ``resource<ID>``: (task, resource, position, time)."""
    seen = set()
    for message in read_to_end(settings, resource_topic(order_id)):
        try:
            sample = decode_resource_topic(message, order_id)
        except ProtocolError:
            continue
        if isinstance(sample, Sample):
            seen.add((sample.task_name, sample.resource, sample.index, sample.timestamp_ms))
    return seen


MALFORMED = [
    ("ORDER", "not,a:valid order", ()),
    ("HALT", "", ()),
    ("PROGRESS", "{broken json", (("order_id", b"abc"),)),
    ("PROGRESS", "x", (("order_id", b"999999999"),)),
    ("blur:cpu", "not-a-number", ()),
    ("blur:cpu", "12.5", (("position", b"-3"),)),
    ("nonsense-key", "\x00\xff garbage", ()),
    ("", "", ()),
    ("STOP", "extra", (("order_id", b"1"),)),
]


def test_malformed_messages_on_every_topic_mid_order_lose_nothing(settings, tmp_path):
    path = write_order(tmp_path, "malformed", LONG_THEN_SHORT)
    orchestrator = start_orchestrator(settings, "--keep-topics", str(path))
    try:
        order_id = _running_order_id(settings)
        blur = _wait_for_task(settings, "blur")
        _wait_for_samples_stored(settings, order_id)  # the monitors are sampling and storing
        sent = 0
        with Producer(settings) as producer:
            for topic in (task_topic(order_id), resource_topic(order_id), ORCHESTRATOR_TOPIC, ANOMALIES_TOPIC):
                for key, value, headers in MALFORMED:
                    producer.send(Message(topic, key, value, headers=headers))
                    sent += 1
        # (on the broker now: leaving the producer flushed them)
        assert _running(blur), "the malformed messages came while the first task ran"
        out, err = orchestrator.communicate(timeout=PATIENCE * 2)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
    assert sent == 36
    _keep_console("malformed", out + err)
    assert orchestrator.returncode == 0, out + err
    order = next(o for o in all_stored_orders(settings) if o.id == order_id)
    assert order.status == "SUCCEEDED"
    assert {r["task"] for r in order.runs if r["status"] == "SUCCEEDED"} == {"blur", "grayscale"}
    _assert_every_sample_stored(settings, order_id)
    assert "Traceback" not in out + err


def test_a_broker_restart_mid_order_stores_every_sample_and_says_so_twice(own_servers, own_settings, tmp_path):
    broker, _ = own_servers
    path = write_order(tmp_path, "broker-restart", LONG_THEN_SHORT)
    orchestrator = start_orchestrator(own_settings, "--keep-topics", str(path))
    output = Output(orchestrator)
    try:
        order_id = _running_order_id(own_settings)
        blur = _wait_for_task(own_settings, "blur")
        _wait_for_samples_stored(own_settings, order_id)  # samples flow from task to database
        assert _running(blur), "the outage begins while the first task runs"
        broker.stop()
        output.wait_for_line("unreachable, retrying")  # the orchestrator has seen the outage
        broker.start()
        _, out, err = output.finish()
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        broker.start()  # whatever happened, later tests need it
    console = out + err
    _keep_console("broker-restart", console)
    assert orchestrator.returncode == 0, console
    order = next(o for o in all_stored_orders(own_settings) if o.id == order_id)
    assert order.status == "SUCCEEDED"
    _assert_every_sample_stored(own_settings, order_id)
    assert console.count("unreachable, retrying") == 1, console
    assert console.count("reachable again") == 1, console
    assert " ERROR " not in console and "Traceback" not in console, console


def test_a_database_restart_across_a_task_boundary_lets_the_order_complete(own_servers, own_settings, tmp_path):
    _, postgres = own_servers
    path = write_order(tmp_path, "database-restart", LONG_THEN_SHORT)
    orchestrator = start_orchestrator(own_settings, "--keep-topics", str(path))
    output = Output(orchestrator)
    try:
        order_id = _running_order_id(own_settings)
        blur = _wait_for_task(own_settings, "blur")
        _wait_for_samples_stored(own_settings, order_id)
        assert _running(blur), "the outage begins while the first task runs"
        postgres.stop()
        # The outage lasts until the orchestrator, at the first task's end, has met it: the
        # second task starts only once that end is recorded, after the outage.
        output.wait_for_line(f"order {order_id}: recording the end of task 1: database unreachable")
        assert not _running(blur), "the first task ended in the outage"
        postgres.start()
        _, out, err = output.finish()
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        postgres.start()
    console = out + err
    _keep_console("database-restart", console)
    assert orchestrator.returncode == 0, console
    order = next(o for o in all_stored_orders(own_settings) if o.id == order_id)
    assert order.status == "SUCCEEDED", console
    assert [r["task"] for r in order.runs if r["status"] == "SUCCEEDED"] == ["blur", "grayscale"]
    _assert_every_sample_stored(own_settings, order_id)
    assert "database unreachable" in console and "Traceback" not in console, console


def test_a_killed_orchestrators_order_is_marked_by_the_next_run(settings, tmp_path):
    dead_path = write_order(tmp_path, "killed", LONG_THEN_SHORT)
    orchestrator = start_orchestrator(settings, str(dead_path))
    try:
        dead_id = _running_order_id(settings)
        _wait_for_task(settings, "blur")
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(PATIENCE)
        wait_for(lambda: pipeline_processes(settings) == [], "every task and monitor gone", every=0.5)
        assert OrderStore(connect(settings.database_url)).get(dead_id).status is RunStatus.RUNNING

        next_path = write_order(tmp_path, "next", ["grayscale"])
        result = run_orchestrator(settings, str(next_path))
    finally:
        for process in pipeline_processes(settings):
            process.kill()
    assert result.returncode == 0, result.stdout + result.stderr
    console = result.stdout + result.stderr
    _keep_console("killed-orchestrator", console)
    assert f"order {dead_id} killed: was RUNNING, but its orchestrator is gone; marked FAILED" in console, console
    orders = {o.name: o for o in all_stored_orders(settings)}
    dead = OrderStore(connect(settings.database_url)).get(dead_id)
    assert dead.status is RunStatus.FAILED and "without recording" in dead.error
    assert [r["status"] for r in orders["killed"].runs] == ["FAILED"]
    assert orders["next"].status == "SUCCEEDED"
    assert not set(order_topics(dead_id)) & TopicAdmin(settings).existing()
    assert pipeline_processes(settings, dead_id) == []


def test_a_database_away_longer_than_the_retry_time_fails_the_order_and_the_next_run_stores_the_rest(
        own_servers, own_settings, tmp_path):
    _, postgres = own_servers
    impatient = dataclasses.replace(own_settings, db_retry_seconds=3.0)
    path = write_order(tmp_path, "database-gone", LONG_THEN_SHORT)
    orchestrator = start_orchestrator(impatient, str(path))
    try:
        order_id = _running_order_id(impatient)
        blur = _wait_for_task(impatient, "blur")
        _wait_for_samples_stored(impatient, order_id)
        assert _running(blur), "the outage begins while the first task runs"
        postgres.stop()
        out, err = orchestrator.communicate(timeout=PATIENCE * 2)
        left_on_topic = _valid_samples_on_topic(impatient, order_id)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        postgres.start()
    console = out + err
    _keep_console("database-gone", console)
    assert orchestrator.returncode == 1, console
    assert "the database has been unreachable for 3s" in console and "Traceback" not in console, console
    assert f"order {order_id} database-gone: FAILED after" in console and "but not recorded" in console
    assert OrderStore(connect(impatient.database_url)).get(order_id).status is RunStatus.RUNNING

    next_path = write_order(tmp_path, "after", ["grayscale"])
    result = run_orchestrator(own_settings, str(next_path))
    console = result.stdout + result.stderr
    _keep_console("database-gone-next-run", console)
    assert result.returncode == 0, console
    assert f"order {order_id} database-gone: was RUNNING, but its orchestrator is gone; marked FAILED" in console
    order = next(o for o in all_stored_orders(own_settings) if o.id == order_id)
    assert order.status == "FAILED"
    assert len(order.samples) == len(left_on_topic) > 20  # nothing the monitors sent is lost
    assert not set(order_topics(order_id)) & TopicAdmin(own_settings).existing()
    assert pipeline_processes(own_settings, order_id) == []
