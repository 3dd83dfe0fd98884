"""Real servers for tests and benchmarks: free loopback ports, a fresh PostgreSQL database,
settings pointing at a broker and a database."""

from __future__ import annotations

import contextlib
import random
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
from sqlalchemy.engine import make_url

from pipeline.settings import Settings


_PICK = random.Random()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to a socket that connects without binding."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A loopback port that is free now, below the kernel's ephemeral range: a port the OS
    picks for a bind to 0 comes from that range, where any client that connects (a Kafka
    client, a database connection) may take it as its own end before the server binds it
    (CI saw a broker refuse to start so)."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = _PICK.randint(max(1024, high - 12000), high)
        if _bindable(port):
            return port
    raise RuntimeError("no free port below the ephemeral range")


def free_port_pair() -> int:
    """A port p with p and p+1 free (the broker's listener and its controller)."""
    for _ in range(50):
        port = free_port()
        if _bindable(port + 1):
            return port
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
