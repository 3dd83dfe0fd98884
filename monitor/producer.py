"""monitor-producer: samples the running task of one order every second.

States (docs/protocol.md): idle -> ORDER: sample the task's process tree every second, on a
grid that starts when the task's process started -> HALT: publish the closing sample (from the
last sample to the task's end, out of the totals in HALT's headers), stop sampling, wait for
the next ORDER -> STOP: send STOP on ``resource<ID>``, wait (bounded) for TERMINATE, exit.
TERMINATE at any time: exit. Every sample carries its run's ``index`` and ``attempt``.

Three modes share that state machine (:class:`Mode`), and the shared sampler
(:mod:`monitor.shared_sampler`) runs one such machine per live order in one process:

- ``order`` (local runtime): one producer per order samples every task of it (in the shared
  sampler: every task of it that runs on this machine).
- ``sidecar`` (Kubernetes): a monitor in another pod cannot see a task's processes, so every
  task pod carries its own producer as a native sidecar sharing the pod's process namespace.
  It samples only the task whose ORDER names its pod (the ``host`` header), exits after that
  task's HALT, and, when its task was the order's last, sends the resource STOP after the
  task's STOP: the same producer that sent the last sample, so the STOP can never overtake it.
- ``stop-only`` (Kubernetes): when an order ends without its last task's STOP (a failure or a
  cancel), the orchestrator sends STOP itself and starts a producer in this mode, which
  samples nothing and only completes the STOP/TERMINATE handshake with the consumer.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import ProtocolError
from pipeline.kafka import Consumer, Producer
from pipeline.lifetime import StopSignals
from pipeline.protocol import (
    RESOURCES, MonitorStopped, MonitorTerminated, OrderStopped, Sample, TaskHalted, TaskStarted,
    decode_task_topic, task_topic,
)
from pipeline.proctime import boottime_ns
from pipeline.settings import Settings
from monitor.proc import children_of
from monitor.sampler import ProcessTreeSampler, TaskGoneError, Usage
from monitor.ready import announce_ready

logger = logging.getLogger(__name__)

INTERVAL = 1.0
TERMINATE_WAIT = 30.0
# A sidecar asked to stop while its task's HALT (or, for the last task, STOP) is still on
# its way waits this long for it: the task has just exited, its messages are flushed.
SIDECAR_DRAIN = 10.0
# A sidecar asked to stop before it has read its task's ORDER reads on this long: a task
# shorter than the sidecar's own start-up is gone before then, its ORDER and HALT (with the
# totals that make its one sample) already on the topic.
SIDECAR_CATCH_UP = 3.0


class Mode(str, enum.Enum):
    """What one producer process is responsible for (see the module docstring)."""

    ORDER = "order"
    SIDECAR = "sidecar"
    STOP_ONLY = "stop-only"


class State(str, enum.Enum):
    IDLE = "idle"
    SAMPLING = "sampling"
    STOPPING = "stopping"


@dataclass
class _Current:
    started: TaskStarted
    sampler: ProcessTreeSampler
    next_tick: float  # on _clock(); inf once the process has ended (only HALT is awaited)
    samples: int = 0


def _clock() -> float:
    """Seconds on the clock the kernel's process start times are on (monotonic)."""
    return boottime_ns() / 1e9


