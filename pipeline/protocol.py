"""The message protocol of docs/protocol.md, as typed encode/decode pairs.

Nothing else in the project builds or parses a message by hand. Every ``decode`` raises
:class:`~pipeline.errors.ProtocolError` with the reason when a message does not follow the
protocol; nothing received is ever evaluated.

| # | who | topic | key | value |
|---|---|---|---|---|
| 1 | task, on start | ``task<ID>`` | ``ORDER`` | ``required_tasks:task_name:orderID`` |
| 2 | task, on end | ``orchestrator`` | ``PROGRESS`` | all outputs so far, ``:``-joined |
| 3 | task, on end | ``task<ID>`` | ``HALT`` | ``HALT`` |
| 4 | task, last one, on end | ``task<ID>`` | ``STOP`` | ``STOP`` |
| 5 | monitor-producer, 1/s | ``resource<ID>`` | ``required_tasks:task_name:orderID:resource`` | usage |
| 6 | monitor-producer, on STOP | ``resource<ID>`` | ``STOP`` | ``STOP`` |
| 7 | monitor-consumer, on exit | ``task<ID>`` | ``TERMINATE`` | ``TERMINATE`` |

Added with live scoring (not in the original system), on the shared ``anomalies`` topic:
key ``orderID:task_name:resource_name``, value a JSON object of numbers (see :class:`Deviation`),
headers ``order_id``, ``task``, ``index``, ``resource``, ``model_version``.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import quote, unquote

from pipeline.errors import ProtocolError

ORCHESTRATOR_TOPIC = "orchestrator"
ANOMALIES_TOPIC = "anomalies"
TASK_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")
RESOURCE_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
RESOURCES = ("cpu", "memory", "disk_read", "disk_write", "cpu_wait", "node_cpu_pressure")
"""Resources measured by the monitor-producer (docs/protocol.md): cpu = percent of one core,
memory = resident MiB, disk_read/disk_write = KiB/s, cpu_wait = percent of the interval the
tree's threads waited for a CPU (summed over threads, like cpu), node_cpu_pressure = percent of
the interval in which some task on the node waited for a CPU (the node's, not the task's: the
load the task ran under)."""
TASK_RESOURCES = RESOURCES[:5]
"""The task's own usage (what accounting and scoring are about)."""

Headers = tuple[tuple[str, bytes], ...]


class Key(str, enum.Enum):
    """The fixed message keys (samples carry a composite key instead)."""

    ORDER = "ORDER"
    PROGRESS = "PROGRESS"
    HALT = "HALT"
    STOP = "STOP"
    TERMINATE = "TERMINATE"


class TaskStatus(str, enum.Enum):
    """Outcome of one task attempt, carried in PROGRESS's ``status`` header."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class Message:
    """A message as it travels: what a producer sends and a consumer receives."""

    topic: str
    key: str
    value: str
    headers: Headers = ()
    timestamp_ms: int | None = None
    # Where a received message sits in its topic; None for messages not yet sent.
    partition: int | None = field(default=None, compare=False)
    offset: int | None = field(default=None, compare=False)

    def header(self, name: str) -> str | None:
        """The first header called ``name``, decoded as UTF-8, or None."""
        for header_name, raw in self.headers:
            if header_name == name:
                return raw.decode("utf-8", errors="replace") if raw is not None else ""
        return None


def task_topic(order_id: int) -> str:
    """Topic on which an order's tasks and monitors talk: ``task<ID>``."""
    return f"task{_check_order_id(order_id)}"


def resource_topic(order_id: int) -> str:
    """Topic carrying an order's resource samples: ``resource<ID>``."""
    return f"resource{_check_order_id(order_id)}"


# Every order's topics, as librdkafka subscription patterns (a leading ``^`` makes a regex):
# what the shared monitors subscribe to.
TASK_TOPIC_PATTERN = "^task[1-9][0-9]*$"
RESOURCE_TOPIC_PATTERN = "^resource[1-9][0-9]*$"


def order_id_of_topic(topic: str) -> int:
    """The orderID in ``task<ID>`` or ``resource<ID>``; ProtocolError for any other topic."""
    for prefix in ("task", "resource"):
        if topic.startswith(prefix):
            return _parse_order_id(topic[len(prefix):])
    raise ProtocolError(f"{topic!r} is not an order's topic")


