"""Clear one-line errors at the command line: bad settings, missing Java or Maven, an unreachable
database, an interrupt; never a traceback for an expected failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from sqlalchemy.exc import InterfaceError, OperationalError

from devkit.servers import free_port
from pipeline.entry import exit_status, run_main
from pipeline.errors import InfraError, SettingsError
from ops.infra.kafka_broker import KafkaBroker
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


@pytest.mark.parametrize("args", [
    ["-m", "orchestrator", "status"],
    ["-m", "orchestrator", "status", "7", "--json"],
    ["-m", "monitor", "plot", "7"],
    ["-m", "monitor", "rescore", "7"],
    ["-m", "training", "fit", "--no-progress"],
], ids=lambda args: " ".join(args[1:3]))
def test_an_unreachable_database_is_one_line_from_every_command(tmp_path, args):
    url = f"postgresql+psycopg2://pipeline:secret@127.0.0.1:{free_port()}/pipeline"
    result = _run([*args, *(["--out", str(tmp_path / "plots")] if "plot" in args else [])],
                  PIPELINE_STATE_DIR=str(tmp_path), DATABASE_URL=url, DB_RETRY_SECONDS="0",
                  MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert "127.0.0.1" in lines[0] and "secret" not in result.stderr


@pytest.fixture
def signal_handlers():
    """An interrupt resets SIGINT/SIGTERM to their defaults: give pytest its own back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _raises(exc: BaseException):
    def main() -> int:
        raise exc
    return main


def test_the_entry_point_turns_expected_failures_into_one_line(capsys, signal_handlers):
    unreachable = OperationalError("SELECT 1", {}, Exception(
        'connection to server at "db.example" (10.0.0.7), port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?"))
    cases = [
        (SettingsError("DATABASE_URL='x': expected a SQLAlchemy URL"), 2,
         "error: DATABASE_URL='x': expected a SQLAlchemy URL"),
        (InfraError("port 9092 is taken"), 1, "error: port 9092 is taken"),
        (unreachable, 1, 'error: database unreachable: connection to server at "db.example" (10.0.0.7), '
                         "port 5432 failed: Connection refused"),
        (InterfaceError("SELECT 1", {}, Exception("connection already closed")), 1,
         "error: database unreachable: connection already closed"),
        (OperationalError("x", {}, Exception("could not connect to postgresql://u:secret@h/db")), 1,
         "error: database unreachable: could not connect to postgresql://u:***@h/db"),
        (KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: Local: Broker transport failure")),
         1, "error: Kafka: Failed to get metadata: Local: Broker transport failure"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ]
    for exc, status, line in cases:
        assert exit_status(_raises(exc)) == status
        captured = capsys.readouterr()
        assert captured.err == line + "\n" and captured.out == ""
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a third signal ends it at once


def test_the_entry_point_keeps_the_traceback_of_a_bug_and_the_status_of_main():
    with pytest.raises(ZeroDivisionError):
        exit_status(_raises(ZeroDivisionError("a bug")))
    assert exit_status(lambda: 3) == 3 and exit_status(lambda: None) == 0


def test_every_command_line_ends_through_the_entry_point(tmp_path, monkeypatch, capsys, signal_handlers):
    for package, cli in (("orchestrator", "orchestrator"), ("monitor", "monitor"),
                         ("training", "training"), ("ops", "ops"), ("pipeline", "ops")):
        assert f'run_main("{cli}.cli")' in (REPO / package / "__main__.py").read_text()
    (tmp_path / "interrupted_cli.py").write_text("def main(argv):\n    raise KeyboardInterrupt\n")
    (tmp_path / "fine_cli.py").write_text("def main(argv):\n    return len(argv)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as interrupted:  # raised while importing or running: one line
        run_main("interrupted_cli", [])
    assert interrupted.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(SystemExit) as fine:
        run_main("fine_cli", ["a", "b"])
    assert fine.value.code == 2


def test_the_first_stop_signal_asks_for_a_warm_stop_the_second_forces_it(signal_handlers):
    import os
    import threading

    from pipeline.lifetime import StopSignals

    heard: list[str] = []
    cancel = threading.Event()
    signals = StopSignals(cancel, heard.append).install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.requested is cancel and cancel.is_set() and heard == ["SIGTERM"]
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert heard == ["SIGTERM"]  # the forced stop is the entry point's to tell


def test_deploy_without_manifests_says_where_to_find_them(tmp_path):
    result = _run(["-m", "pipeline", "deploy", "--manifests", str(tmp_path / "k8s")],
                  PIPELINE_STATE_DIR=str(tmp_path / "state"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{tmp_path / 'k8s' / 'kustomization.yaml'} does not exist; pass --manifests DIR" in result.stderr
