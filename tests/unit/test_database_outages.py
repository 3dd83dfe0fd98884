"""Riding out a lost database, and finding the orders whose orchestrator died.

The retry tests use a real SQLite database and a real PostgreSQL driver error for a refused
connection (a port where nothing listens); the restart of a real PostgreSQL server mid-order
is in tests/integration/test_chaos.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import OperationalError

from devkit.servers import free_port
from devkit.waiting import PATIENCE, wait_for
from pipeline.db import connect, create_schema
from pipeline.db import retry as retry_module
from pipeline.db.orders import OrderStore, RunStatus, utcnow
from pipeline.db.owners import HEARTBEAT_SECONDS, MISSED_BEATS, Owner
from pipeline.db.retry import connection_lost, retrying
from pipeline.db.schema import orders, task_runs
from pipeline.errors import DatabaseError


@pytest.fixture
def engine(tmp_path: Path):
    engine = connect(f"sqlite:///{tmp_path / 'pipeline.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


def _refused_connection_error() -> OperationalError:
    engine = create_engine(f"postgresql+psycopg2://user:pw@127.0.0.1:{free_port()}/db")
    with pytest.raises(OperationalError) as caught:
        engine.connect()
    return caught.value


def test_a_refused_connection_counts_as_lost_and_a_bad_query_does_not(engine) -> None:
    assert connection_lost(_refused_connection_error())
    assert not connection_lost(DatabaseError("no cause"))
    wrapped = DatabaseError("storing failed")
    wrapped.__cause__ = _refused_connection_error()
    assert connection_lost(wrapped)
    with pytest.raises(OperationalError) as bad_query:
        with engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
    assert not connection_lost(bad_query.value)
    assert not connection_lost(psycopg2.OperationalError(
        'connection to server failed: FATAL:  password authentication failed for user "x"'))


class _Pauses(threading.Event):
    """A stop event that records the pauses ``retrying`` asks of it instead of waiting them."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.asked.append(timeout)
        return self.is_set()


def test_retrying_returns_once_the_database_answers_again() -> None:
    lost = _refused_connection_error()
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise lost
        return "stored"

    pauses = _Pauses()
    assert retrying(flaky, "storing", patience=30.0, stop=pauses) == "stored"
    assert len(calls) == 4
    # Backing off, not hammering: each pause twice the one before.
    assert pauses.asked == [retry_module.FIRST_DELAY, 2 * retry_module.FIRST_DELAY, 4 * retry_module.FIRST_DELAY]


def test_retrying_gives_up_after_its_patience_with_one_clear_error() -> None:
    lost = _refused_connection_error()

    def never() -> None:
        raise lost

    began = time.monotonic()
    with pytest.raises(DatabaseError, match=r"order 7: recording FAILED: the database has been "
                                            r"unreachable for 1\.5s \(connection to server"):
        retrying(never, "order 7: recording FAILED", patience=1.5)
    assert time.monotonic() - began >= 1.5


def test_a_stop_request_ends_the_waiting_early(monkeypatch) -> None:
    # The first pause lasts an hour unless the stop request ends it; so does the patience.
    monkeypatch.setattr(retry_module, "FIRST_DELAY", 3600.0)
    lost = _refused_connection_error()
    stop = threading.Event()
    calls, outcome = [], []

    def down() -> None:
        calls.append(1)
        raise lost

    def run() -> None:
        try:
            retrying(down, "storing", patience=3600.0, stop=stop)
        except DatabaseError as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=run, daemon=True)
    waiting.start()
    wait_for(lambda: calls, "the first attempt")
    stop.set()  # while it pauses (or just before: then it does not pause at all)
    waiting.join(PATIENCE)
    assert not waiting.is_alive(), "the stop request did not end the waiting"
    assert len(outcome) == 1 and "the database has been unreachable" in str(outcome[0])
    assert len(calls) <= 2  # at most the attempt the ended pause was waiting for