def order_topics(order_id: int) -> tuple[str, str]:
    """Both per-order topics, created before anything of the order starts."""
    return task_topic(order_id), resource_topic(order_id)


def encode_required_tasks(names: Sequence[str]) -> str:
    """Join task names with ``,`` after checking each one."""
    if not names:
        raise ProtocolError("required_tasks is empty")
    return ",".join(check_task_name(n) for n in names)


@functools.lru_cache(maxsize=4096)
def decode_required_tasks(text: str) -> tuple[str, ...]:
    """Split a ``,``-joined task list, checking every name (remembered: every sample of an
    order carries the same list, and a consumer decodes tens of thousands a second)."""
    if not text:
        raise ProtocolError("required_tasks is empty")
    return tuple(check_task_name(n) for n in text.split(","))


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise ProtocolError."""
    if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name):
        raise ProtocolError(f"bad task name {name!r}: must match [a-z][a-z0-9_-]*")
    return name


def encode_output(output: str) -> str:
    """Percent-encode an output reference so it never contains ``:``."""
    return quote(output, safe="/._-~")


def decode_output(text: str) -> str:
    """Undo :func:`encode_output`; a raw ``:`` can never appear here."""
    if ":" in text:
        raise ProtocolError(f"output {text!r} contains ':'; outputs must be percent-encoded")
    return unquote(text)


@dataclass(frozen=True)
class TaskStarted:
    """Message 1: a task announces itself (key ``ORDER``) with its pid and host."""

    required_tasks: tuple[str, ...]
    task_name: str
    order_id: int
    pid: int
    host: str
    index: int = 0
    attempt: int = 1
    # When the task's process started, on the host's CLOCK_BOOTTIME in ns (the kernel's
    # start time of the pid): where the first sample's interval begins.
    started_ns: int | None = None

    def encode(self) -> Message:
        value = ":".join(
            (encode_required_tasks(self.required_tasks), check_task_name(self.task_name),
             str(_check_order_id(self.order_id)))
        )
        headers = _headers(pid=self.pid, host=self.host, index=self.index, attempt=self.attempt,
                           started_ns=self.started_ns)
        return Message(task_topic(self.order_id), Key.ORDER.value, value, headers)

    @classmethod
    def decode(cls, message: Message) -> "TaskStarted":
        _expect_key(message, Key.ORDER)
        parts = message.value.split(":")
        if len(parts) != 3:
            raise ProtocolError(
                f"ORDER value {message.value!r}: expected required_tasks:task_name:orderID"
            )
        required, task_name, order_id = parts
        pid = _int_header(message, "pid")
        host = message.header("host")
        if not host:
            raise ProtocolError("ORDER message lacks the 'host' header")
        index = _int_header(message, "index", default=0)
        attempt = _int_header(message, "attempt", default=1)
        started_ns = _optional_int_header(message, "started_ns")
        started = cls(decode_required_tasks(required), check_task_name(task_name),
                      _parse_order_id(order_id), pid, host, index, attempt, started_ns)
        _expect_topic(message, task_topic(started.order_id))
        return started


@dataclass(frozen=True)
class Progress:
    """Message 2: a task ended; ``outputs`` are all outputs of the order so far."""

    order_id: int
    task: str
    index: int
    status: TaskStatus
    outputs: tuple[str, ...] = ()
    error: str | None = None
    attempt: int = 1
    # The CPU time of the task's image operation alone (TaskTotals.operation_ns): what the
    # orchestrator stores with the run, for the work model. None: not measured.
    operation_ns: int | None = None

    def encode(self) -> Message:
        value = ":".join(encode_output(o) for o in self.outputs)
        headers = _headers(
            order_id=_check_order_id(self.order_id), task=check_task_name(self.task),
            index=self.index, status=self.status.value, attempt=self.attempt,
            error=self.error, operation_ns=self.operation_ns,
        )
        return Message(ORCHESTRATOR_TOPIC, Key.PROGRESS.value, value, headers)

    @classmethod
    def decode(cls, message: Message) -> "Progress":
        _expect_key(message, Key.PROGRESS)
        _expect_topic(message, ORCHESTRATOR_TOPIC)
        outputs = tuple(decode_output(p) for p in message.value.split(":")) if message.value else ()
        status_text = message.header("status")
        try:
            status = TaskStatus(status_text)
        except ValueError:
            raise ProtocolError(f"PROGRESS status header {status_text!r} is not succeeded/failed") from None
        task = message.header("task")
        if task is None:
            raise ProtocolError("PROGRESS message lacks the 'task' header")
        return cls(
            order_id=_parse_order_id(message.header("order_id")),
            task=check_task_name(task),
            index=_int_header(message, "index"),
            status=status,
            outputs=outputs,
            error=message.header("error"),
            attempt=_int_header(message, "attempt", default=1),
            operation_ns=_optional_count_header(message, "operation_ns"),
        )

    @property
    def output(self) -> str | None:
        """This task's own output (the last one), when it succeeded."""
        return self.outputs[-1] if self.outputs and self.status is TaskStatus.SUCCEEDED else None


