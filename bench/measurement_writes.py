"""Benchmark: the measurement batch write path against a plain psql COPY.

In one run, on PostgreSQL:

1. a fresh database with the schema of ``pipeline.db.create_schema``; 100,000 realistic
   measurement rows (a few orders, each running its tasks one after another, 4 resources,
   one sample per resource per second) written through ``MeasurementWriter.write`` in
   batches (``--batch-size``, default 1,000); rows/s;
2. the same 100,000 rows written again through ``MeasurementWriter.write`` (all duplicates,
   0 new rows): the cost of idempotency;
3. the same rows as a TSV file loaded with a plain
   ``COPY measurements (order_id, task_id, resource_id, value, ts) FROM STDIN`` by the ``psql``
   client into a second fresh database with the same schema; rows/s including psql's start.

Row counts are checked after each step (exactly 100,000). The three steps are repeated
``--repeat`` times (default 3), each round on two new databases, and medians are reported:
the timings move with other work on the machine. Without ``--database-url`` a
PostgreSQL cluster is started the way ``python -m pipeline infra up --postgres`` does it
(``LocalPostgres``), with its own state directory, data directory and port, and is stopped
and removed at the end. The benchmark databases are dropped at the end (``--keep`` keeps them).

    ./dev python bench/measurement_writes.py [--batch-size 1000] [--database-url URL]
                                             [--postgres-port 25433] [--repeat 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine, markdown_table, median, write_json  # noqa: E402

import psycopg2  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from pipeline.db import MeasurementWriter, NameLookup, connect, create_schema  # noqa: E402
from pipeline.db.engine import uses_timescaledb  # noqa: E402
from pipeline.db.schema import resources, tasks  # noqa: E402
from pipeline.protocol import Sample  # noqa: E402
from pipeline.protocol import RESOURCES  # noqa: E402

ORDERS = 5
TASK_LISTS = [  # each order runs its tasks one after another
    ["resize", "grayscale", "blur", "sharpen", "rotate"],
    ["grayscale", "resize", "rotate", "blur", "sharpen"],
    ["blur", "sharpen", "resize", "grayscale", "rotate"],
    ["rotate", "blur", "grayscale", "sharpen", "resize"],
    ["sharpen", "rotate", "blur", "resize", "grayscale"],
]
BASE_MS = int(datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp() * 1000)
COLUMNS = "order_id, task_id, resource_id, value, ts"


def make_rows(total: int, seed: int = 42) -> list[Sample]:
    """``total`` samples: ORDERS orders x 5 tasks x N seconds x every resource, in arrival order."""
    per_second = ORDERS * len(TASK_LISTS[0]) * len(RESOURCES)
    if total % per_second:
        raise SystemExit(f"--rows must be a multiple of {per_second}")
    seconds = total // per_second
    rng = random.Random(seed)
    rows = []
    for k in range(ORDERS):
        order_id = 1000 + k
        start = BASE_MS + k * 600_000  # orders overlap in time
        for j, task in enumerate(TASK_LISTS[k]):
            for s in range(seconds):
                ts = start + (j * seconds + s) * 1000
                usage = {
                    "cpu": round(rng.uniform(5, 195), 1),
                    "memory": round(rng.uniform(80, 1500), 1),
                    "disk_read": round(rng.expovariate(1 / 400), 1),
                    "disk_write": round(rng.expovariate(1 / 250), 1),
                    "cpu_wait": round(rng.uniform(0, 60), 1),
                    "node_cpu_pressure": round(rng.uniform(0, 100), 1),
                }
                rows.extend(Sample((), task, order_id, r, usage[r], ts) for r in RESOURCES)
    return rows


class Server:
    """The PostgreSQL to use: given by URL, or a local one started like `infra up --postgres`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.root: Path | None = None
        self.local = None
        if args.database_url:
            self.url = make_url(args.database_url)
            if self.url.get_backend_name() != "postgresql":
                raise SystemExit("--database-url must be a PostgreSQL URL")
            return
        from ops.infra.postgres import LocalPostgres
        from ops.infra.state import port_open
        from pipeline.settings import Settings

        if port_open("127.0.0.1", args.postgres_port):
            raise SystemExit(f"port {args.postgres_port} is in use: choose another with --postgres-port")
        self.root = Path(tempfile.mkdtemp(prefix="bench-writes-"))
        os.chmod(self.root, 0o711)  # the postgres user must reach the data directory below
        os.environ["PIPELINE_PG_DIR"] = str(self.root / "pg")  # this process only
        env = {**os.environ, "PIPELINE_STATE_DIR": str(self.root / "state")}
        env.pop("DATABASE_URL", None)
        self.local = LocalPostgres(Settings.from_env(env), port=args.postgres_port)
        began = time.perf_counter()
        self.local.start()
        print(f"started PostgreSQL on port {args.postgres_port} in {time.perf_counter() - began:.1f}s",
              flush=True)
        self.url = make_url(self.local.url)

    def for_db(self, name: str):
        return self.url.set(database=name)

    def admin(self):
        conn = psycopg2.connect(host=self.url.host, port=self.url.port, user=self.url.username,
                                password=self.url.password, dbname=self.url.database or "postgres")
        conn.autocommit = True
        return conn

    def close(self) -> None:
        if self.local is not None:
            self.local.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def count(engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM measurements")).scalar_one())


def write_all(writer: MeasurementWriter, rows: list[Sample], batch_size: int) -> tuple[float, int]:
    began = time.perf_counter()
    new = 0
    for i in range(0, len(rows), batch_size):
        new += writer.write(rows[i:i + batch_size])
    return time.perf_counter() - began, new


def psql_command(url, database: str, sql: str) -> tuple[list[str], dict[str, str]]:
    psql = shutil.which("psql")
    if psql is None:
        raise SystemExit("psql not found on PATH")
    env = {**os.environ, "PGPASSWORD": url.password or ""}
    return [psql, "-X", "-v", "ON_ERROR_STOP=1", "-h", url.host, "-p", str(url.port or 5432),
            "-U", url.username, "-d", database, "-c", sql], env


def run(args: argparse.Namespace) -> dict:
    rows = make_rows(args.rows)
    results: dict = {"machine": machine(), "rows": len(rows), "batch_size": args.batch_size,
                     "orders": ORDERS, "tasks_per_order": len(TASK_LISTS[0]),
                     "resources": list(RESOURCES), "rounds": []}
    server = Server(args)
    try:
        admin = server.admin()
        try:
            with admin.cursor() as cursor:
                cursor.execute("SHOW server_version")
                results["server_version"] = cursor.fetchone()[0]
            for i in range(args.repeat):
                print(f"round {i + 1} of {args.repeat}", flush=True)
                results["rounds"].append(run_round(server, admin, rows, args, i))
        finally:
            admin.close()
    finally:
        server.close()
    results["timescaledb"] = results["rounds"][0]["timescaledb"]
    results["tsv_bytes"] = results["rounds"][0]["tsv_bytes"]
    return results


def run_round(server: Server, admin, rows: list[Sample], args: argparse.Namespace, i: int) -> dict:
    """One round on two fresh databases: write, re-write, psql COPY; counts checked."""
    suffix = f"{os.getpid()}_{int(time.time())}_{i}"
    db_writer, db_copy = f"bench_writer_{suffix}", f"bench_copy_{suffix}"
    engines = []
    results: dict = {}
    try:
        with admin.cursor() as cursor:
            for db in (db_writer, db_copy):
                cursor.execute(f"CREATE DATABASE {db}")
        # --- 1. MeasurementWriter, fresh table
        engine = connect(server.for_db(db_writer).render_as_string(hide_password=False))
        engines.append(engine)
        create_schema(engine)
        results["timescaledb"] = uses_timescaledb(engine)
        with engine.connect() as conn:  # open the pool's first connection outside the timing
            conn.execute(text("SELECT 1"))
        writer = MeasurementWriter(engine)
        took, new = write_all(writer, rows, args.batch_size)
        stored = count(engine)
        if new != len(rows) or stored != len(rows):
            raise RuntimeError(f"writer stored {stored} rows ({new} reported new), expected {len(rows)}")
        results["writer"] = {"seconds": took, "new_rows": new, "stored": stored}
        print(f"  MeasurementWriter: {len(rows)} rows in {took:.2f}s", flush=True)

        # --- 2. the same rows again: all duplicates
        took, new = write_all(writer, rows, args.batch_size)
        stored = count(engine)
        if new != 0 or stored != len(rows):
            raise RuntimeError(f"re-write stored {stored} rows ({new} reported new)")
        results["rewrite"] = {"seconds": took, "new_rows": new, "stored": stored}
        print(f"  MeasurementWriter re-write (duplicates): {took:.2f}s", flush=True)

        # --- 3. plain COPY through psql into a second fresh database with the same schema
        engine2 = connect(server.for_db(db_copy).render_as_string(hide_password=False))
        engines.append(engine2)
        create_schema(engine2)
        task_ids, resource_ids = NameLookup(tasks), NameLookup(resources)
        with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as tsv, engine2.begin() as conn:
            for m in rows:
                ts = datetime.fromtimestamp(m.timestamp_ms / 1000, tz=timezone.utc)
                tsv.write(f"{m.order_id}\t{task_ids.id_of(conn, m.task_name)}\t"
                          f"{resource_ids.id_of(conn, m.resource)}\t{m.value!r}\t{ts.isoformat()}\n")
        tsv_path = Path(tsv.name)
        try:
            results["tsv_bytes"] = tsv_path.stat().st_size
            command, env = psql_command(server.url, db_copy, "SELECT 1")
            began = time.perf_counter()
            subprocess.run(command, env=env, capture_output=True, check=True)
            results["psql_select1_s"] = time.perf_counter() - began
            command, env = psql_command(server.url, db_copy,
                                        f"COPY measurements ({COLUMNS}) FROM STDIN")
            with open(tsv_path, "rb") as stdin:
                began = time.perf_counter()
                result = subprocess.run(command, env=env, stdin=stdin, capture_output=True, text=True,
                                        check=False)
                took = time.perf_counter() - began
        finally:
            tsv_path.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"psql COPY failed: {result.stderr.strip()}")
        tag = re.search(r"COPY (\d+)", result.stdout)
        stored = count(engine2)
        if stored != len(rows) or not tag or int(tag.group(1)) != len(rows):
            raise RuntimeError(f"psql COPY stored {stored} rows (psql said {result.stdout.strip()!r})")
        results["psql_copy"] = {"seconds": took, "new_rows": stored, "stored": stored,
                                "psql_said": result.stdout.strip()}
        print(f"  psql COPY: {len(rows)} rows in {took:.2f}s", flush=True)
    finally:
        for engine in engines:
            engine.dispose()
        if not args.keep:
            with admin.cursor() as cursor:
                for db in (db_writer, db_copy):
                    cursor.execute(f"DROP DATABASE IF EXISTS {db}")
        else:
            print(f"  kept databases {db_writer} and {db_copy}")
    return results


