"""Anomalies where the user looks: the orchestrator's live ANOMALY line, the summary's list
(first sample of each episode, from the database and the messages received), and malformed
messages on the anomalies topic skipped and counted."""

from __future__ import annotations

import io
import logging
import re
import threading
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from orchestrator import anomaly_feed
from orchestrator.anomalies import live_line, order_anomalies, wait_for_scoring
from orchestrator.anomaly_feed import AnomalyFeed
from orchestrator.report import OrderResult, Reporter, TaskResult, format_summary
from pipeline.db import MeasurementWriter, connect, create_schema
from pipeline.db.deviations import DeviationStore
from pipeline.db.orders import OrderStore, RunStatus
from pipeline.errors import KafkaClientError
from pipeline.protocol import ANOMALIES_TOPIC, Deviation, Message, Sample

T0 = 1_700_000_000_000


def _anomaly(resource="cpu_demand", value=412.0, lower=85.0, upper=110.0, score=18.2, order_id=7, index=0,
             task="median", ts=T0) -> Deviation:
    return Deviation(order_id, task, index, resource, ts, value, (lower + upper) / 2, lower, upper, score, "3")


@pytest.mark.parametrize("resource, value, lower, upper, score, text", [
    ("cpu_demand", 412.0, 85.0, 110.0, 18.2, "cpu_demand 412.0% against band 85.0-110.0% (score +18.2)"),
    ("cpu", 250.0, 90.0, 101.0, 9.75, "cpu 250.0% against band 90.0-101.0% (score +9.8)"),
    ("cpu_wait", 80.0, 0.0, 4.5, 12.0, "cpu_wait 80.0% against band 0.0-4.5% (score +12.0)"),
    ("memory", 812.25, 60.0, 75.5, 30.0, "memory 812.2 MiB against band 60.0-75.5 MiB (score +30.0)"),
    ("disk_write", 32768.0, 0.0, 120.0, 7.0, "disk_write 32768.0 KiB/s against band 0.0-120.0 KiB/s (score +7.0)"),
    ("disk_read", 0.012, 0.0, 0.0, 3.0, "disk_read 0.012 KiB/s against band 0.0-0.0 KiB/s (score +3.0)"),
    ("cpu_seconds", 3.1, 2.0, 2.2, 9.1, "cpu_seconds 3.1 CPU-s against band 2.0-2.2 CPU-s (run total; score +9.1)"),
    ("cpu_seconds", 1.6, 0.093, 0.12, 15.8,
     "cpu_seconds 1.6 CPU-s against band 0.093-0.12 CPU-s (run total; score +15.8)"),
    ("bytes_written", 4096.0, 2000.0, 2100.0, 40.0,
     "bytes_written 4096.0 KiB against band 2000.0-2100.0 KiB (run total; score +40.0)"),
    ("gpu_fan", 3.0, 1.0, 2.0, -4.0, "gpu_fan 3.0 against band 1.0-2.0 (score -4.0)"),
])
def test_the_anomaly_line_names_task_resource_value_band_and_score_in_the_resources_unit(
        resource, value, lower, upper, score, text):
    anomaly = _anomaly(resource, value, lower, upper, score, index=1, task="blur")
    assert live_line(anomaly, 3) == f"ANOMALY task 2/3 blur {text}"


class _Unused:
    """The feed's Kafka reader: these tests hand messages to the feed directly."""

    def close(self) -> None:
        pass


def test_an_anomaly_of_a_registered_order_is_printed_at_once_and_kept_others_are_ignored():
    stream = io.StringIO()
    feed = AnomalyFeed(_Unused(), Reporter(stream))
    feed.register(7, "nightly", 3)
    assert feed.handle(_anomaly().encode()) is not None
    assert feed.handle(_anomaly(order_id=8).encode()) is None  # another orchestrator's order
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\[ +\d+\.\ds\] order 7 nightly: ANOMALY task 1/3 median cpu_demand 412\.0% against "
                        r"band 85\.0-110\.0% \(score \+18\.2\)", lines[0]), lines[0]
    assert [a.resource for a in feed.received(7)] == ["cpu_demand"] and feed.received(8) == []
    assert feed.malformed == 0