@dataclass(frozen=True)
class _Signal:
    """A message whose key and value are the same word (HALT, STOP, TERMINATE)."""

    order_id: int
    KEY = Key.HALT  # overridden by subclasses
    topic_of = staticmethod(task_topic)

    def encode(self) -> Message:
        word = self.KEY.value
        return Message(self.topic_of(self.order_id), word, word)

    @classmethod
    def decode(cls, message: Message, order_id: int) -> "_Signal":
        _expect_key(message, cls.KEY)
        _expect_topic(message, cls.topic_of(order_id))
        if message.value != cls.KEY.value:
            raise ProtocolError(f"{cls.KEY.value} message has value {message.value!r}")
        return cls(order_id)


@dataclass(frozen=True)
class TaskTotals:
    """What the kernel accounted for a task's process and its reaped children, read by the
    task itself as the last thing it does (carried in HALT's headers). The monitor-producer
    turns the part its samples have not covered yet into the closing sample."""

    cpu_ns: int  # CPU time, self + reaped children
    ended_ns: int  # CLOCK_BOOTTIME when these were read: the end of the closing interval
    ended_ms: int  # the same moment on the wall clock: the closing sample's timestamp
    peak_rss_kib: int  # the largest resident size of the process or of a reaped child
    read_bytes: int | None = None  # storage I/O, self + reaped children; None: unreadable
    write_bytes: int | None = None
    cpu_wait_ns: int | None = None  # time the process's threads waited for a CPU
    output_bytes: int | None = None  # the size of the output file it wrote; None: none written
    # CPU time of the image operation alone (applying it and saving its output), the runtime's
    # own threads only: what a regression of the work itself moves 1:1, without the process's
    # fixed part (start-up, decoding, the Kafka client). None: not measured (it failed, or an
    # older task).
    operation_ns: int | None = None

    _FIELDS = ("cpu_ns", "ended_ns", "ended_ms", "peak_rss_kib", "read_bytes", "write_bytes",
               "cpu_wait_ns", "output_bytes", "operation_ns")

    def headers(self) -> Headers:
        return _headers(**{name: getattr(self, name) for name in self._FIELDS})

    @classmethod
    def from_headers(cls, message: Message) -> "TaskTotals | None":
        """The totals in ``message``'s headers, or None when it carries none (an older task)."""
        if message.header("ended_ns") is None:
            return None
        required = {name: _int_header(message, name) for name in cls._FIELDS[:4]}
        optional = {name: _optional_int_header(message, name) for name in cls._FIELDS[4:]}
        values = {**required, **optional}
        if any(v < 0 for v in values.values() if v is not None):
            raise ProtocolError(f"HALT totals must not be negative: {values}")
        return cls(**values)


@dataclass(frozen=True)
class TaskHalted(_Signal):
    """Message 3: the running task ended; the monitor publishes the closing sample (from
    ``totals``) and stops sampling."""

    KEY = Key.HALT
    totals: TaskTotals | None = field(default=None, compare=False)

    def encode(self) -> Message:
        headers = self.totals.headers() if self.totals is not None else ()
        return Message(task_topic(self.order_id), Key.HALT.value, Key.HALT.value, headers)

    @classmethod
    def decode(cls, message: Message, order_id: int) -> "TaskHalted":
        plain = super().decode(message, order_id)
        return cls(plain.order_id, TaskTotals.from_headers(message))


@dataclass(frozen=True)
class OrderStopped(_Signal):
    """Message 4: the last task ended; the monitor-producer winds down."""

    KEY = Key.STOP


