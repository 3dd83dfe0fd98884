"""Real infrastructure for integration tests.

A Kafka broker and a PostgreSQL server come from the environment when given
(``KAFKA_BOOTSTRAP_SERVERS`` and a ``postgresql`` ``DATABASE_URL``, as ``.ci/run`` sets them),
otherwise the infra module starts its own on free ports for the session and stops them after.
Every test gets fresh topics and consumer groups; database tests get a fresh database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from ops.infra.manager import Infra, Ports
from pipeline.kafka import TopicAdmin
from pipeline.settings import Settings


def _free_port_pair() -> int:
    """A port p with p and p+1 free (the broker's listener and its controller)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="session")
def infra_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL of real servers."""
    given_kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    given_db = os.environ.get("DATABASE_URL", "")
    if given_kafka and given_db.startswith("postgresql"):
        yield {"KAFKA_BOOTSTRAP_SERVERS": given_kafka, "DATABASE_URL": given_db}
        return
    state_dir = tmp_path_factory.mktemp("infra")
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(state_dir),
                                  "PIPELINE_CACHE_DIR": os.environ.get("PIPELINE_CACHE_DIR", "")
                                  or str(Path.home() / ".cache" / "image-pipeline")})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        pg_port = sock.getsockname()[1]
    infra = Infra(settings, Ports(kafka=_free_port_pair(), postgres=pg_port))
    infra.up(with_postgres=True)
    try:
        yield {
            "KAFKA_BOOTSTRAP_SERVERS": given_kafka or infra.kafka.bootstrap,
            "DATABASE_URL": given_db if given_db.startswith("postgresql") else infra.postgres.url,
        }
    finally:
        infra.down()
        # A cluster on a random port is of no use to any later session.
        shutil.rmtree(infra.postgres.home, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url``, dropped afterwards."""
    server = make_url(server_url)
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = dict(host=server.host, port=server.port, user=server.username,
                 password=server.password, dbname="postgres")

    def execute(statement: str) -> None:
        # A connection per statement: the server may have been restarted in between.
        conn = psycopg2.connect(**admin)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()

    execute(f"CREATE DATABASE {name}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def settings_for(infra_env: dict[str, str], database_url: str, folder: Path) -> Settings:
    """Settings with the real broker, ``database_url`` and private folders under ``folder``."""
    return Settings.from_env({
        "KAFKA_BOOTSTRAP_SERVERS": infra_env["KAFKA_BOOTSTRAP_SERVERS"],
        "DATABASE_URL": database_url,
        "PIPELINE_STATE_DIR": str(folder / "state"),
        "ARTIFACT_DIR": str(folder / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    })


@pytest.fixture
def database_url(infra_env: dict[str, str]) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    with fresh_database(infra_env["DATABASE_URL"]) as url:
        yield url


@pytest.fixture
def settings(infra_env: dict[str, str], database_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: the real broker, a fresh database, private folders."""
    return settings_for(infra_env, database_url, tmp_path)


@pytest.fixture
def topic(settings: Settings) -> Iterator[str]:
    """A fresh topic, deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    admin = TopicAdmin(settings)
    admin.create([name])
    yield name
    admin.delete([name])