def test_an_error_waiting_cannot_fix_is_raised_at_once(engine) -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        with engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(OperationalError):
        retrying(bad, "reading", patience=60.0)
    assert len(calls) == 1


def test_an_order_records_its_owner_and_heartbeat(engine) -> None:
    me = Owner.me()
    store = OrderStore(engine, owner=me)
    order_id = store.create("o", "in.png", "blur")
    record = store.get(order_id)
    assert Owner.parse(record.owner) == me
    assert record.heartbeat_at is not None
    before = record.heartbeat_at
    # (SQLite gives the stored UTC time back without its zone.)
    wait_for(lambda: utcnow().replace(tzinfo=None) > before.replace(tzinfo=None),
             "the clock past the first heartbeat", every=0.001)
    store.heartbeat()
    assert store.get(order_id).heartbeat_at > before


def _dead_owner() -> Owner:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner(Owner.me().host, child.pid, 1)
    child.wait()
    return owner


def test_orders_of_a_dead_orchestrator_are_marked_failed_with_their_running_tasks(engine) -> None:
    dead = OrderStore(engine, owner=_dead_owner())
    running = dead.create("left-running", "in.png", "blur,sepia")
    dead.set_status(running, RunStatus.RUNNING)
    dead.start_task(running, 0, 1, "blur")
    dead.finish_task(running, 0, 1, "SUCCEEDED", output="a.png")
    dead.start_task(running, 1, 1, "sepia")
    pending = dead.create("left-pending", "in.png", "blur")
    done = dead.create("finished", "in.png", "blur")
    dead.set_status(done, RunStatus.SUCCEEDED)
    mine = OrderStore(engine, owner=Owner.me())
    live = mine.create("mine", "in.png", "blur")
    mine.set_status(live, RunStatus.RUNNING)

    marked = mine.mark_abandoned()

    assert sorted(r.id for r in marked) == [running, pending]
    for order_id in (running, pending):
        record = mine.get(order_id)
        assert record.status is RunStatus.FAILED
        assert "orchestrator" in record.error and "without recording" in record.error
        assert record.finished_at is not None
    assert mine.get(done).status is RunStatus.SUCCEEDED
    assert mine.get(live).status is RunStatus.RUNNING
    with engine.connect() as conn:
        runs = {r.position: r for r in conn.execute(select(task_runs).where(task_runs.c.order_id == running))}
    assert runs[0].status == "SUCCEEDED"
    assert runs[1].status == "FAILED" and "without recording" in runs[1].error
    assert mine.mark_abandoned() == []  # marked once


def test_another_hosts_order_is_marked_only_once_its_heartbeat_is_stale(engine) -> None:
    elsewhere = OrderStore(engine, owner=Owner("pod-orchestrator-abc", 1, 100))
    fresh = elsewhere.create("fresh", "in.png", "blur")
    stale = elsewhere.create("stale", "in.png", "blur")
    patience = 120.0
    too_old = utcnow() - timedelta(seconds=patience + MISSED_BEATS * HEARTBEAT_SECONDS + 5)
    with engine.begin() as conn:
        conn.execute(update(orders).where(orders.c.id == stale).values(heartbeat_at=too_old))

    marked = OrderStore(engine, patience=patience, owner=Owner.me()).mark_abandoned()

    assert [r.id for r in marked] == [stale]
    assert elsewhere.get(fresh).status is RunStatus.PENDING


def test_a_database_that_never_answers_fails_the_store_call_after_its_patience() -> None:
    engine = connect(f"postgresql+psycopg2://user:pw@127.0.0.1:{free_port()}/db")
    store = OrderStore(engine, patience=1.0, owner=Owner.me())
    with pytest.raises(DatabaseError, match="recording order late: the database has been unreachable"):
        store.create("late", "in.png", "blur")


def test_a_bare_postgresql_url_uses_the_installed_driver() -> None:
    engine = connect(f"postgresql://user:pw@127.0.0.1:{free_port()}/db")
    assert engine.dialect.driver == "psycopg2"
