"""Clear one-line errors at the command line: bad settings, missing Java or Maven."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import InfraError
from pipeline.infra.kafka_broker import KafkaBroker
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DATABASE_"))}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("name, value", [
    ("RUNTIME", "docker"),
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost"),
    ("DATABASE_URL", "mysql://u:secret@h/db"),
    ("PIPELINE_KAFKA_PORT", "99999"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path, name, value):
    result = _run(["-m", "pipeline", "settings"], PIPELINE_STATE_DIR=str(tmp_path), **{name: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in result.stderr
    assert "secret" not in result.stderr


def test_without_java_or_maven_the_broker_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java, no mvn
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state"),
                                  "PIPELINE_CACHE_DIR": str(tmp_path / "cache")})
    with pytest.raises(InfraError) as raised:
        KafkaBroker(settings, port=1).ensure_jars()
    message = str(raised.value)
    assert "install" in message and "KAFKA_BOOTSTRAP_SERVERS" in message
    assert not (tmp_path / "cache" / "kafka" / KafkaBroker(settings).version / "libs").exists()


def test_the_kubernetes_runtime_without_a_broker_or_cluster_credentials_is_one_line(tmp_path):
    order = REPO / "orders" / "example-simple.json"
    no_broker = _run(["-m", "orchestrator", "run", str(order)], PIPELINE_STATE_DIR=str(tmp_path),
                     RUNTIME="kubernetes")
    assert no_broker.returncode == 2 and no_broker.stderr.count("\n") == 1
    assert "RUNTIME=kubernetes needs KAFKA_BOOTSTRAP_SERVERS" in no_broker.stderr
    no_cluster = _run(["-m", "orchestrator", "run", str(order)], PIPELINE_STATE_DIR=str(tmp_path),
                      RUNTIME="kubernetes", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
                      KUBECONFIG=str(tmp_path / "missing.kubeconfig"))
    assert no_cluster.returncode == 2 and no_cluster.stderr.count("\n") == 1, no_cluster.stderr
    assert "no cluster credentials" in no_cluster.stderr
    submitted = _run(["-m", "orchestrator", "submit", str(order)], PIPELINE_STATE_DIR=str(tmp_path),
                     KUBECONFIG=str(tmp_path / "missing.kubeconfig"))
    assert submitted.returncode == 2 and "no cluster credentials" in submitted.stderr
    assert not list(tmp_path.glob("*.db")), "nothing was created"
