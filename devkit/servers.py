"""Real servers for tests and benchmarks: free loopback ports, a fresh PostgreSQL database,
settings pointing at a broker and a database."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
from sqlalchemy.engine import make_url

from pipeline.settings import Settings


def free_port() -> int:
    """A loopback port that is free now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p and p+1 free (the broker's listener and its controller)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def server_execute(server_url: str, statement: str) -> None:
    """Run one statement (CREATE or DROP DATABASE) on the PostgreSQL server of ``server_url``,
    outside any transaction, on a connection of its own (the server may have been restarted
    since the last one)."""
    server = make_url(server_url)
    conn = psycopg2.connect(host=server.host, port=server.port, user=server.username,
                            password=server.password, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url``, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    server_execute(server_url, f"CREATE DATABASE {name}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        server_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def settings_for(infra_env: dict[str, str], database_url: str, folder: Path) -> Settings:
    """Settings with the real broker, ``database_url`` and private folders under ``folder``."""
    return Settings.from_env({
        "KAFKA_BOOTSTRAP_SERVERS": infra_env["KAFKA_BOOTSTRAP_SERVERS"],
        "DATABASE_URL": database_url,
        "PIPELINE_STATE_DIR": str(folder / "state"),
        "ARTIFACT_DIR": str(folder / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    })
