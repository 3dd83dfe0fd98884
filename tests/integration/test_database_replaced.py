"""A database replaced under the running shared monitors: the SQLite file removed and made anew
at the same path, a PostgreSQL database dropped and created again. The services notice that
the database the orchestrator uses is another one (its identity, pipeline/db/identity.py),
start over on it, and the next order is sampled and stored in full, never orphaned."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from devkit.orders import ran_orders, run_orchestrator, write_order
from devkit.servers import server_execute
from ops.infra.shared_monitors import SharedMonitors
from pipeline.protocol import RESOURCES
from pipeline.settings import Monitors


def _run_one(settings, folder: Path, name: str):
    order = write_order(folder, name, ["grayscale", "blur"])
    result = run_orchestrator(settings, str(order))
    assert result.returncode == 0, result.stderr[-3000:]
    return result



def _assert_measured(settings, name: str, stderr: str) -> None:
    """The order is the database's, succeeded, and every task run has every resource stored."""
    [order] = [o for o in ran_orders(settings) if o.name == name]
    assert order.status == "SUCCEEDED"
    assert order.runs
    for run in order.runs:
        stored = Counter(s["resource"] for s in order.samples
                         if s["position"] == run["position"] and s["attempt"] == run["attempt"])
        assert set(stored) == set(RESOURCES), (run["task"], stored)
    assert "has not confirmed" not in stderr and "no sample of its tasks" not in stderr, stderr


def _log_text(services: SharedMonitors) -> str:
    return "".join(s.log.read_text() for s in services.status())


@pytest.fixture()
def sqlite_settings(settings, tmp_path):
    """The test's broker, a SQLite file of its own, the shared monitors."""
    return dataclasses.replace(settings, database_url=f"sqlite:///{tmp_path / 'replaced' / 'pipeline.db'}",
                               monitors=Monitors.SHARED)


def test_a_sqlite_file_removed_and_made_anew_is_followed(sqlite_settings, tmp_path):
    services = SharedMonitors(sqlite_settings)
    services.start(consumers=1)
    try:
        _assert_measured(sqlite_settings, "before", _run_one(sqlite_settings, tmp_path, "before").stderr)
        database = Path(make_url(sqlite_settings.database_url).database)
        for path in database.parent.glob(database.name + "*"):  # the file, its -wal and -shm
            path.unlink()

        after = _run_one(sqlite_settings, tmp_path, "after")  # makes the file anew

        _assert_measured(sqlite_settings, "after", after.stderr)
        assert [o.name for o in ran_orders(sqlite_settings)] == ["after"]
        log = _log_text(services)
        assert log.count("starting over on the new one") == 2, log[-3000:]  # sampler and consumer
    finally:
        services.stop()


def test_a_postgresql_database_dropped_and_created_again_is_followed(settings, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.SHARED)
    services = SharedMonitors(settings)
    services.start(consumers=1)
    try:
        _assert_measured(settings, "before", _run_one(settings, tmp_path, "before").stderr)
        name = make_url(settings.database_url).database
        server_execute(settings.database_url, f"DROP DATABASE {name} WITH (FORCE)")
        server_execute(settings.database_url, f"CREATE DATABASE {name}")

        after = _run_one(settings, tmp_path, "after")

        _assert_measured(settings, "after", after.stderr)
        assert [o.name for o in ran_orders(settings)] == ["after"]
        log = _log_text(services)
        assert "starting over on the new one" in log, log[-3000:]
    finally:
        services.stop()
