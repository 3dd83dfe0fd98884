"""`python -m pipeline infra` and the README's first command, as a user runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
from sqlalchemy import create_engine, func, select

from pipeline.db.schema import measurements, orders
from devkit.orders import REPO
from devkit.servers import free_port, free_port_pair

CONNECTION_VARIABLES = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "MLFLOW_TRACKING_URI", "ARTIFACT_DIR")


def _env(state_dir: Path, kafka_port: int, postgres_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONNECTION_VARIABLES}
    env.update(PIPELINE_STATE_DIR=str(state_dir), PIPELINE_KAFKA_PORT=str(kafka_port),
               PIPELINE_POSTGRES_PORT=str(postgres_port), PYTHONPATH=str(REPO))
    return env


def _pipeline(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def _running_under(state_dir: Path, postgres_home: Path) -> list[psutil.Process]:
    """Processes started by this test's `up`: the broker (its config is in the state folder)
    and the PostgreSQL server (its data in its own folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(state_dir) in cmdline or str(postgres_home) in cmdline:
            found.append(process)
    return found


def test_up_status_down_twice_leaves_nothing_running_and_downloads_once(tmp_path):
    kafka_port, postgres_port = free_port_pair(), free_port()
    env = _env(tmp_path / "state", kafka_port, postgres_port)
    postgres_home = Path(f"/var/lib/image-pipeline/postgres-{postgres_port}") if os.geteuid() == 0 \
        else tmp_path / "state" / f"postgres-{postgres_port}"
    cache = Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "image-pipeline") / "kafka"
    try:
        for round_ in (1, 2):
            up = _pipeline(env, "infra", "up", "--postgres")
            assert up.returncode == 0, up.stderr
            if round_ == 2:
                assert "jars cached" in up.stdout  # nothing downloaded the second time
                assert sorted(cache.rglob("*.jar")) == jars_after_first
            else:
                jars_after_first = sorted(cache.rglob("*.jar"))
            assert f"127.0.0.1:{kafka_port}" in up.stdout
            again = _pipeline(env, "infra", "up", "--postgres")
            assert again.returncode == 0 and "already running" in again.stdout
            status = _pipeline(env, "infra", "status")
            assert "kafka: running" in status.stdout and "postgres: running" in status.stdout
            written = (tmp_path / "state" / "infra.env").read_text()
            assert f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in written
            assert f"@127.0.0.1:{postgres_port}/pipeline" in written
            settings = _pipeline(env, "settings")
            assert "***" in settings.stdout and written.split("postgres:")[1].split("@")[0] not in settings.stdout
            down = _pipeline(env, "infra", "down")
            assert down.returncode == 0, down.stderr
            assert "kafka: stopped" in down.stdout and "postgres: stopped" in down.stdout
            assert _running_under(tmp_path / "state", postgres_home) == []
            assert not (tmp_path / "state" / "infra.env").exists()
            assert "not running" in _pipeline(env, "infra", "status").stdout
    finally:
        _pipeline(env, "infra", "down")
        shutil.rmtree(postgres_home, ignore_errors=True)


def test_the_readme_first_command_runs_on_the_embedded_default(tmp_path):
    """No broker or database configured: a local broker is started, samples go to SQLite."""
    state_dir = tmp_path / "state"
    env = _env(state_dir, free_port_pair(), free_port())
    try:
        run = subprocess.run([sys.executable, "-m", "orchestrator", "run", "orders/example-simple.json"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "SUCCEEDED" in run.stdout
        engine = create_engine(f"sqlite:///{state_dir / 'pipeline.db'}")
        with engine.connect() as conn:
            assert conn.execute(select(orders.c.status)).scalars().all() == ["SUCCEEDED"]
            assert conn.execute(select(func.count()).select_from(measurements)).scalar_one() >= 12
        assert len(list((state_dir / "artifacts").rglob("*.png"))) == 3
    finally:
        down = _pipeline(env, "infra", "down")
    assert "kafka: stopped" in down.stdout
    assert _running_under(state_dir, tmp_path / "none") == []


def test_down_leaves_a_cluster_it_did_not_start_running(tmp_path):
    """Two state folders on one PostgreSQL port: only the one whose `up` started it stops it."""
    kafka_a, kafka_b, postgres_port = free_port_pair(), free_port_pair(), free_port()
    owner = _env(tmp_path / "owner", kafka_a, postgres_port)
    guest = _env(tmp_path / "guest", kafka_b, postgres_port)
    postgres_home = Path(f"/var/lib/image-pipeline/postgres-{postgres_port}") if os.geteuid() == 0 \
        else None
    if postgres_home is None:  # unprivileged clusters live in their state folder: nothing shared
        owner["PIPELINE_PG_DIR"] = guest["PIPELINE_PG_DIR"] = str(tmp_path / "shared-pg")
        postgres_home = tmp_path / "shared-pg"
    try:
        assert "postgres: started" in _pipeline(owner, "infra", "up", "--postgres").stdout
        assert "postgres: already running" in _pipeline(guest, "infra", "up", "--postgres").stdout
        down = _pipeline(guest, "infra", "down")
        assert "postgres: left running" in down.stdout
        assert "postgres: running" in _pipeline(owner, "infra", "status").stdout
        assert "postgres: stopped" in _pipeline(owner, "infra", "down").stdout
    finally:
        _pipeline(guest, "infra", "down")
        _pipeline(owner, "infra", "down")
        shutil.rmtree(postgres_home, ignore_errors=True)
