"""Real infrastructure for integration tests.

A Kafka broker and a PostgreSQL server come from the environment when given
(``KAFKA_BOOTSTRAP_SERVERS`` and a ``postgresql`` ``DATABASE_URL``, as ``.ci/run`` sets them),
otherwise the infra module starts its own on free ports for the session and stops them after.
Every test gets fresh topics and consumer groups; database tests get a fresh database.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.servers import fresh_database, free_port, free_port_pair, settings_for
from ops.infra.manager import Infra, Ports
from pipeline.kafka import TopicAdmin
from pipeline.settings import Settings


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
    infra = Infra(settings, Ports(kafka=free_port_pair(), postgres=free_port()))
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
