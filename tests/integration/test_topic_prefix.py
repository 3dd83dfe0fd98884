"""TOPIC_PREFIX against a real broker: deployments with different prefixes never meet, every
name above the wrappers stays logical, and an order's topics are created exclusively."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

from ops.infra.shared_monitors import SharedMonitors
from pipeline.kafka import Consumer, Producer, TopicAdmin
from pipeline.protocol import ORCHESTRATOR_TOPIC, RESOURCES, Message, order_topics
from pipeline.settings import Monitors, Settings
from devkit.orders import all_stored_orders, run_orchestrator, write_order


def _prefixed(settings: Settings, prefix: str) -> Settings:
    return dataclasses.replace(settings, topic_prefix=prefix)


def _drain(consumer: Consumer, count: int, timeout: float = 20.0, quiet: float = 0.0) -> list[Message]:
    """Up to ``count`` messages; with ``quiet``, then whatever else comes within that long."""
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None:
            received.append(message)
    end = time.monotonic() + quiet
    while time.monotonic() < end:
        message = consumer.poll(0.2)
        if message is not None:
            received.append(message)
    return received


def test_two_prefixes_share_a_broker_without_seeing_each_others_topics(settings):
    tag = uuid.uuid4().hex[:8]
    a, b = _prefixed(settings, f"pa{tag}."), _prefixed(settings, f"pb{tag}.")
    name = f"shared{tag}1"  # one logical name, two topics on the broker
    admin_a, admin_b, plain = TopicAdmin(a), TopicAdmin(b), TopicAdmin(settings)
    admin_a.create([name])
    admin_b.create([name])
    try:
        assert name in admin_a.existing() and name in admin_b.existing()
        assert not {n for n in admin_a.existing() if n.startswith(f"pb{tag}") or n.startswith(f"pa{tag}")}
        on_broker = plain.existing()
        assert {f"pa{tag}.{name}", f"pb{tag}.{name}"} <= on_broker and name not in on_broker

        for side, values in ((a, ["a0", "a1", "a2"]), (b, ["b0", "b1"])):
            with Producer(side) as producer:
                for value in values:
                    producer.send(Message(name, "k", value))

        # Assigned: the logical name is read, on this prefix only, and received under it;
        # commits land on this prefix's topic (the same group id reads b's from the start).
        group = f"group-{tag}"
        with Consumer(a, group_id=group) as consumer:
            consumer.assign([name])
            got = _drain(consumer, 3, quiet=1.0)
            assert [(m.topic, m.value) for m in got] == [(name, "a0"), (name, "a1"), (name, "a2")]
            consumer.mark_processed(got[0])
            consumer.commit()
        with Consumer(a, group_id=group) as consumer:
            consumer.assign([name])
            assert [m.value for m in _drain(consumer, 2, quiet=1.0)] == ["a1", "a2"]
        with Consumer(b, group_id=group) as consumer:
            consumer.assign([name])
            assert [(m.topic, m.value) for m in _drain(consumer, 2, quiet=1.0)] == [(name, "b0"), (name, "b1")]

        # Subscribed by a ^-pattern over logical names: this prefix's topic only; what the
        # group takes away is reported under the logical name too.
        revoked: list[tuple[str, int]] = []
        consumer = Consumer(b, group_id=f"sub-{tag}")
        consumer.on_revoke = revoked.extend
        consumer.subscribe([f"^shared{tag}[0-9]+$"])
        got = _drain(consumer, 2, timeout=30.0, quiet=1.0)
        consumer.close()
        assert [(m.topic, m.value) for m in got] == [(name, "b0"), (name, "b1")]
        assert revoked == [(name, 0)]

        # Deleting under one prefix leaves the other's topic alone.
        admin_a.delete([name])
        assert name not in admin_a.existing() and name in admin_b.existing()
        assert f"pb{tag}.{name}" in plain.existing()
    finally:
        admin_a.delete([name])
        admin_b.delete([name])


def test_exclusive_creation_reports_an_existing_topic_and_leaves_it_untouched(settings):
    tag = uuid.uuid4().hex[:8]
    admin = TopicAdmin(_prefixed(settings, f"px{tag}-"))
    old, new = f"old{tag}", f"new{tag}"
    admin.create([old])
    try:
        with Producer(_prefixed(settings, f"px{tag}-")) as producer:
            producer.send(Message(old, "k", "kept-1"))
            producer.send(Message(old, "k", "kept-2"))

        assert admin.create_exclusive([old, new]) == {old}
        assert {old, new} <= admin.existing()
        assert admin.create_exclusive([new]) == {new}
        with Consumer(_prefixed(settings, f"px{tag}-")) as consumer:
            consumer.assign([old])
            assert [m.value for m in _drain(consumer, 2, quiet=1.0)] == ["kept-1", "kept-2"]

        # Two creators at the same moment: each topic goes to exactly one of them.
        names = [f"race{tag}a", f"race{tag}b", f"race{tag}c"]
        existed: list[set[str]] = []
        racers = [threading.Thread(target=lambda: existed.append(TopicAdmin(
            _prefixed(settings, f"px{tag}-")).create_exclusive(names))) for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(60)
        assert len(existed) == 2 and not existed[0] & existed[1]
        assert existed[0] | existed[1] == set(names)
    finally:
        admin.delete([old, new, *[f"race{tag}{x}" for x in "abc"]])


def test_an_order_runs_end_to_end_on_prefixed_topics(settings, tmp_path):
    tag = uuid.uuid4().hex[:8]
    prefix = f"someprefix{tag}."
    prefixed = _prefixed(settings, prefix)
    plain, admin = TopicAdmin(settings), TopicAdmin(prefixed)
    # Another deployment's order 1 under the same prefix: id 1 is skipped, its topic kept,
    # and the resource1 this run created for id 1 before seeing that deleted again.
    task1, resource1 = order_topics(1)
    admin.create([task1])
    try:
        path = write_order(tmp_path, "prefixed", [{"name": "median", "params": {"passes": 2}}])
        result = run_orchestrator(prefixed, "--keep-topics", str(path))
        assert result.returncode == 0, result.stderr[-3000:]

        orders = {o.id: o for o in all_stored_orders(prefixed)}
        order = next(o for o in orders.values() if o.name == "prefixed" and o.runs)
        assert order.status == "SUCCEEDED" and order.id != 1
        assert {s["resource"] for s in order.samples} == set(RESOURCES)
        assert orders[1].status == "FAILED"
        assert admin.existing() >= {task1, ORCHESTRATOR_TOPIC, *order_topics(order.id)}
        assert resource1 not in admin.existing()

        on_broker = plain.existing()
        assert {prefix + t for t in (ORCHESTRATOR_TOPIC, *order_topics(order.id))} <= on_broker
        with Consumer(prefixed) as consumer:
            consumer.assign([order_topics(order.id)[1]])
            samples = _drain(consumer, len(order.samples), timeout=30.0)
        assert len(samples) >= len(order.samples)
        assert {m.topic for m in samples} == {order_topics(order.id)[1]}
    finally:
        admin.delete([t for o in (1, 2, 3) for t in order_topics(o)])


def test_the_shared_monitors_serve_the_orders_under_their_prefix(settings, tmp_path):
    """They subscribe by pattern: under a prefix they find its orders' topics, and their
    consumer groups are this prefix's own."""
    prefixed = dataclasses.replace(_prefixed(settings, f"sp{uuid.uuid4().hex[:8]}."), monitors=Monitors.SHARED)
    services = SharedMonitors(prefixed)
    services.start(consumers=1)
    try:
        path = write_order(tmp_path, "shared-prefixed", ["grayscale"])
        result = run_orchestrator(prefixed, str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "(shared monitors)" in result.stderr
        order = next(o for o in all_stored_orders(prefixed) if o.runs)
        assert order.status == "SUCCEEDED"
        assert {s["resource"] for s in order.samples} == set(RESOURCES)
        assert not set(order_topics(order.id)) & TopicAdmin(prefixed).existing()
    finally:
        services.stop()