@dataclass(frozen=True)
class MonitorStopped(_Signal):
    """Message 6: the monitor-producer sent its last sample."""

    KEY = Key.STOP
    topic_of = staticmethod(resource_topic)


@dataclass(frozen=True)
class MonitorTerminated(_Signal):
    """Message 7: the monitor-consumer stored everything and exits."""

    KEY = Key.TERMINATE


@dataclass(frozen=True)
class Sample:
    """Message 5: one resource measurement of the running task at ``timestamp_ms``."""

    required_tasks: tuple[str, ...]
    task_name: str
    order_id: int
    resource: str
    value: float
    timestamp_ms: int
    # The task run it belongs to (headers): position in the order and attempt. None only for
    # samples of producers that predate these headers.
    index: int | None = None
    attempt: int | None = None
    # On each message of a run's closing sample (header ``closing``): how many resources that
    # sample has, so a consumer knows when the run's last tick is complete and the run is over;
    # and (``output_bytes``) the size of the output the run wrote, from HALT's totals: what its
    # writes are judged against; (``operation_ns``) the CPU time of its image operation alone,
    # what its work is judged on.
    closing: int | None = None
    output_bytes: int | None = None
    operation_ns: int | None = None

    def encode(self) -> Message:
        if not RESOURCE_NAME_PATTERN.fullmatch(self.resource):
            raise ProtocolError(f"bad resource name {self.resource!r}")
        if not math.isfinite(self.value):
            raise ProtocolError(f"usage {self.value!r} is not a finite number")
        key = ":".join((encode_required_tasks(self.required_tasks), check_task_name(self.task_name),
                        str(_check_order_id(self.order_id)), self.resource))
        return Message(resource_topic(self.order_id), key, _format_usage(self.value),
                       _headers(index=self.index, attempt=self.attempt, closing=self.closing,
                                output_bytes=self.output_bytes, operation_ns=self.operation_ns),
                       timestamp_ms=self.timestamp_ms)

    @classmethod
    def decode(cls, message: Message) -> "Sample":
        parts = message.key.split(":")
        if len(parts) != 4:
            raise ProtocolError(
                f"sample key {message.key!r}: expected required_tasks:task_name:orderID:resource_name"
            )
        required, task_name, order_id, resource = parts
        if not RESOURCE_NAME_PATTERN.fullmatch(resource):
            raise ProtocolError(f"sample key {message.key!r}: bad resource name {resource!r}")
        try:
            value = float(message.value)
        except ValueError:
            raise ProtocolError(f"sample value {message.value!r} is not a number") from None
        if not math.isfinite(value):
            raise ProtocolError(f"sample value {message.value!r} is not a finite number")
        if message.timestamp_ms is None or message.timestamp_ms <= 0:
            raise ProtocolError(f"sample {message.key!r} has no timestamp")
        sample = cls(decode_required_tasks(required), check_task_name(task_name),
                     _parse_order_id(order_id), resource, value, message.timestamp_ms,
                     _optional_int_header(message, "index"), _optional_int_header(message, "attempt"),
                     _optional_int_header(message, "closing"), _optional_int_header(message, "output_bytes"),
                     _optional_count_header(message, "operation_ns"))
        _expect_topic(message, resource_topic(sample.order_id))
        return sample


@dataclass(frozen=True)
class Deviation:
    """A scored sample: one sample of a task run with what the model expected (P50 and the
    P10-P90 band), its score and verdict, under one model version. The one shape of a scored
    sample from the detector to the ``deviations`` table and the ``anomalies`` topic.

    Only anomalies go on the topic, each at the sample that raised it (``raised``: the first
    of its episode), so a decoded one is always ``anomaly`` and ``raised``. ``raised`` is
    neither stored nor compared."""

    order_id: int
    task: str
    index: int  # the task run's position in the order
    resource: str
    timestamp_ms: int
    value: float
    expected: float
    lower: float
    upper: float
    score: float
    model_version: str
    anomaly: bool = True
    raised: bool = field(default=False, compare=False)

    _NUMBERS = ("value", "expected", "lower", "upper", "score")

    def encode(self) -> Message:
        key = f"{_check_order_id(self.order_id)}:{check_task_name(self.task)}:{self.resource}"
        value = json.dumps({name: round(float(getattr(self, name)), 6) for name in self._NUMBERS},
                           sort_keys=True)
        headers = _headers(order_id=self.order_id, task=self.task, index=self.index,
                           resource=self.resource, model_version=self.model_version)
        return Message(ANOMALIES_TOPIC, key, value, headers, timestamp_ms=self.timestamp_ms)

    @classmethod
    def decode(cls, message: Message) -> "Deviation":
        _expect_topic(message, ANOMALIES_TOPIC)
        parts = message.key.split(":")
        if len(parts) != 3:
            raise ProtocolError(f"anomaly key {message.key!r}: expected orderID:task_name:resource_name")
        try:
            numbers = json.loads(message.value)
            values = {name: float(numbers[name]) for name in cls._NUMBERS}
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"anomaly value {message.value!r}: {exc}") from None
        if message.timestamp_ms is None:
            raise ProtocolError("anomaly without a timestamp")
        return cls(_parse_order_id(parts[0]), check_task_name(parts[1]), _int_header(message, "index"),
                   parts[2], message.timestamp_ms, model_version=message.header("model_version") or "",
                   anomaly=True, raised=True, **values)


