"""Benchmark: the shared monitor-consumer's ingest from pre-filled topics into PostgreSQL, with
scoring on, next to a plain ``psql`` COPY of the same rows, in the same run.

1. A fresh PostgreSQL database with the pipeline's schema; ``--orders`` orders (default 40)
   recorded as running and served by the shared monitors, each with three task runs, and
   their ``resource<ID>`` topics filled with ``--samples`` samples in all (default 200,000:
   five resources a second per task run, timestamps inside the runs) and each order's STOP.
2. ``python -m monitor consumer --all`` started on them (its model, the registered champion,
   loads before it reports ready, outside the clock). The clock runs from READY to the last
   order's TERMINATE on ``task<ID>``, which the shared consumer sends once the order's samples
   are stored; rows are counted afterwards (exactly the samples sent). Its scoring follows in
   the pauses: how long until every sample has its deviation row is reported beside.
3. The same rows, encoded as the consumer stores them, loaded by the ``psql`` client with
   ``\\copy measurements (...) FROM file`` into a second fresh database with the same schema;
   rows/s including psql's start.

    ./dev python bench/consumer_ingest.py [--orders 40] [--samples 200000] [--replicas 1]
                                          [--json results.json]

Needs the broker and PostgreSQL of ``python -m pipeline infra up --postgres`` (infra.env) and,
for scoring, a registered champion (``python -m training fit``); without one it says so and
measures storing alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine, markdown_table, write_json  # noqa: E402

import confluent_kafka  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from pipeline.db import NameLookup, connect, create_schema  # noqa: E402
from pipeline.db.orders import SHARED_MONITORS, RunStatus  # noqa: E402
from pipeline.db.schema import orders, resources, task_runs, tasks  # noqa: E402
from pipeline.kafka import Consumer, TopicAdmin  # noqa: E402
from pipeline.protocol import RESOURCES, Key, MonitorStopped, Sample, order_topics, task_topic  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from models.registry_probe import champion_may_exist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("resize", "grayscale", "rotate")
VALUES = {"cpu": 92.5, "memory": 61.2, "disk_read": 0.0, "disk_write": 1650.25, "cpu_wait": 3.1}


def _on_server(server_url: str, sql: str) -> None:
    """One statement outside a transaction on the server's ``postgres`` database."""
    admin = connect(make_url(server_url).set(database="postgres").render_as_string(hide_password=False))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(sql))
    admin.dispose()


