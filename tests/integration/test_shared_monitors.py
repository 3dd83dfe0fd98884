"""The shared monitoring services: one sampler and a group of consumer replicas serving every
order, on the real broker and database; a replica killed outright loses and duplicates nothing."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from pipeline.db import connect
from pipeline.db.schema import measurements
from ops.infra.shared_monitors import SharedMonitors
from pipeline.kafka import TopicAdmin
from pipeline.protocol import RESOURCES, order_topics
from pipeline.settings import Monitors
from devkit.orders import ran_orders, run_orchestrator, start_orchestrator, write_order
from devkit.waiting import wait_for

SENT = re.compile(r"order_id=(\d+) STOP sent on the resource topic after (\d+) samples")


@pytest.fixture()
def shared(settings):
    """The shared services for this test's broker and database; stopped afterwards."""
    services = SharedMonitors(settings)
    services.start(consumers=2)
    yield services
    services.stop()


def _sent_by(log_path) -> dict[int, int]:
    """Samples the sampler says it sent, per order (its own count, independent of storage)."""
    return {int(o): int(n) for o, n in SENT.findall(log_path.read_text())}


def _stored_rows(settings) -> int:
    engine = connect(settings.database_url)
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(measurements)).scalar_one()


def _log(services: SharedMonitors, name: str):
    return next(s.log for s in services.status() if s.name == name)



def _assert_all_sampled(orders, sent: dict[int, int]) -> None:
    for order in orders:
        assert order.status == "SUCCEEDED", order
        # Nothing lost, nothing stored twice: rows equal what the sampler sent.
        assert len(order.samples) == sent[order.id], (order.name, len(order.samples), sent.get(order.id))
        for run in order.runs:
            mine = Counter(s["resource"] for s in order.samples
                           if s["position"] == run["position"] and s["attempt"] == run["attempt"])
            assert set(mine) == set(RESOURCES), (order.name, run["task"], mine)


def test_orders_are_sampled_and_stored_by_the_shared_services(settings, shared, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.SHARED)
    files = [
        write_order(tmp_path, "edges", [{"name": "resize", "params": {"width": 320}}, "grayscale", "edge_detect"]),
        write_order(tmp_path, "blurs", ["blur", "sharpen"], image="china.jpg"),
        write_order(tmp_path, "turns", [{"name": "rotate", "params": {"degrees": 30}}, "grayscale"],
                    image="flower.jpg"),
    ]
    result = run_orchestrator(settings, *map(str, files), "--repeat", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(shared monitors)" in result.stderr

    orders = ran_orders(settings)
    assert len(orders) == 6
    _assert_all_sampled(orders, _sent_by(_log(shared, "sampler")))
    # No monitors of their own, and their topics are gone once TERMINATE confirmed them.
    logs = settings.state_dir / "logs"
    assert not list(logs.glob("order-*/monitor-*.log"))
    remaining = TopicAdmin(settings).existing()
    assert not any(set(order_topics(o.id)) & remaining for o in orders)


def test_a_killed_consumer_replica_loses_and_duplicates_nothing(settings, shared, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.SHARED)
    # Long enough that the kill falls mid-order: several seconds of work per order.
    median = {"name": "median", "params": {"size": 5, "passes": 2}}
    files = [write_order(tmp_path, f"long-{i}", [median, "blur", median], image="scene-1024x768.jpg")
             for i in range(4)]
    orchestrator = start_orchestrator(settings, *map(str, files))
    victim = next(s for s in shared.status() if s.name == "consumer-1")
    deadline = time.monotonic() + 120
    # Mid-run: once samples are being stored, while the orders still work.
    while _stored_rows(settings) == 0 and orchestrator.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert orchestrator.poll() is None, "the orders ended before the kill"
    os.kill(victim.pid, signal.SIGKILL)
    out, err = orchestrator.communicate(timeout=400)
    assert orchestrator.returncode == 0, err[-3000:]

    orders = ran_orders(settings)
    assert len(orders) == 4
    _assert_all_sampled(orders, _sent_by(_log(shared, "sampler")))


def test_an_order_with_its_own_monitors_is_left_to_them(settings, shared, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.PER_ORDER)
    order = write_order(tmp_path, "own", [{"name": "median", "params": {"size": 5, "passes": 2}}, "blur"],
                        image="scene-1024x768.jpg")
    # Its topics are kept, so that the shared services find them however late they look.
    result = run_orchestrator(settings, str(order), "--keep-topics")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(shared monitors)" not in result.stderr

    [stored] = ran_orders(settings)
    own_producer_log = settings.state_dir / "logs" / f"order-{stored.id}" / "monitor-producer.log"
    _assert_all_sampled([stored], _sent_by(own_producer_log))
    # The shared services saw its topics and left them alone.
    assert stored.id not in _sent_by(_log(shared, "sampler"))
    left_alone = f"order_id={stored.id} is not served by the shared monitors"
    wait_for(lambda: left_alone in _log(shared, "sampler").read_text(), "the sampler leaving it alone")
    wait_for(lambda: any(left_alone in _log(shared, name).read_text() for name in ("consumer-1", "consumer-2")),
             "a consumer leaving it alone")
    assert stored.id not in _sent_by(_log(shared, "sampler"))
    TopicAdmin(settings).delete(list(order_topics(stored.id)))
