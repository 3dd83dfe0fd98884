"""One frozen settings object, built from the environment at each entry point.

Precedence for the connection settings: the process environment, then the file written by
``python -m pipeline infra up`` (so a developer's local services are found without exports),
then the embedded defaults (SQLite, a local MLflow store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import enum
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from pipeline import __version__
from pipeline.errors import SettingsError

# librdkafka properties that may be passed through, written as KAFKA_<PROPERTY> with dots
# turned into underscores (KAFKA_SASL_PASSWORD -> sasl.password).
_KAFKA_PASSTHROUGH_PREFIXES = ("SECURITY_", "SASL_", "SSL_", "CLIENT_ID")
_SECRET_WORDS = ("password", "secret", "key", "token")
_URL_PASSWORD = re.compile(r"(?P<head>://[^:/@]+:)(?P<password>[^@]+)(?P<tail>@)")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IMAGE_REGISTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
# Kafka's legal topic characters; the longest logical name (resource<ID>) fits after it
# within Kafka's 249.
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9._-]{0,200}")


class Runtime(str, enum.Enum):
    """Where tasks and monitors run."""

    LOCAL = "local"
    KUBERNETES = "kubernetes"


class Monitors(str, enum.Enum):
    """How an order's usage is sampled and stored."""

    AUTO = "auto"  # shared when this machine's shared monitors run for these settings
    SHARED = "shared"  # the shared sampler and consumer service (they must be running)
    PER_ORDER = "per-order"  # a monitor-producer and monitor-consumer started for each order


class TaskStart(str, enum.Enum):
    """How the local runtime starts a task attempt's process."""

    # Forked from a server that has the tasks' imports loaded (services/runtime/fork_server.py).
    FORK_SERVER = "fork-server"
    SPAWN = "spawn"  # a new Python interpreter per attempt


def default_state_dir() -> Path:
    """Where local infrastructure, the embedded database and outputs live by default."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "image-pipeline"


def default_cache_dir() -> Path:
    """Where downloads (the Kafka jars) are cached, outside any checkout."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "image-pipeline"


def mask_url(url: str) -> str:
    """Hide the password of a URL such as ``postgresql://user:pw@host/db``."""
    return _URL_PASSWORD.sub(r"\g<head>***\g<tail>", url)


