"""Samples to model rows: what is derived per tick, and that training and live scoring derive
the same features from the same stored samples (one code path, models.rows.model_rows)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from analysis.scoring import ConsecutiveFilter, Detector, ModelBandScorer
from models.features import FEATURE_COLUMNS
from models.rows import RAW_COLUMNS, RunState, model_rows
from monitor.live_scoring import LiveScorer
from pipeline.db import MeasurementWriter, connect, create_schema
from pipeline.db.deviations import DeviationStore
from pipeline.db.orders import OrderStore
from pipeline.protocol import Sample
from training.data import load_measurements

T0 = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
T0_MS = int(T0.timestamp() * 1000)


def _raw(run_ticks, started_ms=T0_MS) -> pd.DataFrame:
    rows = []
    for ts, values in run_ticks:
        for resource, value in values.items():
            rows.append({"order_id": 1, "position": 0, "attempt": 1, "task": "blur", "prev_task": "<none>",
                         "image_pixels": 1e6, "started_ms": started_ms, "ts_ms": ts, "resource": resource,
                         "value": value})
    return pd.DataFrame(rows, columns=RAW_COLUMNS)


TICKS = [
    (T0_MS + 1000, {"cpu": 40.0, "cpu_wait": 60.0, "memory": 50.0, "node_cpu_pressure": 70.0}),
    (T0_MS + 2000, {"cpu": 50.0, "cpu_wait": 50.0, "memory": 60.0, "node_cpu_pressure": 65.0}),
    (T0_MS + 2500, {"cpu": 100.0, "memory": 61.0}),  # closing sample, half a second, no cpu_wait
]


def test_each_tick_gets_its_demand_its_node_pressure_and_the_runs_cpu_time_so_far():
    rows = model_rows(_raw(TICKS))
    demand = rows[rows["resource"] == "cpu_demand"]
    assert demand["value"].tolist() == [100.0, 100.0]  # contention moved cpu to cpu_wait, not demand
    assert "node_cpu_pressure" not in set(rows["resource"])  # an input, never a target
    cpu = rows[rows["resource"] == "cpu"]
    assert cpu["node_cpu_pressure"].tolist()[:2] == [70.0, 65.0]
    assert cpu["interval_s"].tolist() == pytest.approx([1.0, 1.0, 0.5])
    assert cpu["cpu_seconds"].tolist() == pytest.approx([0.4, 0.9, 1.4])
    assert cpu["cpu_before"].tolist() == pytest.approx([0.0, 0.4, 0.9])  # the clock at the tick's start
    assert cpu["seconds"].tolist() == pytest.approx([1.0, 2.0, 2.5])


def test_a_run_fed_tick_by_tick_gets_the_rows_it_gets_whole():
    whole = model_rows(_raw(TICKS))
    state: dict[tuple, RunState] = {}
    parts = pd.concat([model_rows(_raw([tick]), state) for tick in TICKS], ignore_index=True)
    pd.testing.assert_frame_equal(parts, whole, check_dtype=False)


class _RecordingModel:
    """A wide constant band (no anomalies); keeps every frame it was asked about."""

    def __init__(self) -> None:
        self.frames: list[pd.DataFrame] = []

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        self.frames.append(frame.copy())
        return pd.DataFrame({"p10": 0.0, "p50": 1e6, "p90": 1e7}, index=frame.index)


def _stored_order(engine) -> int:
    store = OrderStore(engine)
    order_id = store.create("agree", "/in.png", "resize,blur", (800, 600))
    rng = random.Random(3)
    batch = []
    for position, (task, pixels, ticks) in enumerate((("resize", 480_000, 4), ("blur", 120_000, 6))):
        started = T0 + timedelta(seconds=10 * position)
        store.start_task(order_id, position, 1, task, started=started, input_pixels=pixels)
        for tick in range(1, ticks + 1):
            ts = int(started.timestamp() * 1000) + 1000 * tick - (300 if tick == ticks else 0)
            for resource in ("cpu", "memory", "disk_read", "disk_write", "cpu_wait", "node_cpu_pressure"):
                batch.append(Sample((), task, order_id, resource, round(rng.uniform(0, 150), 3), ts, position, 1))
        store.finish_task(order_id, position, 1, "SUCCEEDED", output=f"/out-{position}.png")
    MeasurementWriter(engine).write(batch)
    return order_id, batch


def test_training_and_live_scoring_derive_the_same_features_from_the_same_samples(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'pipeline.db'}")
    create_schema(engine)
    order_id, samples = _stored_order(engine)

    training = load_measurements(engine)

    model = _RecordingModel()
    live = LiveScorer(None, engine, None, "test")
    live.detector = Detector(ModelBandScorer(model), ConsecutiveFilter())
    live._store, live.model_version = DeviationStore(engine), "1"
    # Samples reach the consumer in batches that cut ticks apart.
    rng, start = random.Random(5), 0
    while start < len(samples):
        size = rng.randint(1, 9)
        live.score(samples[start:start + size])
        start += size
    live._finish_orders([order_id])
    scored = pd.concat(model.frames, ignore_index=True)

    key = ["task", "resource", "seconds"]
    want = training[FEATURE_COLUMNS].sort_values(key).reset_index(drop=True)
    got = scored[FEATURE_COLUMNS].sort_values(key).reset_index(drop=True)
    assert len(want) == 10 * 6  # 10 ticks, 5 resources and demand each
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert set(want["image_pixels"]) == {480_000, 120_000}  # the image each run read


class _Published(list):
    """Where an anomaly would be published: kept."""

    def send(self, message) -> None:
        self.append(message)


class _WorkOf:
    """Every task needs 0.1-0.2 CPU-seconds (spread 5 %) and holds ~60 MiB: a work model
    fitted on 20 generated runs of each task."""

    def __new__(cls):
        import numpy as np

        from models.work import ExpectedWork

        rng = np.random.default_rng(0)
        runs = pd.DataFrame([{"order_id": i, "position": 0, "attempt": 1, "task": task, "prev_task": "<none>",
                              "image_pixels": pixels, "params": "{}", "pressure": np.nan, "samples": 3,
                              "seconds": 1.0, "ended_ms": 0, "cpu_seconds": 1.0 * np.exp(rng.normal(0, 0.05)),
                              "peak_memory": 60.0 * np.exp(rng.normal(0, 0.01)), "bytes_read": 0.0,
                              "bytes_written": 100.0}
                             for i in range(20) for task, pixels in (("resize", 480_000), ("blur", 120_000))])
        return ExpectedWork.fit_runs(runs)


def test_live_scoring_judges_a_run_when_its_closing_sample_is_complete_not_at_the_orders_end(tmp_path):
    """The closing sample's messages say how many resources it has: once that many are
    stored, the run is over and its totals are judged, while the order still runs."""
    from dataclasses import replace

    from analysis.scoring import RunCheck

    engine = connect(f"sqlite:///{tmp_path / 'pipeline.db'}")
    create_schema(engine)
    order_id, samples = _stored_order(engine)
    live = LiveScorer(None, engine, _Published(), "test")
    thresholds = {f"run:{total}": 4.0 for total in ("cpu_seconds", "peak_memory", "bytes_read", "bytes_written")}
    live.detector = Detector(ModelBandScorer(_RecordingModel()), ConsecutiveFilter(), RunCheck(_WorkOf(), thresholds),
                             "1")
    live._store, live.model_version = DeviationStore(engine), "1"
    first_run = [s for s in samples if s.index == 0]
    closing_ms = max(s.timestamp_ms for s in first_run)
    marked = [replace(s, closing=6) if s.timestamp_ms == closing_ms else s for s in first_run]
    # (cpu_seconds may come early, as an overrun: these random samples use far more CPU)
    verdicts = lambda results: {r.resource for r in results if r.index == 0} & {"peak_memory", "bytes_written"}  # noqa: E731
    assert verdicts(live.score(marked[:-1])) == set()  # the closing tick lacks a resource: not yet over
    assert verdicts(live.score(marked[-1:])) == {"peak_memory", "bytes_written"}
    assert (order_id, 0, 1) not in live.detector.runs.open_runs()
    # the second run has no closing sample (a task killed): judged when the order is finished
    live.score([s for s in samples if s.index == 1])
    assert live.detector.runs.open_runs() == [(order_id, 1, 1)]
    live._finish_orders([order_id])
    assert live.detector.runs.open_runs() == []
    stored = DeviationStore(engine).read(order_id, "1")
    assert {(r.index, r.resource) for r in stored if r.resource in ("cpu_seconds", "peak_memory")} == \
        {(0, "cpu_seconds"), (0, "peak_memory"), (1, "cpu_seconds"), (1, "peak_memory")}
