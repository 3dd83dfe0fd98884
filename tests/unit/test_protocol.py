"""The message protocol of docs/protocol.md: every message round-trips and looks exactly as the
table prescribes on the wire; anything malformed is refused with a ProtocolError that says why."""

from __future__ import annotations

from dataclasses import replace
import math
import re

import pytest

from pipeline.errors import ProtocolError
from pipeline.protocol import (
    Message,
    MonitorStopped,
    MonitorTerminated,
    OrderStopped,
    Progress,
    Sample,
    TaskHalted,
    TaskStarted,
    TaskStatus,
    TaskTotals,
    decode_output,
    decode_resource_topic,
    decode_task_topic,
    encode_output,
)

ORDER_ID = 5
SAMPLE_TIME_MS = 1_700_000_000_123
AWKWARD_OUTPUT = "/data/run 1/out:blur 100%.png"


def headers_of(message: Message) -> dict[str, str]:
    return {name: raw.decode("utf-8") for name, raw in message.headers}


def started(**fields: object) -> TaskStarted:
    values = dict(required_tasks=("resize", "blur"), task_name="blur", order_id=ORDER_ID,
                  pid=4242, host="node-1", index=1)
    return TaskStarted(**{**values, **fields})


def progress(**fields: object) -> Progress:
    values = dict(order_id=ORDER_ID, task="blur", index=1, status=TaskStatus.SUCCEEDED,
                  outputs=("/data/resized.png", "/data/blurred.png"))
    return Progress(**{**values, **fields})


def sample(**fields: object) -> Sample:
    values = dict(required_tasks=("resize", "blur"), task_name="blur", order_id=ORDER_ID,
                  resource="cpu", value=37.5, timestamp_ms=SAMPLE_TIME_MS)
    return Sample(**{**values, **fields})


def message(topic: str, key: str, value: str, timestamp_ms: int | None = None,
            **headers: str) -> Message:
    return Message(topic, key, value, tuple((n, v.encode()) for n, v in headers.items()),
                   timestamp_ms=timestamp_ms)


# --- round trips, and the exact wire form of each message ---------------------------------


def test_task_started_is_order_on_the_task_topic_with_pid_and_host() -> None:
    original = started()
    wire = original.encode()

    assert (wire.topic, wire.key, wire.value) == ("task5", "ORDER", "resize,blur:blur:5")
    headers = headers_of(wire)
    assert headers["pid"] == "4242"
    assert headers["host"] == "node-1"
    assert TaskStarted.decode(wire) == original


def test_progress_goes_to_the_orchestrator_topic_with_all_outputs_so_far() -> None:
    original = progress()
    wire = original.encode()

    assert (wire.topic, wire.key) == ("orchestrator", "PROGRESS")
    assert wire.value == "/data/resized.png:/data/blurred.png"
    headers = headers_of(wire)
    assert (headers["order_id"], headers["task"], headers["index"], headers["status"]) == (
        "5", "blur", "1", "succeeded")
    assert Progress.decode(wire) == original
    assert Progress.decode(wire).output == "/data/blurred.png"


def test_progress_of_a_failed_first_task_has_no_outputs() -> None:
    original = progress(task="resize", index=0, status=TaskStatus.FAILED, outputs=(),
                        error="resize: image is empty")
    wire = original.encode()

    assert wire.value == ""
    assert headers_of(wire)["status"] == "failed"
    decoded = Progress.decode(wire)
    assert decoded == original
    assert decoded.outputs == ()
    assert decoded.output is None


def test_an_output_with_colons_percents_and_spaces_round_trips_without_a_raw_colon() -> None:
    encoded = encode_output(AWKWARD_OUTPUT)
    assert ":" not in encoded and " " not in encoded
    assert decode_output(encoded) == AWKWARD_OUTPUT

    original = progress(outputs=("/data/resized.png", AWKWARD_OUTPUT, "bild-größe.png"))
    wire = original.encode()
    assert wire.value.count(":") == 2  # only the two separators
    assert Progress.decode(wire).outputs == original.outputs


