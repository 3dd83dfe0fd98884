"""Schema and batch writes on a real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

from sqlalchemy import func, select, text

from pipeline.db import MeasurementWriter, NameLookup, connect, create_schema
from pipeline.db.orders import OrderStore, RunStatus
from pipeline.db.schema import measurements, tasks
from pipeline.protocol import Sample


def _batch(order_id: int, count: int, start_ms: int = 1_700_000_000_000) -> list[Sample]:
    resources = ("cpu", "memory", "disk_read", "disk_write")
    return [
        Sample((), "blur", order_id, resources[i % 4], float(i), start_ms + (i // 4) * 1000)
        for i in range(count)
    ]


def test_schema_creation_is_idempotent_and_concurrent_safe(database_url):
    errors = []

    def create():
        try:
            create_schema(connect(database_url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    create_schema(connect(database_url))
    with connect(database_url).connect() as conn:
        names = set(conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert {"tasks", "resources", "orders", "task_runs", "measurements"} <= names


def test_batch_write_is_idempotent_and_keeps_the_sample_time(database_url):
    engine = connect(database_url)
    create_schema(engine)
    order_id = OrderStore(engine).create("o", "/img.png", "blur")
    writer = MeasurementWriter(engine)
    batch = _batch(order_id, 400)
    assert writer.write(batch) == 400
    assert writer.write(batch) == 0
    assert MeasurementWriter(engine).write(batch[:10] + batch[:10]) == 0
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(measurements)).scalar_one()
        first_ts = conn.execute(select(func.min(measurements.c.ts))).scalar_one()
    assert count == 400
    assert first_ts == datetime.fromtimestamp(batch[0].timestamp_ms / 1000, tz=timezone.utc)


def test_two_writers_adding_one_new_name_at_once_share_one_id(database_url):
    engine = connect(database_url)
    create_schema(engine)
    barrier = threading.Barrier(6)
    ids = []

    def add():
        own = connect(database_url)
        barrier.wait()
        with own.begin() as conn:
            ids.append(NameLookup(tasks).id_of(conn, "brand_new_task"))

    threads = [threading.Thread(target=add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 6 and len(set(ids)) == 1


def test_order_ids_come_from_the_database_and_statuses_are_stamped(database_url):
    engine = connect(database_url)
    create_schema(engine)
    store = OrderStore(engine)
    first, second = store.create("a", "/a.png", "blur"), store.create("b", "/b.png", "blur")
    assert second > first > 0
    store.set_status(first, RunStatus.RUNNING)
    store.set_status(first, RunStatus.SUCCEEDED)
    record = store.get(first)
    assert record.status is RunStatus.SUCCEEDED
    assert record.started_at <= record.finished_at
