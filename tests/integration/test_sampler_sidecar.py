"""The monitor-producer as a task pod's sampler sidecar (``--mode sidecar``) and as the
stop-only relay, against the real broker: it samples only the task whose ORDER names its pod,
leaves after that task's HALT, and sends the resource STOP only after its last sample."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from monitor.producer import INTERVAL
from pipeline.kafka import Consumer, Producer, TopicAdmin
from pipeline.proctime import boottime_ns, read_start_ticks, start_ns
from pipeline.protocol import (
    RESOURCES, Message, MonitorStopped, MonitorTerminated, OrderStopped, Sample, TaskHalted, TaskStarted,
    decode_resource_topic, order_topics, resource_topic, task_topic,
)
from devkit.orders import REPO, child_env
from devkit.waiting import PATIENCE, Output, read_to_end, wait_for

ORDER_ID = 880_001
TASKS = ("grayscale", "blur")


@pytest.fixture
def order_topics_created(settings):
    admin = TopicAdmin(settings)
    topics = list(order_topics(ORDER_ID))
    admin.delete([t for t in topics if t in admin.existing()])
    admin.create(topics)
    yield
    admin.delete(topics)


@contextlib.contextmanager
def _sidecar(settings, pod: str, mode: str = "sidecar") -> Iterator[tuple[subprocess.Popen, Output]]:
    """The monitor-producer started as pod ``pod``'s sampler, once READY, with its output as it
    writes it; killed afterwards."""
    env = child_env(settings) | {"POD_NAME": pod}
    process = subprocess.Popen([sys.executable, "-m", "monitor", "producer", str(ORDER_ID), "--mode", mode],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = Output(process)
    try:
        output.wait_for_line("READY")
        yield process, output
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _busy_task() -> Iterator[subprocess.Popen]:
    """A process that keeps one core busy, standing in for a task; killed afterwards."""
    process = subprocess.Popen([sys.executable, "-c", "import time\nend=time.time()+600\nwhile time.time()<end: pass"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _resource_messages(settings) -> list:
    """What is on resource<ID> now, decoded, to its end."""
    return [decode_resource_topic(message, ORDER_ID) for message in read_to_end(settings, resource_topic(ORDER_ID))]


def _up_to_the_stop(settings) -> list:
    """What is on resource<ID> once the resource STOP is there."""
    def with_stop() -> list:
        found = _resource_messages(settings)
        return found if any(isinstance(m, MonitorStopped) for m in found) else []

    return wait_for(with_stop, "the resource STOP", every=0.5)


def _read_up_to_here(producer: Producer, sidecar: Output) -> None:
    """Until the sidecar has read every task-topic message sent so far: a malformed one sent
    now, which it says it skips, comes after them."""
    skipped = sidecar.count("skipping malformed message")
    producer.send_now(Message(task_topic(ORDER_ID), "not-a-key", "read up to here"))
    sidecar.wait_for_line("skipping malformed message", count=skipped + 1)


def _older_than_an_interval(pid: int) -> bool:
    """Whether ``pid`` has run for a whole sampling interval: a sampler taking it on now would
    sample it at once (its first interval, from the process's start, is over)."""
    return boottime_ns() - start_ns(read_start_ticks(pid)) > INTERVAL * 1e9


def _wait_for_samples(settings, task: str, per_resource: int, timeout: float = PATIENCE) -> None:
    """Until the sampler has published ``per_resource`` samples of every resource of ``task``
    (however long a busy machine makes that take)."""
    counts: Counter = Counter()
    deadline = time.monotonic() + timeout
    with Consumer(settings) as consumer:
        consumer.assign([resource_topic(ORDER_ID)])
        while min((counts[r] for r in RESOURCES), default=0) < per_resource:
            assert time.monotonic() < deadline, f"only {dict(counts)} samples of {task} after {timeout}s"
            message = consumer.poll(0.3)
            if message is not None:
                decoded = decode_resource_topic(message, ORDER_ID)
                if isinstance(decoded, Sample) and decoded.task_name == task:
                    counts[decoded.resource] += 1


def test_the_sidecar_of_the_last_task_samples_only_its_pod_and_stops_after_its_last_sample(
        settings, order_topics_created):
    with _busy_task() as task, _sidecar(settings, pod="order-pod-b") as (sidecar, output), \
            Producer(settings) as producer:
        # The first task ran in another pod: this sidecar must not sample its process. Had it
        # taken that ORDER for its own, it would have sampled at once on reading it (the
        # process is older than a sampling interval), before reading the next message.
        wait_for(lambda: _older_than_an_interval(task.pid), "the task running a sampling interval")
        producer.send_now(TaskStarted(TASKS, "grayscale", ORDER_ID, task.pid, "order-pod-a", 0).encode())
        _read_up_to_here(producer, output)
        producer.send_now(TaskHalted(ORDER_ID).encode())
        producer.send_now(TaskStarted(TASKS, "blur", ORDER_ID, task.pid, "order-pod-b", 1).encode())
        _wait_for_samples(settings, "blur", per_resource=2)
        producer.send_now(TaskHalted(ORDER_ID).encode())
        producer.send_now(OrderStopped(ORDER_ID).encode())
        messages = _up_to_the_stop(settings)
        assert sidecar.poll() is None, "the last task's sidecar waits for TERMINATE"
        producer.send_now(MonitorTerminated(ORDER_ID).encode())
        assert sidecar.wait(PATIENCE) == 0
    assert _resource_messages(settings) == messages, "nothing after STOP"
    samples = [m for m in messages if isinstance(m, Sample)]
    assert {s.task_name for s in samples} == {"blur"}
    assert len(samples) >= 2 * len(RESOURCES)
    # The busy task's CPU in every interval (how much of a core depends on the machine's load).
    assert min(s.value for s in samples if s.resource == "cpu") > 0, "the busy task's CPU"
    assert isinstance(messages[-1], MonitorStopped), "STOP comes after every sample"
    assert sum(isinstance(m, MonitorStopped) for m in messages) == 1


def test_the_sidecar_of_an_earlier_task_leaves_after_its_halt_without_sending_stop(
        settings, order_topics_created):
    with _busy_task() as task, _sidecar(settings, pod="order-pod-a") as (sidecar, _), \
            Producer(settings) as producer:
        producer.send_now(TaskStarted(TASKS, "grayscale", ORDER_ID, task.pid, "order-pod-a", 0).encode())
        _wait_for_samples(settings, "grayscale", per_resource=1)  # it samples its pod's task
        producer.send_now(TaskHalted(ORDER_ID).encode())
        assert sidecar.wait(PATIENCE) == 0
    messages = _resource_messages(settings)  # all it sent: it has exited
    assert {m.task_name for m in messages if isinstance(m, Sample)} == {"grayscale"}
    assert not any(isinstance(m, MonitorStopped) for m in messages)


def test_a_sidecar_stopped_before_its_task_announced_itself_exits_at_once(settings, order_topics_created):
    with _sidecar(settings, pod="order-pod-c") as (sidecar, _):
        sidecar.terminate()  # the kubelet stops the sidecar once its task container has exited
        assert sidecar.wait(PATIENCE) == 0
    assert _resource_messages(settings) == []  # all it sent: it has exited


def test_the_stop_only_producer_samples_nothing_and_relays_stop(settings, order_topics_created):
    with _busy_task() as task, Producer(settings) as producer:
        # A failed order: the orchestrator sent STOP itself after the last task's HALT.
        producer.send_now(TaskStarted(TASKS, "grayscale", ORDER_ID, task.pid, "order-pod-a", 0).encode())
        producer.send_now(TaskHalted(ORDER_ID).encode())
        producer.send_now(OrderStopped(ORDER_ID).encode())
        with _sidecar(settings, pod="orchestrator-pod", mode="stop-only") as (relay, _):
            messages = _up_to_the_stop(settings)
            producer.send_now(MonitorTerminated(ORDER_ID).encode())
            assert relay.wait(PATIENCE) == 0
    assert [type(m) for m in messages] == [MonitorStopped]
    assert _resource_messages(settings) == messages, "nothing after STOP"
