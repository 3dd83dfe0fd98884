"""SIGTERM (what Kubernetes, systemd and `timeout` send) ends a run in every phase it can wait
in: a task running, the shared consumer not confirming, a broker that does not answer. The
first one cancels (exit 130, the orders CANCELLED or their topics kept for the next run), a
second one forces. And a broker that is only slow fails no order: orders that start while it
does not answer wait for it and all succeed.

The waits below are for events (a line on the console, a row in the database); their
timeouts are far beyond a healthy run and only a hang reaches them (before these fixes a
cancelled wait for the shared consumer went on for 300 s)."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.orders import all_stored_orders, ran_orders, pipeline_processes, start_orchestrator, write_order
from devkit.servers import free_port_pair
from devkit.waiting import Output, wait_for
from ops.infra.kafka_broker import KafkaBroker
from ops.infra.shared_monitors import SharedMonitors
from pipeline.settings import Monitors, Settings

# A cancelled run ends within seconds; this only catches one that does not end at all.
ENDS = 60.0


def _orchestrator(settings: Settings, *args: Path | str) -> Output:
    return Output(start_orchestrator(settings, *map(str, args)))


def _stall(folder: Path, name: str) -> Path:
    """An order whose one task stalls (sleeps) far longer than any test waits."""
    return write_order(folder, name, [{"name": "grayscale", "fault": "stall", "fault_at": 0}],
                       retry={"max_attempts": 1, "task_timeout_seconds": 600})



def _assert_cancelled_once(run: Output) -> str:
    code, _, stderr = run.finish(ENDS)
    assert code == 130, stderr[-3000:]
    assert stderr.count("SIGTERM: cancelling") == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr


def test_sigterm_while_a_task_runs_cancels_the_order(settings, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.PER_ORDER)
    run = _orchestrator(settings, _stall(tmp_path, "stalled"))
    run.wait_for_line("task 1/1 grayscale started")
    wait_for(lambda: pipeline_processes(settings), "the task and its monitors running")

    run.process.send_signal(signal.SIGTERM)

    _assert_cancelled_once(run)
    [order] = ran_orders(settings)
    assert order.status == "CANCELLED"
    wait_for(lambda: not pipeline_processes(settings), "every task and monitor of the run ended")


def test_sigterm_while_a_task_waits_for_a_running_slot_cancels_both_orders(settings, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.PER_ORDER)
    run = _orchestrator(settings, _stall(tmp_path, "first"), _stall(tmp_path, "second"), "--max-running", "1")
    run.wait_for_line("task 1/1 grayscale started")
    run.wait_for_line("running 1 task(s)", count=2)  # the second order's task waits for the slot

    run.process.send_signal(signal.SIGTERM)

    _assert_cancelled_once(run)
    stored = all_stored_orders(settings)
    assert {o.name for o in stored if o.status == "CANCELLED"} == {"first", "second"}
    assert sum(len(o.runs) for o in stored) == 1  # the waiting task never started


def test_a_second_sigterm_forces_the_exit(settings, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.PER_ORDER)
    run = _orchestrator(settings, _stall(tmp_path, "stalled"))
    run.wait_for_line("task 1/1 grayscale started")

    run.process.send_signal(signal.SIGTERM)
    run.wait_for_line("SIGTERM: cancelling")
    run.process.send_signal(signal.SIGTERM)

    code, _, stderr = run.finish(ENDS)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    wait_for(lambda: not pipeline_processes(settings), "every task and monitor of the run ended")


@pytest.fixture()
def shared(settings) -> Iterator[SharedMonitors]:
    services = SharedMonitors(settings)
    services.start(consumers=1)
    yield services
    for service in services.status():
        if service.pid:
            os.kill(service.pid, signal.SIGCONT)
    services.stop()


def test_sigterm_while_waiting_for_the_shared_consumer_ends_the_wait(settings, shared, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.SHARED)
    [consumer] = [s for s in shared.status() if s.name.startswith("consumer-")]
    os.kill(consumer.pid, signal.SIGSTOP)  # alive, but storing nothing: no TERMINATE comes
    try:
        run = _orchestrator(settings, write_order(tmp_path, "unconfirmed", ["grayscale"]))
        run.wait_for_line("task 1/1 grayscale done")
        # Within seconds, not minutes, the console says that nothing is being confirmed.
        run.wait_for_line("the shared monitors have stored no sample of this order")

        run.process.send_signal(signal.SIGTERM)

        stderr = _assert_cancelled_once(run)
        assert "its topics are kept" in stderr, stderr[-3000:]
    finally:
        os.kill(consumer.pid, signal.SIGCONT)
    # What was not confirmed is stored once the consumer runs again (the topics were kept).
    wait_for(lambda: [o for o in all_stored_orders(settings) if o.samples],
             "the unconfirmed order's samples stored after all")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A broker of this test's own: stopping it disturbs no other test."""
    broker = KafkaBroker(Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "broker-state")}),
                         port=free_port_pair())
    broker.start()
    try:
        yield broker
    finally:
        if broker.status().pid:
            os.kill(broker.status().pid, signal.SIGCONT)
        broker.stop()


def _held_back(broker: KafkaBroker):
    """SIGSTOP the broker: connections are accepted by the kernel, nothing is answered (as a
    broker starved of CPU); the caller resumes it with SIGCONT."""
    pid = broker.status().pid
    os.kill(pid, signal.SIGSTOP)
    return lambda: os.kill(pid, signal.SIGCONT)


def test_orders_started_while_the_broker_does_not_answer_wait_for_it(settings, own_broker, tmp_path):
    settings = dataclasses.replace(settings, kafka_bootstrap_servers=own_broker.bootstrap,
                                   monitors=Monitors.PER_ORDER)
    orders = [write_order(tmp_path, f"held-{i}", ["grayscale"]) for i in range(3)]
    resume = _held_back(own_broker)
    try:
        run = _orchestrator(settings, *orders)
        # A request went unanswered for longer than the admin waits for one answer.
        run.wait_for_line("is slow to answer")
    finally:
        resume()

    code, _, stderr = run.finish()
    assert code == 0, stderr[-3000:]
    assert stderr.count("is slow to answer") == 1, stderr[-3000:]
    stored = ran_orders(settings)
    assert sorted(o.name for o in stored) == [f"held-{i}" for i in range(3)]
    assert all(o.status == "SUCCEEDED" for o in stored), stored


def test_sigterm_while_the_broker_does_not_answer_ends_the_run(settings, own_broker, tmp_path):
    settings = dataclasses.replace(settings, kafka_bootstrap_servers=own_broker.bootstrap,
                                   monitors=Monitors.PER_ORDER)
    resume = _held_back(own_broker)
    try:
        run = _orchestrator(settings, write_order(tmp_path, "held", ["grayscale"]))
        run.wait_for_line("is slow to answer")
        run.process.send_signal(signal.SIGTERM)
        code, _, stderr = run.finish(ENDS)
    finally:
        resume()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