class MonitorProducer:
    """The state machine; :meth:`run` returns when the order is over."""

    def __init__(self, settings: Settings, order_id: int, signals: StopSignals,
                 interval: float = INTERVAL, terminate_wait: float = TERMINATE_WAIT,
                 mode: Mode = Mode.ORDER, host: str | None = None, only_this_host: bool = False,
                 children: Callable[[int], list[int]] = children_of) -> None:
        self.settings = settings
        self.order_id = order_id
        self.signals = signals
        self.interval = interval
        self.terminate_wait = terminate_wait
        self.mode = mode
        # A sidecar's pod: the name its task writes in ORDER's host header.
        self.host = host or os.environ.get("POD_NAME") or socket.gethostname()
        # The shared sampler: tasks on other machines are their own machine's to sample.
        self.only_this_host = only_this_host
        self._children = children
        self._latest_host: str | None = None  # the host of the latest ORDER seen
        self.state = State.IDLE
        self.current: _Current | None = None
        self.malformed = 0
        self.samples_sent = 0
        self._stop_deadline = 0.0
        self._mine: TaskStarted | None = None  # sidecar: its task's ORDER, once seen
        self._halted = False  # sidecar: its task's HALT seen
        self._exit_deadline: float | None = None  # sidecar: leave at this time at the latest

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
                    if self.mode is not Mode.SIDECAR:
                        logger.info("order_id=%d stop requested", self.order_id)
                        self._begin_stop(producer)
                    elif self._mine is None:
                        if self._exit_deadline is None:
                            self._exit_deadline = time.monotonic() + SIDECAR_CATCH_UP
                    elif self._exit_deadline is None:
                        # The task has exited (that is why the kubelet stops its sidecar):
                        # read on until its HALT/STOP, so its last samples and the resource
                        # STOP still go out, but not for ever.
                        self._exit_deadline = time.monotonic() + SIDECAR_DRAIN
                if self._exit_deadline is not None and self.state is not State.STOPPING \
                        and time.monotonic() > self._exit_deadline:
                    if self._mine is None:
                        logger.info("order_id=%d stopped; this pod's task never announced itself",
                                    self.order_id)
                    else:
                        logger.warning("order_id=%d this pod's task sent no HALT/STOP in time; "
                                       "exiting", self.order_id)
                    return
                if self.state is State.STOPPING and time.monotonic() > self._stop_deadline:
                    logger.warning("order_id=%d no TERMINATE within %gs; exiting",
                                   self.order_id, self.terminate_wait)
                    return
                message = consumer.poll(self.wake_in())
                if message is not None and self.handle(message, producer):
                    return
                self.tick(producer)

    def wake_in(self) -> float:
        """Seconds until the next sample is due (at most 0.2)."""
        if self.current is None:
            return 0.2
        return min(max(self.current.next_tick - _clock(), 0.0), 0.2)

    def stop_overdue(self) -> bool:
        """STOP was sent and no TERMINATE came within ``terminate_wait``."""
        return self.state is State.STOPPING and time.monotonic() > self._stop_deadline

    def handle(self, message, producer: Producer) -> bool:
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
        if self.mode is Mode.SIDECAR:
            return self._handle_as_sidecar(decoded, producer)
        if isinstance(decoded, TaskStarted):
            self._latest_host = decoded.host
            if self.only_this_host and decoded.host != self.host:
                self._stop_sampling("next ORDER (on another machine)")
            elif self.mode is Mode.ORDER:
                self._start_sampling(decoded, producer)
        elif isinstance(decoded, TaskHalted):
            self._close(decoded, producer)
            self._stop_sampling("HALT")
        elif isinstance(decoded, OrderStopped):
            self._stop_sampling("STOP")
            if self.only_this_host and self._latest_host not in (None, self.host):
                # The machine that sampled the last task sends the resource STOP, after its
                # last sample; this one has nothing more to say for the order.
                return True
            self._begin_stop(producer)
        return False

    def _handle_as_sidecar(self, decoded, producer: Producer) -> bool:
        """Messages before this pod's ORDER (earlier tasks, earlier attempts) are history."""
        if isinstance(decoded, TaskStarted):
            if self._mine is None and decoded.host == self.host:
                self._mine = decoded
                self._start_sampling(decoded, producer)
                if self._exit_deadline is not None:  # found while catching up: wait for its HALT
                    self._exit_deadline = max(self._exit_deadline, time.monotonic() + SIDECAR_DRAIN)
            return False
        if self._mine is None:
            return False
        last = self._mine.index == len(self._mine.required_tasks) - 1
        if isinstance(decoded, TaskHalted) and not self._halted:
            self._halted = True
            self._close(decoded, producer)
            self._stop_sampling("HALT")
            if not last:
                return True
            # The order's last task sends STOP right after HALT if it succeeded.
            self._exit_deadline = min(self._exit_deadline or float("inf"),
                                      time.monotonic() + SIDECAR_DRAIN)
        elif isinstance(decoded, OrderStopped) and self._halted and last:
            self._begin_stop(producer)
        return False

    def _start_sampling(self, started: TaskStarted, producer: Producer) -> None:
        self._stop_sampling("next ORDER")
        try:
            sampler = ProcessTreeSampler(started.pid, started.started_ns, self._children)
        except TaskGoneError:
            logger.info("order_id=%d task=%s pid=%d already ended and its start is unknown; "
                        "nothing to sample", self.order_id, started.task_name, started.pid)
            return
        # Ticks sit on the task's start + k * interval: the first covers its first second.
        first = sampler.started_ns / 1e9 + self.interval if sampler.alive else float("inf")
        while first < _clock() - self.interval:
            first += self.interval
        self.current = _Current(started, sampler, next_tick=first)
        self.state = State.SAMPLING
        logger.info("order_id=%d task=%s index=%d attempt=%d pid=%d host=%s sampling", self.order_id,
                    started.task_name, started.index, started.attempt, started.pid, started.host)

    def _stop_sampling(self, why: str) -> None:
        if self.current is not None:
            logger.info("order_id=%d task=%s %s after %d sample(s)", self.order_id,
                        self.current.started.task_name, why, self.current.samples)
        self.current = None
        if self.state is State.SAMPLING:
            self.state = State.IDLE

    def tick(self, producer: Producer) -> None:
        current = self.current
        if current is None or _clock() < current.next_tick:
            return
        # Drift-free: missed ticks are skipped, not bunched.
        while current.next_tick <= _clock():
            current.next_tick += self.interval
        try:
            usage = current.sampler.sample()
        except TaskGoneError:
            current.next_tick = float("inf")  # ended: the closing sample comes with HALT
            return
        self._send(current, usage, producer)

    def _close(self, halted: TaskHalted, producer: Producer) -> None:
        """The closing sample of the running task, from HALT's totals."""
        current = self.current
        if current is None:
            return
        if halted.totals is None:
            logger.warning("order_id=%d task=%s HALT carries no totals: no closing sample",
                           self.order_id, current.started.task_name)
            return
        usage = current.sampler.close(halted.totals)
        if usage is not None:
            self._send(current, usage, producer, closing=True, output_bytes=halted.totals.output_bytes,
                       operation_ns=halted.totals.operation_ns)

    def _send(self, current: _Current, usage: Usage, producer: Producer, closing: bool = False,
              output_bytes: int | None = None, operation_ns: int | None = None) -> None:
        started = current.started
        count = sum(resource in usage.values for resource in RESOURCES) if closing else None
        for resource in RESOURCES:
            if resource in usage.values:
                producer.send(Sample(started.required_tasks, started.task_name, self.order_id, resource,
                                     round(usage.values[resource], 3), usage.timestamp_ms,
                                     started.index, started.attempt, count, output_bytes,
                                     operation_ns).encode())
                self.samples_sent += 1
        current.samples += 1

    def _begin_stop(self, producer: Producer) -> None:
        producer.send_now(MonitorStopped(self.order_id).encode())
        self.state = State.STOPPING
        self._stop_deadline = time.monotonic() + self.terminate_wait
        logger.info("order_id=%d STOP sent on the resource topic after %d samples; waiting for TERMINATE",
                    self.order_id, self.samples_sent)