def report(results: dict) -> str:
    n = results["rows"]
    rounds = results["rounds"]

    def row(label: str, key: str, note: str) -> list[str]:
        secs = [r[key]["seconds"] for r in rounds]
        med = median(secs)
        spread = f" ({min(secs):.2f}-{max(secs):.2f})" if len(secs) > 1 else ""
        last = rounds[-1][key]
        return [label, f"{med:.2f}{spread}", f"{n / med:,.0f}", f"{last['new_rows']:,}",
                f"{last['stored']:,}", note]

    startup = median([r["psql_select1_s"] for r in rounds])
    table = markdown_table(
        [f"path (median of {len(rounds)} rounds, fresh databases each)", "seconds (min-max)",
         "rows/s (median)", "new rows", "rows in table after", "notes"],
        [
            row(f"`MeasurementWriter.write`, batches of {results['batch_size']:,} (fresh table)", "writer",
                f"{-(-n // results['batch_size'])} transactions: names encoded, COPY into a temp table, "
                "INSERT ... ON CONFLICT DO NOTHING"),
            row("`MeasurementWriter.write` again, same rows (all duplicates)", "rewrite",
                "idempotency: every row hits the unique index, nothing stored"),
            row("plain `COPY measurements FROM STDIN` via `psql` (empty table)", "psql_copy",
                f"one statement, TSV of {results['tsv_bytes'] / 1024 / 1024:.1f} MiB; includes psql's "
                f"start and connect (`psql -c 'SELECT 1'` alone: {startup:.3f}s)"),
        ],
    )
    ratio = median([r["writer"]["seconds"] / r["psql_copy"]["seconds"] for r in rounds])
    seconds = n // (results["orders"] * results["tasks_per_order"] * len(results["resources"]))
    return (f"{table}\n\n{n:,} rows = {results['orders']} orders x {results['tasks_per_order']} tasks x "
            f"{seconds} s x {len(results['resources'])} resources ({', '.join(results['resources'])}); "
            f"PostgreSQL {results['server_version']}, TimescaleDB: "
            f"{'yes' if results['timescaledb'] else 'no'}. Row counts checked after every step. "
            f"The batch path takes {ratio:.1f}x the time of the plain COPY (median of the per-round ratios).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=99_000)
    parser.add_argument("--database-url", help="a PostgreSQL SQLAlchemy URL; the benchmark creates "
                        "and drops two databases there (default: start a local PostgreSQL)")
    parser.add_argument("--postgres-port", type=int, default=25433,
                        help="port of the local PostgreSQL started when no --database-url is given")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, each on two fresh databases; medians are reported")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results to FILE")
    parser.add_argument("--keep", action="store_true",
                        help="keep the benchmark databases (only useful with --database-url: a "
                        "local PostgreSQL is removed at the end anyway)")
    args = parser.parse_args()
    if args.batch_size < 1 or args.repeat < 1:
        parser.error("--batch-size and --repeat must be positive")
    results = run(args)
    results["loadavg_end"] = loadavg()
    m = results["machine"]
    print(f"\n{m.get('nproc')} CPUs, {m.get('mem_total_gib')} GiB memory, {m.get('cpu', '?')}; load average (1 min) "
          f"{m.get('loadavg_1_5_15', ['?'])[0]} at start, {results['loadavg_end']} at end\n")
    print(report(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