def _is_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``NAME=value`` file (comments and blank lines ignored); missing file: ``{}``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a process needs to know about its surroundings.

    ``kafka_bootstrap_servers`` is ``None`` when nothing is configured: commands that need a
    broker then start the local one (see :mod:`ops.infra`).
    """

    kafka_bootstrap_servers: str | None
    database_url: str
    mlflow_tracking_uri: str
    runtime: Runtime
    artifact_dir: Path
    state_dir: Path
    cache_dir: Path
    kafka_options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Ports of the local services `python -m pipeline infra up` starts (when none is configured).
    local_kafka_port: int = 9092
    local_postgres_port: int = 5433
    # Live deviation scoring in the monitor-consumer (see analysis/scoring.py).
    live_scoring: bool = True
    anomaly_threshold: float = 2.5  # the simple detectors', and a model fitted without calibration
    anomaly_consecutive: int = 3
    # False alarms per healthy task run the model's calibrated thresholds allow (models/alarms.py).
    false_alarm_rate: float = 0.001
    # RUNTIME=kubernetes: where Jobs go and which images they run (see docs/kubernetes.md).
    k8s_namespace: str = "image-pipeline"
    image_registry: str = ""
    image_tag: str = __version__
    monitors: Monitors = Monitors.AUTO
    # RUNTIME=local: how a task's process starts (see orchestrator/runtime/local.py).
    task_start: TaskStart = TaskStart.FORK_SERVER
    # How long a service rides out a lost database connection (retrying with backoff) before
    # it gives up: the orchestrator then fails the order, a monitor-consumer exits.
    db_retry_seconds: float = 120.0
    # Put before every topic name on the broker (pipeline/kafka/topics.py): deployments with
    # different prefixes share a broker without meeting each other's topics.
    topic_prefix: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``environ`` (default: ``os.environ``).

        Raises :class:`SettingsError` naming the variable when a value is unusable.
        """
        env = dict(os.environ if environ is None else environ)
        state_dir = Path(env.get("PIPELINE_STATE_DIR") or default_state_dir()).expanduser()
        cache_dir = Path(env.get("PIPELINE_CACHE_DIR") or default_cache_dir()).expanduser()
        infra = read_env_file(state_dir / "infra.env")

        bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS") or infra.get("KAFKA_BOOTSTRAP_SERVERS")
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            # The local broker of `infra up`: its login (`--kafka-auth`) comes with it.
            env = {**{k: v for k, v in infra.items() if k.startswith("KAFKA_")}, **env}
        if bootstrap is not None:
            _check_bootstrap(bootstrap)
        database_url = (
            env.get("DATABASE_URL")
            or infra.get("DATABASE_URL")
            or f"sqlite:///{state_dir / 'pipeline.db'}"
        )
        _check_database_url(database_url)
        runtime_name = env.get("RUNTIME", Runtime.LOCAL.value).strip().lower()
        try:
            runtime = Runtime(runtime_name)
        except ValueError:
            choices = ", ".join(r.value for r in Runtime)
            raise SettingsError(
                f"RUNTIME={runtime_name!r} is not one of: {choices}"
            ) from None
        return cls(
            kafka_bootstrap_servers=bootstrap,
            database_url=database_url,
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{state_dir / 'mlflow.db'}",
            runtime=runtime,
            artifact_dir=Path(env.get("ARTIFACT_DIR") or state_dir / "artifacts").expanduser(),
            state_dir=state_dir,
            cache_dir=cache_dir,
            kafka_options=_kafka_options(env),
            local_kafka_port=_port(env, "PIPELINE_KAFKA_PORT", 9092),
            local_postgres_port=_port(env, "PIPELINE_POSTGRES_PORT", 5433),
            live_scoring=_flag(env, "LIVE_SCORING", True),
            anomaly_threshold=_number(env, "ANOMALY_THRESHOLD", 2.5, minimum=0.1),
            anomaly_consecutive=int(_number(env, "ANOMALY_CONSECUTIVE", 3, minimum=1, integer=True)),
            false_alarm_rate=_rate(env, "FALSE_ALARM_RATE", 0.001),
            k8s_namespace=_namespace(env),
            image_registry=_image_registry(env),
            image_tag=_image_tag(env),
            monitors=_choice(env, "MONITORS", Monitors, Monitors.AUTO),
            task_start=_choice(env, "TASK_START", TaskStart, TaskStart.FORK_SERVER),
            db_retry_seconds=_number(env, "DB_RETRY_SECONDS", 120.0, minimum=0.0),
            topic_prefix=_topic_prefix(env),
        )

    def image(self, name: str) -> str:
        """The full image reference of ``image-pipeline-<name>``, always with an explicit tag."""
        registry = f"{self.image_registry}/" if self.image_registry else ""
        return f"{registry}image-pipeline-{name}:{self.image_tag}"

    def deployment_id(self) -> str:
        """A short digest of the broker, database and topic prefix: the shared monitoring
        services of one deployment share it (their consumer groups carry it), others never
        meet them."""
        parts = (self.kafka_bootstrap_servers or "", self.database_url)
        if self.topic_prefix:  # another prefix is another deployment (no prefix: as ever)
            parts += (self.topic_prefix,)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]

    def with_kafka(self, bootstrap_servers: str) -> "Settings":
        """A copy pointing at ``bootstrap_servers`` (used once a local broker is started)."""
        return dataclasses.replace(self, kafka_bootstrap_servers=bootstrap_servers)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {
            "DATABASE_URL": self.database_url,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "RUNTIME": self.runtime.value,
            "ARTIFACT_DIR": str(self.artifact_dir),
            "PIPELINE_STATE_DIR": str(self.state_dir),
            "PIPELINE_CACHE_DIR": str(self.cache_dir),
            "PIPELINE_KAFKA_PORT": str(self.local_kafka_port),
            "PIPELINE_POSTGRES_PORT": str(self.local_postgres_port),
            "LIVE_SCORING": "on" if self.live_scoring else "off",
            "ANOMALY_THRESHOLD": repr(self.anomaly_threshold),
            "ANOMALY_CONSECUTIVE": str(self.anomaly_consecutive),
            "FALSE_ALARM_RATE": repr(self.false_alarm_rate),
            "K8S_NAMESPACE": self.k8s_namespace,
            "IMAGE_REGISTRY": self.image_registry,
            "IMAGE_TAG": self.image_tag,
            "MONITORS": self.monitors.value,
            "TASK_START": self.task_start.value,
            "DB_RETRY_SECONDS": repr(self.db_retry_seconds),
            "TOPIC_PREFIX": self.topic_prefix,
        }
        if self.kafka_bootstrap_servers:
            env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka_bootstrap_servers
        for name, value in self.kafka_options.items():
            env["KAFKA_" + name.upper().replace(".", "_")] = value
        return env

    def describe(self) -> dict[str, str]:
        """Printable settings, secrets masked."""
        shown = {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers or "(local broker, started on demand)",
            "DATABASE_URL": mask_url(self.database_url),
            "MLFLOW_TRACKING_URI": mask_url(self.mlflow_tracking_uri),
            "RUNTIME": self.runtime.value,
            "ARTIFACT_DIR": str(self.artifact_dir),
            "PIPELINE_STATE_DIR": str(self.state_dir),
            "PIPELINE_CACHE_DIR": str(self.cache_dir),
            "LIVE_SCORING": "on" if self.live_scoring else "off",
            "ANOMALY_THRESHOLD": repr(self.anomaly_threshold),
            "ANOMALY_CONSECUTIVE": str(self.anomaly_consecutive),
            "FALSE_ALARM_RATE": repr(self.false_alarm_rate),
            "K8S_NAMESPACE": self.k8s_namespace,
            "IMAGE_REGISTRY": self.image_registry or "(none: images by name only)",
            "IMAGE_TAG": self.image_tag,
            "MONITORS": self.monitors.value,
            "TASK_START": self.task_start.value,
            "DB_RETRY_SECONDS": f"{self.db_retry_seconds:g}",
            "TOPIC_PREFIX": self.topic_prefix or "(none: topics by their plain names)",
        }
        for name, value in sorted(self.kafka_options.items()):
            shown[f"kafka option {name}"] = "***" if _is_secret(name) else value
        return shown

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"Settings({fields})"

    __str__ = __repr__