@pytest.mark.parametrize("message", [
    Message(ANOMALIES_TOPIC, "7:median:cpu", "not json", (("index", b"0"),), T0),
    Message(ANOMALIES_TOPIC, "7:median:cpu", '{"value": 1}', (("index", b"0"),), T0),
    Message(ANOMALIES_TOPIC, "7:median", '{"value": 1, "expected": 1, "lower": 1, "upper": 1, "score": 1}',
            (("index", b"0"),), T0),
    Message(ANOMALIES_TOPIC, "seven:median:cpu", _anomaly().encode().value, (("index", b"0"),), T0),
    replace(_anomaly().encode(), timestamp_ms=None),
    replace(_anomaly().encode(), headers=()),
])
def test_a_malformed_anomaly_message_is_skipped_and_counted(message, caplog):
    stream = io.StringIO()
    feed = AnomalyFeed(_Unused(), Reporter(stream))
    feed.register(7, "nightly", 3)
    assert feed.handle(message) is None
    assert feed.malformed == 1 and stream.getvalue() == "" and feed.received(7) == []
    assert not any(record.exc_info for record in caplog.records)
    feed.handle(_anomaly().encode())  # and the next good one is shown as ever
    assert feed.received(7) and "ANOMALY" in stream.getvalue()


class _Lines(io.StringIO):
    """A progress stream that says when something was written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


class _LateTopic:
    """A reader of a topic that appears only on the third look, then holds one anomaly."""

    def __init__(self, message: Message) -> None:
        self.adds: list[bool] = []
        self.message = message
        self.closed = threading.Event()

    def add(self, topics, from_end=False, timeout=30.0):
        assert topics == [ANOMALIES_TOPIC]
        self.adds.append(from_end)
        if len(self.adds) < 3:
            raise KafkaClientError(f"topic {ANOMALIES_TOPIC} does not exist")

    def poll(self, timeout=1.0):
        message, self.message = self.message, None
        if message is None:
            self.closed.wait(timeout)  # as a real poll: nothing within the timeout
        return message

    def close(self) -> None:
        self.closed.set()


def test_a_topic_that_appears_later_is_read_from_its_beginning_without_failing_or_spamming(monkeypatch, caplog):
    monkeypatch.setattr(anomaly_feed, "ATTACH_RETRY_SECONDS", 0.01)
    caplog.set_level(logging.DEBUG, logger="orchestrator.anomaly_feed")
    stream = _Lines()
    consumer = _LateTopic(_anomaly().encode())
    feed = AnomalyFeed(consumer, Reporter(stream))
    feed.register(7, "nightly", 3)
    feed.start()
    try:
        assert stream.written.wait(10), "the anomaly was never read"
    finally:
        feed.close()
    # From its end at start; once it appeared, from its beginning (all of it is newer).
    assert consumer.adds == [True, False, False]
    assert [a.resource for a in feed.received(7)] == ["cpu_demand"] and "ANOMALY" in stream.getvalue()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len([m for m in said if "not reading" in m]) == 1 and not any(r.exc_info for r in caplog.records)


def _row(order_id, position, task, resource, second, value, flagged, score=None):
    return Deviation(order_id, task, position, resource, T0 + second * 1000, value, 95.0, 85.0, 110.0,
                     score if score is not None else (8.0 if flagged else 0.5), "3", flagged)


@pytest.fixture()
def engine(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'anomalies.db'}")
    create_schema(engine)
    return engine


def _order(engine, name, tasks=("median", "grayscale")) -> int:
    store = OrderStore(engine)
    order_id = store.create(name, "a.jpg", ",".join(tasks))
    store.set_status(order_id, RunStatus.RUNNING)
    for position, task in enumerate(tasks):
        store.start_task(order_id, position, 1, task,
                         started=datetime.fromtimestamp((T0 + position * 20_000) / 1000, tz=timezone.utc))
        store.finish_task(order_id, position, 1, "SUCCEEDED", output=f"/out/{position}.png")
    return order_id


def test_the_summary_lists_the_first_sample_of_each_episode_and_says_no_anomalies_when_clean(engine):
    flagged_order, clean, unscored = _order(engine, "hog"), _order(engine, "clean"), _order(engine, "plain")
    cpu = [False, False, True, True, True, False, True, True]  # two episodes, from second 3 and 7
    rows = [_row(flagged_order, 0, "median", "cpu", s + 1, 400.0 + s, f) for s, f in enumerate(cpu)]
    rows += [_row(flagged_order, 0, "median", "memory", s + 1, 60.0, False) for s in range(8)]
    # The second task overruns from second 1 of its run; scoring has stored only its first
    # row so far, and the message received says the rest.
    rows += [_row(flagged_order, 1, "grayscale", "cpu_seconds", 20, 30.0, False)]
    rows += [_row(clean, 0, "median", "cpu", s + 1, 96.0, False) for s in range(4)]
    DeviationStore(engine).write(rows)
    received = [Deviation(flagged_order, "grayscale", 1, "cpu_seconds", T0 + 21_000, 31.0, 95.0, 85.0, 110.0, 8.0,
                          "3"),
                # the message of an episode also stored is listed once
                Deviation(flagged_order, "median", 0, "cpu", T0 + 3000, 402.0, 95.0, 85.0, 110.0, 8.0, "3")]

    found = order_anomalies(engine, flagged_order, received)
    assert [(f.position, f.resource, f.timestamp_ms, f.after_start) for f in found.flags] == [
        (0, "cpu", T0 + 3000, 3.0), (0, "cpu", T0 + 7000, 7.0), (1, "cpu_seconds", T0 + 21000, 1.0)]
    assert found.versions == ["3"]
    assert order_anomalies(engine, clean).flags == []
    assert order_anomalies(engine, unscored) is None

    results = [OrderResult("hog", "hog.json", flagged_order, "SUCCEEDED", 30.0, 16,
                           [TaskResult(0, "median", "SUCCEEDED", 1, 9.0, "/out/0.png"),
                            TaskResult(1, "grayscale", "SUCCEEDED", 1, 1.0, "/out/1.png")], anomalies=found),
               OrderResult("clean", "clean.json", clean, "SUCCEEDED", 5.0, 4,
                           [TaskResult(0, "median", "SUCCEEDED", 1, 4.0)],
                           anomalies=order_anomalies(engine, clean)),
               OrderResult("plain", "plain.json", unscored, "SUCCEEDED", 5.0, 4,
                           [TaskResult(0, "median", "SUCCEEDED", 1, 4.0)], anomalies=None)]
    text = format_summary(results)
    lines = text.splitlines()
    assert lines[0] == f"order {flagged_order} hog (hog.json): SUCCEEDED in 30.0s, 16 sample rows stored, 3 ANOMALIES"
    assert lines[3:6] == [
        "  ANOMALY task 1 median: cpu 402.0% against band 85.0-110.0% (score +8.0), 3.0s after the task started",
        "  ANOMALY task 1 median: cpu 406.0% against band 85.0-110.0% (score +8.0), 7.0s after the task started",
        "  ANOMALY task 2 grayscale: cpu_seconds 31.0 CPU-s against band 85.0-110.0 CPU-s (run total; score +8.0), "
        "1.0s after the task started",
    ]
    assert lines[6] == f"order {clean} clean (clean.json): SUCCEEDED in 5.0s, 4 sample rows stored"
    assert lines[8] == "  no anomalies (scored by model version 3)"
    assert lines[9].startswith(f"order {unscored} plain") and len(lines) == 11
    assert "anomal" not in "\n".join(lines[9:]).lower()


def test_an_anomaly_of_an_unknown_run_is_given_its_time_of_day(engine):
    order_id = OrderStore(engine).create("early", "a.jpg", "median")
    found = order_anomalies(engine, order_id, [_anomaly(order_id=order_id)])
    assert found.flags[0].after_start is None
    when = datetime.fromtimestamp(T0 / 1000).strftime("%H:%M:%S")
    assert f"(score +18.2), at {when}" in format_summary([OrderResult("early", "e.json", order_id,
                                                                      anomalies=found)])


def test_the_summary_waits_for_scoring_to_reach_the_last_samples_and_says_when_it_did_not(engine):
    behind, done, unscored = _order(engine, "behind"), _order(engine, "done"), _order(engine, "plain")
    samples = [Sample((), "median", o, "cpu", 96.0, T0 + s * 1000, 0, 1) for o in (behind, done, unscored)
               for s in range(1, 5)]
    MeasurementWriter(engine).write(samples)
    DeviationStore(engine).write([_row(behind, 0, "median", "cpu", s, 96.0, False) for s in range(1, 3)]
                                 + [_row(done, 0, "median", "cpu", s, 96.0, False) for s in range(1, 5)])
    assert wait_for_scoring(engine, [behind, done, unscored], timeout=0.3) == {behind}
    found = order_anomalies(engine, behind)
    found.caught_up = False
    text = format_summary([OrderResult("behind", "b.json", behind, "SUCCEEDED", anomalies=found)])
    assert "  no anomalies so far (scored by model version 3)" in text
    assert f"python -m orchestrator status {behind}" in text
