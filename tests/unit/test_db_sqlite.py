"""Storage on the embedded SQLite database: idempotent schema and batch writes, stable name
ids shared by concurrent writers, and the order records the orchestrator keeps."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, inspect, select

from pipeline.db import MeasurementWriter, NameLookup, connect, create_schema
from pipeline.db.orders import OrderStore, RunStatus
from pipeline.db.schema import measurements, resources, task_runs, tasks
from pipeline.protocol import Sample

T0_MS = 1_700_000_000_000


@pytest.fixture
def url(tmp_path: Path) -> str:
    # A folder that does not exist yet: connect() creates it.
    return f"sqlite:///{tmp_path / 'state' / 'pipeline.db'}"


@pytest.fixture
def engine(url: str) -> Engine:
    engine = connect(url)
    create_schema(engine)
    yield engine
    engine.dispose()


def sample(second: int, task: str = "blur", resource: str = "cpu", order_id: int = 1,
           value: float = 12.5) -> Sample:
    return Sample(required_tasks=(), task_name=task, order_id=order_id, resource=resource, value=value,
                  timestamp_ms=T0_MS + second * 1000)


def row_count(engine: Engine, order_id: int | None = None) -> int:
    query = select(func.count()).select_from(measurements)
    if order_id is not None:
        query = query.where(measurements.c.order_id == order_id)
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def as_utc(stored: datetime) -> datetime:
    # SQLite keeps no zone: what comes back is the UTC wall time, without tzinfo.
    return stored.replace(tzinfo=timezone.utc) if stored.tzinfo is None else stored


# --- schema -------------------------------------------------------------------------------


def test_create_schema_twice_is_harmless(engine: Engine) -> None:
    MeasurementWriter(engine).write([sample(0)])

    create_schema(engine)

    assert {"tasks", "resources", "orders", "task_runs", "measurements"} <= set(
        inspect(engine).get_table_names())
    assert row_count(engine) == 1


# --- measurements -------------------------------------------------------------------------


def test_write_returns_the_number_of_new_rows(engine: Engine) -> None:
    batch = [sample(s, resource=r) for s in range(3) for r in ("cpu", "memory")]

    assert MeasurementWriter(engine).write(batch) == 6
    assert row_count(engine) == 6


def test_an_empty_batch_writes_nothing(engine: Engine) -> None:
    assert MeasurementWriter(engine).write([]) == 0
    assert row_count(engine) == 0


def test_a_redelivered_batch_changes_nothing(engine: Engine) -> None:
    batch = [sample(s) for s in range(5)]
    writer = MeasurementWriter(engine)
    writer.write(batch)

    assert writer.write(batch) == 0
    assert MeasurementWriter(engine).write(batch) == 0  # a restarted consumer, too
    assert row_count(engine) == 5


def test_a_batch_overlapping_an_earlier_one_stores_only_the_new_samples(engine: Engine) -> None:
    writer = MeasurementWriter(engine)
    writer.write([sample(s) for s in range(3)])

    assert writer.write([sample(s) for s in range(1, 5)]) == 2
    assert row_count(engine) == 5


def test_a_duplicate_inside_one_batch_is_stored_once(engine: Engine) -> None:
    batch = [sample(0), sample(1), sample(0)]

    assert MeasurementWriter(engine).write(batch) == 2
    assert row_count(engine) == 2


def test_stored_rows_keep_value_names_and_sample_time(engine: Engine) -> None:
    # Millisecond parts chosen to catch float rounding on the way to a datetime.
    times_ms = [T0_MS + 1, T0_MS + 123, T0_MS + 999, 1_712_345_678_901, 946_684_800_007]
    batch = [Sample(required_tasks=(), task_name="resize", order_id=3, resource="memory", value=100.0 + i,
                    timestamp_ms=ms) for i, ms in enumerate(times_ms)]
    MeasurementWriter(engine).write(batch)

    query = (select(measurements.c.ts, measurements.c.value, tasks.c.name, resources.c.name)
             .join(tasks, tasks.c.id == measurements.c.task_id)
             .join(resources, resources.c.id == measurements.c.resource_id)
             .order_by(measurements.c.value))
    with engine.connect() as conn:
        rows = conn.execute(query).all()

    assert len(rows) == len(times_ms)
    for (ts, value, task, resource), ms, m in zip(rows, times_ms, batch):
        expected = datetime.fromtimestamp(ms // 1000, timezone.utc) + timedelta(milliseconds=ms % 1000)
        assert as_utc(ts) == expected
        assert (value, task, resource) == (m.value, "resize", "memory")


# --- name lookups -------------------------------------------------------------------------


def test_name_ids_are_stable_across_consumers(url: str, engine: Engine) -> None:
    first, second = NameLookup(tasks), NameLookup(tasks)
    other_engine = connect(url)
    try:
        with engine.begin() as conn:
            blur = first.id_of(conn, "blur")
            resize = first.id_of(conn, "resize")
        with other_engine.begin() as conn:
            assert second.id_of(conn, "resize") == resize
            assert second.id_of(conn, "blur") == blur
            assert second.name_of(conn, blur) == "blur"
    finally:
        other_engine.dispose()
    assert blur != resize
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 2


def test_two_writers_adding_the_same_new_name_at_once_get_one_id(url: str, engine: Engine) -> None:
    writers = 6
    barrier = threading.Barrier(writers)
    ids: list[int] = []
    errors: list[BaseException] = []

    def add_name() -> None:
        own_engine = connect(url)
        try:
            lookup = NameLookup(resources)
            barrier.wait(timeout=10)
            with own_engine.begin() as conn:
                ids.append(lookup.id_of(conn, "gpu_memory"))
        except BaseException as exc:  # reported below, with the thread's own error
            errors.append(exc)
        finally:
            own_engine.dispose()

    threads = [threading.Thread(target=add_name) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors, errors
    assert len(ids) == writers
    assert len(set(ids)) == 1
    with engine.connect() as conn:
        stored = conn.execute(select(resources.c.id).where(resources.c.name == "gpu_memory")).all()
    assert [row.id for row in stored] == [ids[0]]


# --- orders -------------------------------------------------------------------------------


def test_each_run_of_an_order_gets_a_fresh_increasing_id(engine: Engine) -> None:
    store = OrderStore(engine)

    ids = [store.create("demo", "images/small.png", "resize,blur") for _ in range(3)]

    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(i > 0 for i in ids)
    record = store.get(ids[0])
    assert (record.name, record.image, record.task_list) == ("demo", "images/small.png",
                                                             "resize,blur")
    assert record.status is RunStatus.PENDING
    assert record.started_at is None and record.finished_at is None


def test_get_of_an_unknown_order_is_none(engine: Engine) -> None:
    assert OrderStore(engine).get(999) is None


def test_set_status_stamps_start_and_end(engine: Engine) -> None:
    store = OrderStore(engine)
    order_id = store.create("demo", "images/small.png", "blur")

    store.set_status(order_id, RunStatus.RUNNING)
    running = store.get(order_id)
    assert running.status is RunStatus.RUNNING
    assert running.started_at is not None and running.finished_at is None

    store.set_status(order_id, RunStatus.FAILED, error="blur: exit status 1")
    failed = store.get(order_id)
    assert failed.status is RunStatus.FAILED
    assert failed.error == "blur: exit status 1"
    assert failed.started_at == running.started_at
    assert as_utc(failed.created_at) <= as_utc(failed.started_at) <= as_utc(failed.finished_at)


def test_task_runs_record_each_attempt(engine: Engine) -> None:
    store = OrderStore(engine)
    order_id = store.create("demo", "images/small.png", "resize,blur")

    store.start_task(order_id, position=0, attempt=1, task="resize")
    store.finish_task(order_id, 0, 1, "SUCCEEDED", output="/out/resized.png")
    store.start_task(order_id, position=1, attempt=1, task="blur")
    store.finish_task(order_id, 1, 1, "FAILED", error="out of memory")
    store.start_task(order_id, position=1, attempt=2, task="blur")

    query = (select(task_runs.c.position, task_runs.c.attempt, tasks.c.name, task_runs.c.status,
                    task_runs.c.output, task_runs.c.error, task_runs.c.started_at,
                    task_runs.c.finished_at)
             .join(tasks, tasks.c.id == task_runs.c.task_id)
             .where(task_runs.c.order_id == order_id)
             .order_by(task_runs.c.position, task_runs.c.attempt))
    with engine.connect() as conn:
        runs = conn.execute(query).all()

    assert [tuple(r[:6]) for r in runs] == [
        (0, 1, "resize", "SUCCEEDED", "/out/resized.png", None),
        (1, 1, "blur", "FAILED", None, "out of memory"),
        (1, 2, "blur", "RUNNING", None, None),
    ]
    assert all(r.started_at is not None for r in runs)
    assert [r.finished_at is not None for r in runs] == [True, True, False]


def test_count_measurements_counts_only_that_order(engine: Engine) -> None:
    store = OrderStore(engine)
    first = store.create("a", "images/small.png", "blur")
    second = store.create("b", "images/small.png", "blur")
    MeasurementWriter(engine).write(
        [sample(s, order_id=first) for s in range(4)] + [sample(s, order_id=second) for s in range(2)]
    )

    assert store.count_measurements(first) == 4
    assert store.count_measurements(second) == 2
    assert store.count_measurements(second + 100) == 0