@pytest.mark.parametrize(
    ("signal", "topic", "word"),
    [
        (TaskHalted(ORDER_ID), "task5", "HALT"),
        (OrderStopped(ORDER_ID), "task5", "STOP"),
        (MonitorStopped(ORDER_ID), "resource5", "STOP"),
        (MonitorTerminated(ORDER_ID), "task5", "TERMINATE"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_signals_carry_the_same_word_as_key_and_value(signal, topic: str, word: str) -> None:
    wire = signal.encode()

    assert (wire.topic, wire.key, wire.value) == (topic, word, word)
    assert type(signal).decode(wire, ORDER_ID) == signal


def test_sample_key_names_tasks_order_and_resource_and_keeps_the_sample_time() -> None:
    original = sample(resource="memory", value=812.25)
    wire = original.encode()

    assert (wire.topic, wire.key, wire.value) == (
        "resource5", "resize,blur:blur:5:memory", "812.25")
    assert wire.timestamp_ms == SAMPLE_TIME_MS
    assert Sample.decode(wire) == original


@pytest.mark.parametrize("usage", [1e-5, 1.234567e-7, 5e-10, 1e-12, 3.0e-300, 1e16, 1.5e20, 2.5e300])
def test_tiny_and_large_usage_is_a_plain_decimal_that_reads_back(usage: float) -> None:
    wire = sample(value=usage).encode()

    assert re.fullmatch(r"\d+(\.\d+)?", wire.value), wire.value
    assert Sample.decode(wire).value == pytest.approx(usage, rel=1e-12, abs=0)


def test_zero_usage_round_trips() -> None:
    assert Sample.decode(sample(value=0.0).encode()).value == 0.0


def test_order_carries_the_attempt_and_the_process_start_in_headers() -> None:
    original = started(attempt=2, started_ns=123_456_789_000)
    wire = original.encode()

    assert wire.value == "resize,blur:blur:5"
    assert (headers_of(wire)["attempt"], headers_of(wire)["started_ns"]) == ("2", "123456789000")
    assert TaskStarted.decode(wire) == original


def test_halt_carries_the_tasks_totals_in_headers_and_keeps_its_value() -> None:
    totals = TaskTotals(cpu_ns=341_000_000, ended_ns=9_000_000_000, ended_ms=SAMPLE_TIME_MS,
                        peak_rss_kib=79_872, read_bytes=0, write_bytes=1_220_608, cpu_wait_ns=12_000)
    wire = TaskHalted(ORDER_ID, totals).encode()

    assert (wire.topic, wire.key, wire.value) == ("task5", "HALT", "HALT")
    assert headers_of(wire)["cpu_ns"] == "341000000"
    assert TaskHalted.decode(wire, ORDER_ID).totals == totals


def test_halt_without_totals_and_totals_without_io_read_back_as_such() -> None:
    assert TaskHalted.decode(TaskHalted(ORDER_ID).encode(), ORDER_ID).totals is None
    partial = TaskTotals(cpu_ns=1, ended_ns=2, ended_ms=3, peak_rss_kib=4)
    decoded = TaskHalted.decode(TaskHalted(ORDER_ID, partial).encode(), ORDER_ID).totals
    assert decoded == partial and decoded.read_bytes is None and decoded.cpu_wait_ns is None


def test_the_operations_cpu_time_travels_on_progress_halt_and_the_closing_sample() -> None:
    progress = Progress(ORDER_ID, "blur", 1, TaskStatus.SUCCEEDED, ("a.png", "b.png"), operation_ns=41_500_000)
    assert headers_of(progress.encode())["operation_ns"] == "41500000"
    assert Progress.decode(progress.encode()) == progress
    totals = TaskTotals(cpu_ns=341_000_000, ended_ns=9, ended_ms=SAMPLE_TIME_MS, peak_rss_kib=4,
                        operation_ns=41_500_000)
    assert TaskHalted.decode(TaskHalted(ORDER_ID, totals).encode(), ORDER_ID).totals == totals
    closing = replace(sample(index=1, attempt=1), closing=6, operation_ns=41_500_000)
    assert Sample.decode(closing.encode()) == closing
    # absent on older tasks' messages; a negative time is refused
    assert Progress.decode(Progress(ORDER_ID, "blur", 1, TaskStatus.SUCCEEDED).encode()).operation_ns is None
    forged = replace(progress, operation_ns=-5).encode()
    with pytest.raises(ProtocolError, match="operation_ns"):
        Progress.decode(forged)


def test_a_sample_names_its_run_in_headers_and_the_key_stays_the_seeds() -> None:
    original = sample(index=1, attempt=2)
    wire = original.encode()

    assert wire.key == "resize,blur:blur:5:cpu"
    assert (headers_of(wire)["index"], headers_of(wire)["attempt"]) == ("1", "2")
    assert Sample.decode(wire) == original


# --- dispatch by topic --------------------------------------------------------------------


@pytest.mark.parametrize(
    "original",
    [started(), TaskHalted(ORDER_ID), OrderStopped(ORDER_ID), MonitorTerminated(ORDER_ID)],
    ids=lambda m: type(m).__name__,
)
def test_decode_task_topic_recognises_every_task_topic_message(original) -> None:
    assert decode_task_topic(original.encode(), ORDER_ID) == original


@pytest.mark.parametrize("original", [sample(), MonitorStopped(ORDER_ID)],
                         ids=lambda m: type(m).__name__)
def test_decode_resource_topic_recognises_samples_and_stop(original) -> None:
    assert decode_resource_topic(original.encode(), ORDER_ID) == original


def test_stop_on_the_task_topic_and_stop_on_the_resource_topic_are_different_messages() -> None:
    assert isinstance(decode_task_topic(OrderStopped(ORDER_ID).encode(), ORDER_ID), OrderStopped)
    assert isinstance(decode_resource_topic(MonitorStopped(ORDER_ID).encode(), ORDER_ID),
                      MonitorStopped)


# --- malformed input ----------------------------------------------------------------------

GOOD_ORDER_HEADERS = {"pid": "4242", "host": "node-1"}
GOOD_PROGRESS_HEADERS = {"order_id": "5", "task": "blur", "index": "1", "status": "succeeded"}


def order(value: str, topic: str = "task5", **headers: str) -> Message:
    return message(topic, "ORDER", value, **{**GOOD_ORDER_HEADERS, **headers})


def order_without(header: str) -> Message:
    kept = {n: v for n, v in GOOD_ORDER_HEADERS.items() if n != header}
    return message("task5", "ORDER", "blur:blur:5", **kept)


def progress_msg(value: str = "/a.png", topic: str = "orchestrator", **headers: str) -> Message:
    return message(topic, "PROGRESS", value, **{**GOOD_PROGRESS_HEADERS, **headers})


def progress_without(header: str) -> Message:
    kept = {n: v for n, v in GOOD_PROGRESS_HEADERS.items() if n != header}
    return message("orchestrator", "PROGRESS", "/a.png", **kept)


def sample_msg(key: str = "blur:blur:5:cpu", value: str = "12.5", topic: str = "resource5",
               timestamp_ms: int | None = SAMPLE_TIME_MS) -> Message:
    return message(topic, key, value, timestamp_ms=timestamp_ms)


def on_task_topic(m: Message) -> object:
    return decode_task_topic(m, ORDER_ID)


def on_resource_topic(m: Message) -> object:
    return decode_resource_topic(m, ORDER_ID)


MALFORMED = [
    # (id, decoder, message, what the error must say)
    ("wrong key for ORDER", TaskStarted.decode, message("task5", "PROGRESS", "blur:blur:5"),
     "expected key ORDER"),
    ("wrong key for PROGRESS", Progress.decode, message("orchestrator", "ORDER", "x"),
     "expected key PROGRESS"),
    ("unknown key on task topic", on_task_topic, message("task5", "HELLO", "HELLO"),
     "unexpected key 'HELLO'"),
    ("HALT with another value", on_task_topic, message("task5", "HALT", "STOP"),
     "HALT message has value 'STOP'"),
    ("HALT totals that are not numbers", on_task_topic,
     message("task5", "HALT", "HALT", ended_ns="9", ended_ms="9", cpu_ns="lots", peak_rss_kib="1"),
     "header cpu_ns='lots' is not an integer"),
    ("HALT totals without the CPU", on_task_topic,
     message("task5", "HALT", "HALT", ended_ns="9", ended_ms="9", peak_rss_kib="1"),
     "lacks the 'cpu_ns' header"),
    ("negative HALT totals", on_task_topic,
     message("task5", "HALT", "HALT", ended_ns="9", ended_ms="9", cpu_ns="-5", peak_rss_kib="1"),
     "must not be negative"),
    ("sample index that is not a number", on_resource_topic,
     message("resource5", "blur:blur:5:cpu", "1.0", timestamp_ms=SAMPLE_TIME_MS, index="first"),
     "header index='first' is not an integer"),
    ("ORDER value with two fields", TaskStarted.decode, order("blur:5"),
     "expected required_tasks:task_name:orderID"),
    ("ORDER value with four fields", TaskStarted.decode, order("blur:blur:5:extra"),
     "expected required_tasks:task_name:orderID"),
    ("task name with a colon", TaskStarted.decode, order("bl:ur:blur:5"),
     "expected required_tasks:task_name:orderID"),
    ("sample key with three fields", Sample.decode, sample_msg(key="blur:blur:5"),
     "expected required_tasks:task_name:orderID:resource_name"),
    ("sample key with five fields", Sample.decode, sample_msg(key="blur:blur:5:cpu:x"),
     "expected required_tasks:task_name:orderID:resource_name"),
    ("sample with a bad resource name", Sample.decode, sample_msg(key="blur:blur:5:CPU"),
     "bad resource name 'CPU'"),
    ("non-numeric usage", Sample.decode, sample_msg(value="lots"), "'lots' is not a number"),
    ("empty usage", Sample.decode, sample_msg(value=""), "is not a number"),
    ("nan usage", Sample.decode, sample_msg(value="nan"), "not a finite number"),
    ("inf usage", Sample.decode, sample_msg(value="inf"), "not a finite number"),
    ("-Infinity usage", Sample.decode, sample_msg(value="-Infinity"), "not a finite number"),
    ("uppercase task name", TaskStarted.decode, order("blur:Blur:5"), "bad task name 'Blur'"),
    ("task name starting with a digit", TaskStarted.decode, order("2blur:blur:5"),
     "bad task name '2blur'"),
    ("uppercase task name in a sample", Sample.decode, sample_msg(key="Blur:blur:5:cpu"),
     "bad task name 'Blur'"),
    ("task header with a colon", Progress.decode, progress_msg(task="bl:ur"),
     "bad task name 'bl:ur'"),
    ("empty required_tasks", TaskStarted.decode, order(":blur:5"), "required_tasks is empty"),
    ("empty name in required_tasks", TaskStarted.decode, order("resize,,blur:blur:5"),
     "bad task name ''"),
    ("empty required_tasks in a sample", Sample.decode, sample_msg(key=":blur:5:cpu"),
     "required_tasks is empty"),
    ("ORDER without pid", TaskStarted.decode, order_without("pid"), "lacks the 'pid' header"),
    ("ORDER without host", TaskStarted.decode, order_without("host"), "lacks the 'host' header"),
    ("PROGRESS without status", Progress.decode, progress_without("status"), "status header"),
    ("PROGRESS without task", Progress.decode, progress_without("task"),
     "lacks the 'task' header"),
    ("PROGRESS without index", Progress.decode, progress_without("index"),
     "lacks the 'index' header"),
    ("PROGRESS without order_id", Progress.decode, progress_without("order_id"), "orderID None"),
    ("non-integer pid", TaskStarted.decode, order("blur:blur:5", pid="abc"),
     "pid='abc' is not an integer"),
    ("non-integer index", Progress.decode, progress_msg(index="first"),
     "index='first' is not an integer"),
    ("bad status", Progress.decode, progress_msg(status="done"),
     "status header 'done' is not succeeded/failed"),
    ("order id 0", TaskStarted.decode, order("blur:blur:0", topic="task0"),
     "orderID '0' is not a positive integer"),
    ("negative order id", TaskStarted.decode, order("blur:blur:-5", topic="task-5"),
     "orderID '-5' is not a positive integer"),
    ("non-numeric order id", TaskStarted.decode, order("blur:blur:five", topic="taskfive"),
     "orderID 'five' is not a positive integer"),
    ("non-ASCII digit order id", TaskStarted.decode, order("blur:blur:²"),
     "orderID '²' is not a positive integer"),
    ("order id 0 in PROGRESS", Progress.decode, progress_msg(order_id="0"),
     "orderID '0' is not a positive integer"),
    ("order id in a sample key", Sample.decode, sample_msg(key="blur:blur:x:cpu"),
     "orderID 'x' is not a positive integer"),
    ("ORDER for order 5 on task6", TaskStarted.decode, order("blur:blur:5", topic="task6"),
     "ORDER message on topic 'task6', expected 'task5'"),
    ("ORDER for order 5 read as order 6", lambda m: decode_task_topic(m, 6), order("blur:blur:5"),
     "message for order 5 on task5"),
    ("PROGRESS on a task topic", Progress.decode, progress_msg(topic="task5"),
     "expected 'orchestrator'"),
    ("HALT on the resource topic", on_task_topic, message("resource5", "HALT", "HALT"),
     "expected 'task5'"),
    ("STOP of the task topic read as resource STOP", on_resource_topic,
     message("task5", "STOP", "STOP"), "expected 'resource5'"),
    ("sample for order 5 on resource6", Sample.decode, sample_msg(topic="resource6"),
     "expected 'resource5'"),
    ("sample for order 6 on resource6 read as order 5", on_resource_topic,
     sample_msg(key="blur:blur:6:cpu", topic="resource6"), "sample for order 6"),
    ("sample without timestamp", Sample.decode, sample_msg(timestamp_ms=None), "no timestamp"),
]


@pytest.mark.parametrize(("decoder", "wire", "reason"), [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_messages_are_refused_with_the_reason(decoder, wire: Message, reason: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        decoder(wire)


def test_a_raw_colon_inside_an_output_is_refused() -> None:
    with pytest.raises(ProtocolError, match="must be percent-encoded"):
        decode_output("/data/out:blur.png")


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: started(task_name="Blur"), "bad task name 'Blur'"),
        (lambda: started(task_name="bl:ur"), "bad task name 'bl:ur'"),
        (lambda: started(required_tasks=()), "required_tasks is empty"),
        (lambda: started(order_id=0), "orderID 0 is not a positive integer"),
        (lambda: progress(order_id=-1), "orderID -1 is not a positive integer"),
        (lambda: sample(value=math.nan), "not a finite number"),
        (lambda: sample(value=math.inf), "not a finite number"),
        (lambda: sample(resource="disk read"), "bad resource name"),
        (lambda: TaskHalted(0), "orderID 0 is not a positive integer"),
    ],
    ids=["uppercase task", "colon in task", "no required tasks", "order 0", "negative order",
         "nan usage", "inf usage", "bad resource", "signal for order 0"],
)
def test_nothing_malformed_can_be_encoded(build, reason: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        build().encode()