TaskTopicMessage = TaskStarted | TaskHalted | OrderStopped | MonitorTerminated
ResourceTopicMessage = Sample | MonitorStopped


def decode_task_topic(message: Message, order_id: int) -> TaskTopicMessage:
    """Decode anything found on ``task<order_id>``."""
    decoders = {
        Key.ORDER.value: TaskStarted.decode,
        Key.HALT.value: lambda m: TaskHalted.decode(m, order_id),
        Key.STOP.value: lambda m: OrderStopped.decode(m, order_id),
        Key.TERMINATE.value: lambda m: MonitorTerminated.decode(m, order_id),
    }
    decoder = decoders.get(message.key)
    if decoder is None:
        raise ProtocolError(f"unexpected key {message.key!r} on {message.topic}")
    decoded = decoder(message)
    if decoded.order_id != order_id:
        raise ProtocolError(f"message for order {decoded.order_id} on {message.topic}")
    return decoded


def decode_resource_topic(message: Message, order_id: int) -> ResourceTopicMessage:
    """Decode anything found on ``resource<order_id>``."""
    if message.key == Key.STOP.value:
        return MonitorStopped.decode(message, order_id)
    sample = Sample.decode(message)
    if sample.order_id != order_id:
        raise ProtocolError(f"sample for order {sample.order_id} on {message.topic}")
    return sample


def _format_usage(value: float) -> str:
    # repr gives the shortest digits that read back as the same float, but writes tiny and
    # large values with an exponent ('1e-05'); the protocol's consumers expect a plain decimal,
    # and Decimal writes the same digits without one, so nothing is rounded away.
    return format(Decimal(repr(float(value))), "f")


def _headers(**values: object) -> Headers:
    return tuple((name, str(value).encode("utf-8")) for name, value in values.items() if value is not None)


def _int_header(message: Message, name: str, default: int | None = None) -> int:
    text = message.header(name)
    if text is None:
        if default is None:
            raise ProtocolError(f"{message.key} message lacks the {name!r} header")
        return default
    try:
        return int(text)
    except ValueError:
        raise ProtocolError(f"{message.key} header {name}={text!r} is not an integer") from None


def _optional_int_header(message: Message, name: str) -> int | None:
    return None if message.header(name) is None else _int_header(message, name)


def _optional_count_header(message: Message, name: str) -> int | None:
    value = _optional_int_header(message, name)
    if value is not None and value < 0:
        raise ProtocolError(f"{message.key} header {name!r} must not be negative: {value}")
    return value


def _check_order_id(order_id: int) -> int:
    if isinstance(order_id, bool) or not isinstance(order_id, int) or order_id <= 0:
        raise ProtocolError(f"orderID {order_id!r} is not a positive integer")
    return order_id


def _parse_order_id(text: str | None) -> int:
    # isdigit alone accepts non-ASCII digits ('²' makes int() raise ValueError, not ProtocolError).
    if text is None or not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise ProtocolError(f"orderID {text!r} is not a positive integer")
    return int(text)


def _expect_key(message: Message, key: Key) -> None:
    if message.key != key.value:
        raise ProtocolError(f"expected key {key.value}, got {message.key!r}")


def _expect_topic(message: Message, topic: str) -> None:
    if message.topic != topic:
        raise ProtocolError(f"{message.key} message on topic {message.topic!r}, expected {topic!r}")

