"""Settings: read once from the environment, with the infra.env file and embedded defaults
behind it; Kafka security passed through to librdkafka; secrets never printed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.errors import SettingsError
from pipeline.kafka.config import client_config
from pipeline.settings import Runtime, Settings, TaskStart

SASL_PASSWORD = "sasl-pw-hunter2"
DB_PASSWORD = "db-pw-correct-horse"
SECURE_KAFKA = {
    "KAFKA_BOOTSTRAP_SERVERS": "broker-1:9093,broker-2:9093",
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISMS": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "pipeline",
    "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
    "KAFKA_SSL_CA_LOCATION": "/etc/kafka/ca.pem",
}


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    """An environment that keeps every default path inside tmp_path."""
    return {"PIPELINE_STATE_DIR": str(tmp_path), "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}


def write_infra_env(folder: Path, **values: str) -> None:
    lines = ["# written by python -m pipeline infra up", ""]
    lines += [f"{name}={value}" for name, value in values.items()]
    (folder / "infra.env").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- defaults and precedence --------------------------------------------------------------


def test_defaults_are_an_embedded_sqlite_database_local_runtime_and_no_broker(
        base: dict[str, str], tmp_path: Path) -> None:
    settings = Settings.from_env(base)

    assert settings.database_url == f"sqlite:///{tmp_path / 'pipeline.db'}"
    assert settings.runtime is Runtime.LOCAL
    assert settings.kafka_bootstrap_servers is None
    assert settings.state_dir == tmp_path
    assert settings.artifact_dir == tmp_path / "artifacts"
    assert settings.mlflow_tracking_uri.startswith("sqlite:///")
    assert Path(settings.mlflow_tracking_uri.removeprefix("sqlite:///")).parent == tmp_path
    assert settings.kafka_options == {}


def test_environment_overrides_every_default(base: dict[str, str], tmp_path: Path) -> None:
    env = {
        **base,
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "DATABASE_URL": "postgresql+psycopg2://pipeline@db:5432/pipeline",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RUNTIME": "kubernetes",
        "ARTIFACT_DIR": str(tmp_path / "outputs"),
    }
    settings = Settings.from_env(env)

    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.database_url == "postgresql+psycopg2://pipeline@db:5432/pipeline"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.runtime is Runtime.KUBERNETES
    assert settings.artifact_dir == tmp_path / "outputs"


def test_runtime_is_case_insensitive(base: dict[str, str]) -> None:
    assert Settings.from_env({**base, "RUNTIME": " Kubernetes "}).runtime is Runtime.KUBERNETES


def test_tasks_start_from_the_fork_server_unless_told_to_spawn(base: dict[str, str]) -> None:
    assert Settings.from_env(base).task_start is TaskStart.FORK_SERVER
    spawning = Settings.from_env({**base, "TASK_START": " Spawn "})
    assert spawning.task_start is TaskStart.SPAWN
    assert spawning.to_env()["TASK_START"] == "spawn"
    assert Settings.from_env(spawning.to_env()) == spawning


def test_local_services_are_found_through_infra_env(base: dict[str, str], tmp_path: Path) -> None:
    write_infra_env(tmp_path, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:39092",
                    DATABASE_URL="postgresql://pipeline@127.0.0.1:35432/pipeline")

    settings = Settings.from_env(base)

    assert settings.kafka_bootstrap_servers == "127.0.0.1:39092"
    assert settings.database_url == "postgresql://pipeline@127.0.0.1:35432/pipeline"


def test_the_local_brokers_login_comes_with_it_from_infra_env(base: dict[str, str], tmp_path: Path) -> None:
    write_infra_env(tmp_path, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:39092", KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                    KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="orchestrator",
                    KAFKA_SASL_PASSWORD="s3cret")

    local = Settings.from_env(base)
    assert local.kafka_options["sasl.username"] == "orchestrator"
    assert local.kafka_options["security.protocol"] == "SASL_PLAINTEXT"
    elsewhere = Settings.from_env({**base, "KAFKA_BOOTSTRAP_SERVERS": "cluster:9092"})
    assert "sasl.username" not in elsewhere.kafka_options  # another broker: not its login


def test_environment_wins_over_infra_env(base: dict[str, str], tmp_path: Path) -> None:
    write_infra_env(tmp_path, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:39092",
                    DATABASE_URL="postgresql://pipeline@127.0.0.1:35432/pipeline")
    env = {**base, "KAFKA_BOOTSTRAP_SERVERS": "cluster:9092",
           "DATABASE_URL": "postgresql://pipeline@cluster-db/pipeline"}

    settings = Settings.from_env(env)

    assert settings.kafka_bootstrap_servers == "cluster:9092"
    assert settings.database_url == "postgresql://pipeline@cluster-db/pipeline"


def test_a_bad_value_in_infra_env_is_reported_too(base: dict[str, str], tmp_path: Path) -> None:
    write_infra_env(tmp_path, KAFKA_BOOTSTRAP_SERVERS="localhost")

    with pytest.raises(SettingsError, match="KAFKA_BOOTSTRAP_SERVERS"):
        Settings.from_env(base)


# --- Kafka security passthrough -----------------------------------------------------------


def test_kafka_security_variables_become_librdkafka_options(base: dict[str, str]) -> None:
    settings = Settings.from_env({**base, **SECURE_KAFKA, "KAFKA_UNRELATED_THING": "x"})

    assert dict(settings.kafka_options) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "pipeline",
        "sasl.password": SASL_PASSWORD,
        "ssl.ca.location": "/etc/kafka/ca.pem",
    }


def test_kafka_security_options_reach_the_client_config(base: dict[str, str]) -> None:
    settings = Settings.from_env({**base, **SECURE_KAFKA})

    config = client_config(settings, **{"group.id": "readers"})

    assert config["bootstrap.servers"] == "broker-1:9093,broker-2:9093"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "pipeline"
    assert config["sasl.password"] == SASL_PASSWORD
    assert config["ssl.ca.location"] == "/etc/kafka/ca.pem"
    assert config["group.id"] == "readers"


def test_client_config_without_a_broker_says_how_to_start_one(base: dict[str, str]) -> None:
    settings = Settings.from_env(base)

    with pytest.raises(SettingsError, match="python -m pipeline infra up"):
        client_config(settings)


def test_with_kafka_points_a_copy_at_a_started_broker(base: dict[str, str]) -> None:
    settings = Settings.from_env(base)

    started = settings.with_kafka("127.0.0.1:39092")

    assert client_config(started)["bootstrap.servers"] == "127.0.0.1:39092"
    assert settings.kafka_bootstrap_servers is None


# --- secrets, immutability, child processes -----------------------------------------------


def test_secrets_never_appear_when_settings_are_printed(base: dict[str, str]) -> None:
    env = {**base, **SECURE_KAFKA,
           "DATABASE_URL": f"postgresql://pipeline:{DB_PASSWORD}@db:5432/pipeline"}
    settings = Settings.from_env(env)

    for shown in (repr(settings), str(settings), str(settings.describe()), f"{settings}"):
        assert SASL_PASSWORD not in shown
        assert DB_PASSWORD not in shown
    described = settings.describe()
    assert described["DATABASE_URL"] == "postgresql://pipeline:***@db:5432/pipeline"
    assert described["kafka option sasl.password"] == "***"
    # What is not secret stays readable.
    assert described["kafka option sasl.username"] == "pipeline"
    assert described["KAFKA_BOOTSTRAP_SERVERS"] == "broker-1:9093,broker-2:9093"


def test_settings_are_frozen(base: dict[str, str]) -> None:
    settings = Settings.from_env(base)

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.runtime = Runtime.KUBERNETES  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.database_url = "sqlite:///elsewhere.db"  # type: ignore[misc]


@pytest.mark.parametrize("extra", [{}, SECURE_KAFKA, {"RUNTIME": "kubernetes",
                                                      "DATABASE_URL": "postgresql://u:p@db/x"}],
                         ids=["defaults", "secure kafka", "kubernetes"])
def test_to_env_reproduces_the_settings_in_a_child(base: dict[str, str], extra: dict) -> None:
    settings = Settings.from_env({**base, **extra})

    assert Settings.from_env(settings.to_env()) == settings


# --- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RUNTIME", "docker"),
        ("TASK_START", "vfork"),
        ("KAFKA_BOOTSTRAP_SERVERS", "nohostport"),
        ("KAFKA_BOOTSTRAP_SERVERS", "host:notaport"),
        ("KAFKA_BOOTSTRAP_SERVERS", "host:99999"),
        ("KAFKA_BOOTSTRAP_SERVERS", "good:9092,:9092"),
        ("DATABASE_URL", "mysql://x"),
        ("DATABASE_URL", "pipeline.db"),
    ],
)
def test_a_bad_value_names_the_variable(base: dict[str, str], name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**base, name: value})

    message = str(caught.value)
    assert name in message
    assert "\n" not in message


def test_a_refused_database_url_does_not_print_its_password(base: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**base, "DATABASE_URL": f"mysql://pipeline:{DB_PASSWORD}@db/x"})

    assert "DATABASE_URL" in str(caught.value)
    assert DB_PASSWORD not in str(caught.value)