def fresh_database(server_url: str, name: str) -> str:
    _on_server(server_url, f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    _on_server(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def plan(n_orders: int, n_samples: int):
    """Orders with three runs each, and their samples: (order, position, task, ts_ms)."""
    per_order = n_samples // n_orders
    per_run_ticks = max(1, per_order // (len(TASKS) * len(RESOURCES)))
    # All in the past: a broker refuses timestamps far in the future (Kafka 4's
    # log.message.timestamp.after.max.ms is an hour).
    span = n_orders * len(TASKS) * (per_run_ticks + 1)
    start = datetime.now(timezone.utc) - timedelta(seconds=span + 60)
    runs, samples = [], []
    for o in range(n_orders):
        t0 = start + timedelta(seconds=o * 3 * (per_run_ticks + 1))
        for position, task in enumerate(TASKS):
            began = t0 + timedelta(seconds=position * (per_run_ticks + 1))
            runs.append((o, position, task, began, began + timedelta(seconds=per_run_ticks)))
            for tick in range(1, per_run_ticks + 1):
                ts_ms = int((began + timedelta(seconds=tick)).timestamp() * 1000)
                samples.append((o, position, task, ts_ms))
    return runs, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=40)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    base = Settings.from_env()
    if not base.kafka_bootstrap_servers or not base.database_url.startswith("postgresql"):
        raise SystemExit("needs the broker and PostgreSQL: ./dev python -m pipeline infra up --postgres")
    scoring = base.live_scoring and champion_may_exist(base.mlflow_tracking_uri)
    tag = uuid.uuid4().hex[:8]
    ingest_db, copy_db = f"bench_ingest_{tag}", f"bench_copy_{tag}"
    ingest_url = fresh_database(base.database_url, ingest_db)
    copy_url = fresh_database(base.database_url, copy_db)
    state = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    processes: list[subprocess.Popen] = []
    try:
        engine = connect(ingest_url)
        create_schema(engine)
        runs, samples = plan(args.orders, args.samples)
        first_id = 9_000_000 + int(tag, 16) % 1_000_000 * 100
        with engine.begin() as conn:
            ids = []
            for o in range(args.orders):
                # Ids far above any real order's: the topics of nobody else's order are touched.
                ids.append(conn.execute(insert(orders).values(
                    id=first_id + o, name=f"ingest-{o}", image="bench.jpg", image_width=1024, image_height=768,
                    task_list=",".join(TASKS), status=RunStatus.RUNNING.value,
                    created_at=datetime.now(timezone.utc), monitors=SHARED_MONITORS).returning(orders.c.id)).scalar_one())
            lookup = NameLookup(tasks)
            for o, position, task, began, ended in runs:
                conn.execute(insert(task_runs).values(order_id=ids[o], position=position, attempt=1,
                                                      task_id=lookup.id_of(conn, task), status="SUCCEEDED",
                                                      started_at=began, finished_at=ended))
        admin = TopicAdmin(base)
        topics = [t for i in ids for t in order_topics(i)]
        stale = set(topics) & admin.existing()
        if stale:
            admin.delete(sorted(stale))
        admin.create(topics)
        failed = []
        producer = confluent_kafka.Producer({"bootstrap.servers": base.kafka_bootstrap_servers,
                                             "linger.ms": 50, "batch.num.messages": 10000,
                                             "queue.buffering.max.messages": 1_000_000,
                                             "on_delivery": lambda err, _m: err and failed.append(err)})
        sent = 0
        for o, position, task, ts_ms in samples:
            for resource in RESOURCES:
                m = Sample(TASKS, task, ids[o], resource, VALUES[resource], ts_ms, position, 1).encode()
                while True:
                    try:
                        producer.produce(m.topic, key=m.key.encode(), value=m.value.encode(),
                                         headers=list(m.headers), timestamp=ts_ms)
                        break
                    except BufferError:
                        producer.poll(0.1)
                sent += 1
        for i in ids:
            m = MonitorStopped(i).encode()
            producer.produce(m.topic, key=m.key.encode(), value=m.value.encode())
        if producer.flush(120):
            raise SystemExit("samples not delivered within 120 s")
        if failed:
            raise SystemExit(f"{len(failed)} samples not delivered: {failed[0]}")
        print(f"{sent} samples of {args.orders} orders on their topics; scoring "
              f"{'on (champion registered)' if scoring else 'OFF: no champion registered'}", flush=True)

        # A reader of every task topic, positioned before the consumer starts: TERMINATEs.
        terminates = Consumer(base)
        terminates.assign([task_topic(i) for i in ids])
        env = {**os.environ, **base.to_env(), "DATABASE_URL": ingest_url, "PYTHONPATH": str(REPO),
               "PIPELINE_STATE_DIR": str(state)}
        began_ready = []
        for r in range(args.replicas):
            ready = state / f"ready-{r}"
            env_r = {**env, "READY_FILE": str(ready)}
            processes.append(subprocess.Popen([sys.executable, "-m", "monitor", "consumer", "--all"], cwd=REPO,
                                              env=env_r, stdout=subprocess.DEVNULL,
                                              stderr=open(state / f"consumer-{r}.log", "wb")))
            while not ready.exists():
                if processes[-1].poll() is not None:
                    raise SystemExit(f"the consumer exited; see {state}/consumer-{r}.log")
                time.sleep(0.05)
            began_ready.append(time.monotonic())
        began = min(began_ready)
        done: set[int] = set()
        deadline = time.monotonic() + 900
        while len(done) < len(ids) and time.monotonic() < deadline:
            for message in terminates.consume(1000, timeout=0.5):
                if message.key == Key.TERMINATE.value:
                    done.add(int(message.topic[len("task"):]))
        ingest_seconds = time.monotonic() - began
        terminates.close()
        scored_seconds = None
        if scoring:  # deviations follow the stored samples: until every one is scored
            with engine.connect() as conn:
                while time.monotonic() < deadline:
                    if conn.execute(text("SELECT count(*) FROM deviations")).scalar_one() >= sent:
                        scored_seconds = time.monotonic() - began
                        break
                    conn.commit()
                    time.sleep(0.2)
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM measurements")).scalar_one()
            encoded = conn.execute(text(
                "SELECT order_id, task_id, resource_id, value, ts, position, attempt FROM measurements")).all()

        copy_engine = connect(copy_url)
        create_schema(copy_engine)
        with copy_engine.begin() as conn:  # the same lookup rows, so the ids mean the same
            for row in engine.connect().execute(text("SELECT id, name FROM tasks")).all():
                conn.execute(insert(tasks).values(id=row.id, name=row.name))
            for row in engine.connect().execute(text("SELECT id, name FROM resources")).all():
                conn.execute(insert(resources).values(id=row.id, name=row.name))
        tsv = state / "rows.tsv"
        with open(tsv, "w") as handle:
            for r in encoded:
                handle.write("\t".join(str(v) for v in (r[0], r[1], r[2], repr(r[3]), r[4].isoformat(), r[5], r[6])) + "\n")
        url = make_url(copy_url)
        psql_env = {**os.environ, "PGPASSWORD": url.password or ""}
        copy_began = time.monotonic()
        subprocess.run(["psql", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username,
                        "-d", copy_db, "-v", "ON_ERROR_STOP=1", "-q", "-c",
                        f"\\copy measurements (order_id, task_id, resource_id, value, ts, position, attempt) "
                        f"FROM '{tsv}'"], env=psql_env, check=True)
        copy_seconds = time.monotonic() - copy_began
        with copy_engine.connect() as conn:
            copied = conn.execute(text("SELECT count(*) FROM measurements")).scalar_one()
        copy_engine.dispose()
        engine.dispose()
        result = {
            "orders": args.orders, "samples_sent": sent, "rows_stored": stored,
            "terminates": len(done), "replicas": args.replicas, "scoring": scoring,
            "ingest_seconds": round(ingest_seconds, 2), "ingest_rows_per_s": round(stored / ingest_seconds),
            "all_scored_seconds": round(scored_seconds, 2) if scored_seconds else None,
            "copy_rows": copied, "copy_seconds": round(copy_seconds, 2),
            "copy_rows_per_s": round(copied / copy_seconds),
        }
        result["ratio"] = round(result["ingest_rows_per_s"] / result["copy_rows_per_s"], 2)
        print(markdown_table(
            ["path", "rows", "seconds", "rows/s", "note"],
            [["shared consumer (Kafka -> PostgreSQL)", stored, result["ingest_seconds"], result["ingest_rows_per_s"],
              f"{args.replicas} replica(s), scoring {'on' if scoring else 'off'}, {len(done)}/{args.orders} "
              f"TERMINATE; every sample scored after {result['all_scored_seconds']} s"],
             ["psql \\copy of the same rows", copied, result["copy_seconds"], result["copy_rows_per_s"],
              "second fresh database, same schema"]]))
        print(f"ratio {result['ratio']}x COPY; machine {machine()}; load average {loadavg()}")
        write_json(args.json, {"machine": machine(), **result})
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        try:
            TopicAdmin(base).delete([t for i in locals().get("ids", []) for t in order_topics(i)])
        except Exception:  # noqa: BLE001 - housekeeping
            pass
        drop_database(base.database_url, ingest_db)
        drop_database(base.database_url, copy_db)


if __name__ == "__main__":
    main()