def _kafka_options(env: Mapping[str, str]) -> dict[str, str]:
    options = {}
    for name, value in env.items():
        if name.startswith("KAFKA_") and name != "KAFKA_BOOTSTRAP_SERVERS":
            rest = name[len("KAFKA_"):]
            if rest.startswith(_KAFKA_PASSTHROUGH_PREFIXES):
                options[rest.lower().replace("_", ".")] = value
    return options


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise SettingsError(f"{name}={text!r}: expected on or off")


def _number(env: Mapping[str, str], name: str, default: float, minimum: float,
            integer: bool = False) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{name}={text!r}: expected {kind} >= {minimum:g}")
    return value


def _rate(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, minimum=0.0)
    if not 0.0 < value < 1.0:
        raise SettingsError(f"{name}={value!r}: expected a rate between 0 and 1, e.g. 0.001 (one false alarm "
                            f"per 1,000 healthy task runs)")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if not text:
        return default
    if not text.isdigit() or not 0 < int(text) < 65535:
        raise SettingsError(f"{name}={text!r}: expected a port number between 1 and 65534")
    return int(text)


def _namespace(env: Mapping[str, str]) -> str:
    value = env.get("K8S_NAMESPACE", "").strip() or "image-pipeline"
    if not _DNS_LABEL.fullmatch(value):
        raise SettingsError(f"K8S_NAMESPACE={value!r}: expected a Kubernetes namespace name "
                            "(lowercase letters, digits and '-', at most 63)")
    return value


def _image_registry(env: Mapping[str, str]) -> str:
    value = env.get("IMAGE_REGISTRY", "").strip().rstrip("/")
    if value and not _IMAGE_REGISTRY.fullmatch(value):
        raise SettingsError(f"IMAGE_REGISTRY={value!r}: expected a registry host[:port][/path]")
    return value


def _image_tag(env: Mapping[str, str]) -> str:
    value = env.get("IMAGE_TAG", "").strip() or __version__
    if value == "latest":
        # A moving tag makes a retried task run different code than its first attempt.
        raise SettingsError("IMAGE_TAG='latest': give an explicit version tag, e.g. "
                            f"{__version__}")
    if not _IMAGE_TAG.fullmatch(value):
        raise SettingsError(f"IMAGE_TAG={value!r}: not a valid image tag")
    return value


def _topic_prefix(env: Mapping[str, str]) -> str:
    value = env.get("TOPIC_PREFIX", "").strip()
    if not _TOPIC_PREFIX.fullmatch(value):
        raise SettingsError(f"TOPIC_PREFIX={value!r}: expected at most 200 of the characters "
                            "Kafka allows in topic names (A-Z a-z 0-9 . _ -)")
    return value


def _check_bootstrap(value: str) -> None:
    for server in value.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(
                f"KAFKA_BOOTSTRAP_SERVERS={value!r}: expected host:port[,host:port...]"
            )


def _check_database_url(value: str) -> None:
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
        raise SettingsError(
            f"DATABASE_URL={mask_url(value)!r}: expected a SQLAlchemy URL starting with "
            "sqlite:// or postgresql://"
        )


def _choice(env: Mapping[str, str], name: str, kind: type[enum.Enum], default: enum.Enum) -> enum.Enum:
    text = env.get(name, "").strip().lower() or default.value
    try:
        return kind(text)
    except ValueError:
        choices = ", ".join(c.value for c in kind)
        raise SettingsError(f"{name}={text!r} is not one of: {choices}") from None
