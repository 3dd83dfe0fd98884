"""monitor-producer: samples the running task of one order every second.

States (DESIGN.md): idle -> ORDER: sample the task's process tree every second -> HALT: stop
sampling, wait for the next ORDER -> STOP: send STOP on ``resource<ID>``, wait (bounded) for
TERMINATE, exit. TERMINATE at any time: exit.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from pipeline.errors import ProtocolError
from pipeline.kafka import Consumer, Producer
from pipeline.protocol import (
    RESOURCES, MonitorStopped, MonitorTerminated, OrderStopped, Sample, TaskHalted, TaskStarted,
    decode_task_topic, task_topic,
)
from pipeline.settings import Settings
from monitor.sampler import ProcessTreeSampler, TaskGoneError
from monitor.signals import StopSignals, announce_ready

logger = logging.getLogger(__name__)

INTERVAL = 1.0
TERMINATE_WAIT = 30.0


class State(str, enum.Enum):
    IDLE = "idle"
    SAMPLING = "sampling"
    STOPPING = "stopping"


@dataclass
class _Current:
    started: TaskStarted
    sampler: ProcessTreeSampler
    next_tick: float
    samples: int = 0


class MonitorProducer:
    """The state machine; :meth:`run` returns when the order is over."""

    def __init__(self, settings: Settings, order_id: int, signals: StopSignals,
                 interval: float = INTERVAL, terminate_wait: float = TERMINATE_WAIT) -> None:
        self.settings = settings
        self.order_id = order_id
        self.signals = signals
        self.interval = interval
        self.terminate_wait = terminate_wait
        self.state = State.IDLE
        self.current: _Current | None = None
        self.malformed = 0
        self.samples_sent = 0
        self._stop_deadline = 0.0

    def run(self) -> None:
        # The task topic is replayed from its start, so a restarted producer ends up in the
        # state the messages so far imply; it commits nothing.
        with Consumer(self.settings, group_id=f"monitor-producer-{self.order_id}") as consumer, \
                Producer(self.settings) as producer:
            consumer.assign([task_topic(self.order_id)])
            announce_ready()
            logger.info("order_id=%d monitor-producer ready", self.order_id)
            while True:
                if self.signals.requested.is_set() and self.state is not State.STOPPING:
                    logger.info("order_id=%d stop requested", self.order_id)
                    self._begin_stop(producer)
                if self.state is State.STOPPING and time.monotonic() > self._stop_deadline:
                    logger.warning("order_id=%d no TERMINATE within %gs; exiting",
                                   self.order_id, self.terminate_wait)
                    return
                message = consumer.poll(self._poll_timeout())
                if message is not None and self._handle(message, producer):
                    return
                self._tick(producer)

    def _poll_timeout(self) -> float:
        if self.current is None:
            return 0.2
        return min(max(self.current.next_tick - time.monotonic(), 0.0), 0.2)

    def _handle(self, message, producer: Producer) -> bool:
        """React to one task-topic message; True when the service must exit."""
        try:
            decoded = decode_task_topic(message, self.order_id)
        except ProtocolError as exc:
            self.malformed += 1
            logger.warning("order_id=%d skipping malformed message (%d so far): %s",
                           self.order_id, self.malformed, exc)
            return False
        if isinstance(decoded, MonitorTerminated):
            logger.info("order_id=%d TERMINATE received; %d samples sent", self.order_id, self.samples_sent)
            return True
        if self.state is State.STOPPING:
            return False
        if isinstance(decoded, TaskStarted):
            self._start_sampling(decoded, producer)
        elif isinstance(decoded, TaskHalted):
            self._stop_sampling("HALT")
        elif isinstance(decoded, OrderStopped):
            self._stop_sampling("STOP")
            self._begin_stop(producer)
        return False

    def _start_sampling(self, started: TaskStarted, producer: Producer) -> None:
        self._stop_sampling("next ORDER")
        try:
            sampler = ProcessTreeSampler(started.pid)
        except TaskGoneError:
            logger.info("order_id=%d task=%s pid=%d already ended; nothing to sample",
                        self.order_id, started.task_name, started.pid)
            return
        self.current = _Current(started, sampler, next_tick=time.monotonic())
        self.state = State.SAMPLING
        logger.info("order_id=%d task=%s index=%d pid=%d host=%s sampling", self.order_id,
                    started.task_name, started.index, started.pid, started.host)
        self._tick(producer)  # at once: a task shorter than a second still yields a sample

    def _stop_sampling(self, why: str) -> None:
        if self.current is not None:
            logger.info("order_id=%d task=%s %s after %d sample(s)", self.order_id,
                        self.current.started.task_name, why, self.current.samples)
        self.current = None
        if self.state is State.SAMPLING:
            self.state = State.IDLE

    def _tick(self, producer: Producer) -> None:
        current = self.current
        if current is None or time.monotonic() < current.next_tick:
            return
        # Drift-free: ticks sit on start + k * interval; missed ticks are skipped, not bunched.
        while current.next_tick <= time.monotonic():
            current.next_tick += self.interval
        timestamp_ms = int(time.time() * 1000)
        try:
            usage = current.sampler.sample()
        except TaskGoneError:
            self._stop_sampling("process ended")
            return
        started = current.started
        for resource in RESOURCES:
            producer.send(Sample(started.required_tasks, started.task_name, self.order_id,
                                 resource, round(usage[resource], 3), timestamp_ms).encode())
        current.samples += 1
        self.samples_sent += len(RESOURCES)

    def _begin_stop(self, producer: Producer) -> None:
        producer.send_now(MonitorStopped(self.order_id).encode())
        self.state = State.STOPPING
        self._stop_deadline = time.monotonic() + self.terminate_wait
        logger.info("order_id=%d STOP sent on the resource topic; waiting for TERMINATE", self.order_id)
