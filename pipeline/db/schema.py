"""Tables of the README's storage section, in SQLAlchemy Core.

Core rather than the ORM: the hot path is bulk inserts of measurements, and every other
access is a handful of rows.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table,
    Text, UniqueConstraint,
)

metadata = MetaData()

# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

# One row, written once when the schema is first created: which database this is. A service
# that holds connections (the shared monitors) compares it with what the database URL leads to
# now, and so notices a database replaced under it (pipeline/db/identity.py).
database_identity = Table(
    "database_identity", metadata,
    Column("name", String(16), primary_key=True),  # always "database"
    Column("id", String(36), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

tasks = Table(
    "tasks", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
)

resources = Table(
    "resources", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
)

orders = Table(
    "orders", metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("image", Text, nullable=False),
    Column("image_width", Integer),
    Column("image_height", Integer),
    Column("task_list", Text, nullable=False),  # the required tasks, ','-joined as on the wire
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("error", Text),
    # Who samples and stores its usage: "shared" (the shared monitoring services) or
    # "per-order" (monitors of its own); the shared services take only the former.
    Column("monitors", String(16)),
    # The orchestrator process running it ("host:pid:start-ticks") and when it last said it
    # is alive: an order whose orchestrator died is found and marked FAILED (orders/owners.py).
    Column("owner", String(200)),
    Column("heartbeat_at", DateTime(timezone=True)),
    # Ended with its topics kept (its samples not yet confirmed by the shared consumer): the
    # topics are still this order's (names are taken exclusively), so the shared services go
    # on serving it (monitor/claims.py). Over without it, its topics are gone, and a topic of
    # the same name now is another database's.
    Column("topics_kept", Boolean),
)

# One row per task attempt. Samples name their run by position and attempt (headers), so a
# task that appears twice in an order (blur, blur) or is retried is never told apart by time.
task_runs = Table(
    "task_runs", metadata,
    Column("order_id", _BigId, ForeignKey("orders.id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("output", Text),
    Column("error", Text),
    # An injected fault (services/runtime/faults.py): such runs are not normal usage, and
    # training leaves them out.
    Column("fault", String(16)),
    # Pixels of the image this run read (the order's image, or the previous task's output):
    # what a task's work scales with, known when it starts.
    Column("input_pixels", BigInteger),
    # ... its channels (3 for RGB, 1 after grayscale) and its file's size: how much detail it
    # holds, which an encoded output's size and an encoder's time follow.
    Column("input_channels", Integer),
    Column("input_bytes", BigInteger),
    # The size of the output it wrote: what its storage writes are judged against.
    Column("output_bytes", BigInteger),
    # The CPU time of its image operation alone, from its PROGRESS (ns): what a regression of
    # the task's work is judged on, without the process's fixed part.
    Column("operation_ns", BigInteger),
    # The run's task parameters, every one resolved (defaults included), as canonical JSON:
    # with the pixels, what the run's work depends on (models/work.py).
    Column("params", Text),
    UniqueConstraint("order_id", "position", "attempt", name="uq_task_runs_attempt"),
)

measurements = Table(
    "measurements", metadata,
    Column("order_id", _BigId, nullable=False),
    Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
    Column("resource_id", Integer, ForeignKey("resources.id"), nullable=False),
    Column("value", Float, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    # The task run the sample belongs to (the sample's index and attempt headers); NULL only
    # for samples stored before producers sent them, which are matched to runs by time.
    Column("position", Integer),
    Column("attempt", Integer),
    # A redelivered sample hits this constraint and changes nothing. It includes the time
    # column, as a TimescaleDB hypertable requires of every unique index.
    UniqueConstraint("order_id", "task_id", "resource_id", "ts", name="uq_measurements_sample"),
)
Index("ix_measurements_ts", measurements.c.ts)

# Written by live scoring and by `python -m monitor rescore`: one row per sample and model
# version, so several versions can be judged on the same orders side by side.
deviations = Table(
    "deviations", metadata,
    Column("order_id", _BigId, nullable=False),
    Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
    Column("resource_id", Integer, ForeignKey("resources.id"), nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("position", Integer, nullable=False),
    Column("value", Float, nullable=False),
    Column("expected", Float, nullable=False),
    Column("lower", Float, nullable=False),
    Column("upper", Float, nullable=False),
    Column("score", Float, nullable=False),
    Column("anomaly", Boolean, nullable=False),
    UniqueConstraint("order_id", "task_id", "resource_id", "ts", "model_version",
                     name="uq_deviations_sample_version"),
)
Index("ix_deviations_order", deviations.c.order_id, deviations.c.model_version)
