"""``up``, ``status`` and ``down`` over the broker and the PostgreSQL cluster together."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from ops.infra.kafka_auth import ADMIN, ROLES, alter_password, create_acls, with_role
from ops.infra.kafka_broker import KafkaBroker
from ops.infra.postgres import LocalPostgres
from ops.infra.state import publish
from pipeline.errors import InfraError, SettingsError
from pipeline.settings import Runtime as RuntimeName
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

# What infra.env says about the broker's security: the orchestrator role's login when the local
# broker authenticates (the CLI acts as the orchestrator), nothing otherwise.
_KAFKA_LOGIN = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")


@dataclass(frozen=True)
class Ports:
    """The ports ``up`` used, remembered so that ``status`` and ``down`` need no flags."""

    kafka: int
    postgres: int


class Infra:
    """The local services of one state directory."""

    def __init__(self, settings: Settings, ports: Ports | None = None) -> None:
        self.settings = settings
        self._ports_file = settings.state_dir / "infra.json"
        remembered = self._remembered()
        self.ports = ports or Ports(remembered.get("kafka", settings.local_kafka_port),
                                    remembered.get("postgres", settings.local_postgres_port))
        # Whether this state folder's `up` started the PostgreSQL cluster (rather than finding
        # it running): `down` stops only what its own `up` started.
        self._started_postgres = bool(remembered.get("started_postgres")) and \
            remembered.get("postgres") == self.ports.postgres
        self.kafka = KafkaBroker(settings, port=self.ports.kafka)
        self.postgres = LocalPostgres(settings, port=self.ports.postgres)

    def up(self, with_postgres: bool, monitors: bool = False, consumers: int | None = None,
           kafka_auth: bool = False) -> list[str]:
        """Start what is not running yet (with ``monitors``, the shared monitoring services
        too, ``consumers`` replicas of the consumer; with ``kafka_auth``, a broker that
        authenticates its clients, see :mod:`ops.infra.kafka_auth`); returns one report
        line per service."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._remember()
        lines = []
        cached = self.kafka.jars_cached()
        began = time.monotonic()
        started = self.kafka.start(auth=kafka_auth)
        took = time.monotonic() - began
        if started:
            how = "jars cached" if cached else "jars downloaded"
            lines.append(f"kafka: started on {self.kafka.bootstrap} in {took:.1f}s ({how})")
        else:
            lines.append(f"kafka: already running on {self.kafka.bootstrap} (pid {self.kafka.status().pid})")
        publish(self.settings, KAFKA_BOOTSTRAP_SERVERS=self.kafka.bootstrap, **self._kafka_login())
        if self.kafka.authenticated:
            count = create_acls(self.kafka.client_config(), self.settings.topic_prefix)
            lines.append(f"kafka: SASL/SCRAM-SHA-512, {count} ACLs for roles "
                         f"{', '.join(ROLES[1:])}; passwords in {self.kafka.users.path}")
        if with_postgres:
            began = time.monotonic()
            if self.postgres.start():
                self._started_postgres = True
                self._remember()
                lines.append(f"postgres: started on 127.0.0.1:{self.postgres.port} in "
                             f"{time.monotonic() - began:.1f}s")
            else:
                lines.append(f"postgres: already running on 127.0.0.1:{self.postgres.port}")
            publish(self.settings, DATABASE_URL=self.postgres.url)
        if monitors:
            lines += self.monitors(self._published_settings()).start(consumers)
        return lines

    def _kafka_login(self) -> dict[str, str | None]:
        """infra.env's login entries: the orchestrator's when the broker authenticates, else
        none (a stale one removed)."""
        if not self.kafka.authenticated:
            return dict.fromkeys(_KAFKA_LOGIN)
        return self.kafka.users.environment("orchestrator")

    def rotate_password(self, role: str) -> list[str]:
        """Give ``role`` a new random password: on the running broker first, then in the users
        file (and infra.env, for the orchestrator); the shared monitors are restarted with it
        when it is theirs. Connections open now stay; new ones need the new password."""
        import secrets

        if not self.kafka.authenticated:
            raise InfraError(f"the broker of {self.settings.state_dir} has no users (`infra up --kafka-auth` "
                             "makes a broker with them)")
        if not self.kafka.status().running:
            raise InfraError("the broker is not running: `infra up` first")
        password = secrets.token_urlsafe(24)
        alter_password(self.kafka.client_config(), role, password)
        self.kafka.users.replace(role, password)
        lines = [f"kafka: new password for {role} in {self.kafka.users.path}"]
        if role == "orchestrator":
            publish(self.settings, **self._kafka_login())
        elif role == ADMIN:
            self.kafka.write_config()  # the broker's own login, from its next start
        elif role in ("sampler", "consumer"):
            lines += self._restart_monitors()
        return lines

    def _restart_monitors(self) -> list[str]:
        """Restart the shared monitors, if they run, so that they log in anew."""
        running = [s.name for s in self.monitors().status() if s.running]
        if not running:
            return []
        lines = [f"monitor-{line}" for line in self.monitors().stop()]
        replicas = max(1, sum(1 for name in running if name.startswith("consumer-")))
        return lines + self.monitors(self._published_settings()).start(replicas)

    def _published_settings(self) -> Settings:
        """The settings a command now reads in this state folder (infra.env just written)."""
        import os

        return Settings.from_env({**os.environ, "PIPELINE_STATE_DIR": str(self.settings.state_dir)})

    def monitors(self, settings: Settings | None = None):
        from ops.infra.shared_monitors import SharedMonitors

        return SharedMonitors(settings or self.settings)

    def status(self) -> list[str]:
        """One line per service: what runs where."""
        broker = self.kafka.status()
        login = f", SASL/SCRAM-SHA-512 (users in {self.kafka.users.path})" if self.kafka.authenticated else ""
        lines = [
            f"kafka: running, pid {broker.pid}, {broker.bootstrap}, data {broker.data_dir}{login}"
            if broker.running else "kafka: not running"
        ]
        pg = self.postgres.status()
        lines.append(
            f"postgres: running, pid {pg.pid}, 127.0.0.1:{pg.port}, data {pg.data_dir}"
            if pg.running else "postgres: not running"
        )
        for service in self.monitors().status():
            lines.append(f"monitor-{service.name}: running, pid {service.pid}, log {service.log}"
                         if service.running else f"monitor-{service.name}: not running")
        lines.append(f"settings file: {self.settings.state_dir / 'infra.env'}")
        return lines

    def down(self) -> list[str]:
        """Stop what ``up`` started, and nothing else."""
        lines = [f"monitor-{line}" for line in self.monitors().stop()]
        lines.append("kafka: stopped" if self.kafka.stop() else "kafka: was not running")
        if not self._started_postgres:
            running = self.postgres.status().running
            lines.append("postgres: left running (not started by this state folder's `up`)"
                         if running else "postgres: was not running")
        else:
            lines.append("postgres: stopped" if self.postgres.stop() else "postgres: was not running")
            self._started_postgres = False
            if self._ports_file.exists():
                self._remember()
        publish(self.settings, KAFKA_BOOTSTRAP_SERVERS=None, DATABASE_URL=None, **dict.fromkeys(_KAFKA_LOGIN))
        return lines

    def _remember(self) -> None:
        self._ports_file.write_text(json.dumps({"kafka": self.ports.kafka, "postgres": self.ports.postgres,
                                                "started_postgres": self._started_postgres}))

    def _remembered(self) -> dict:
        try:
            remembered = json.loads(self._ports_file.read_text())
            return remembered if isinstance(remembered, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}


def ensure_kafka(settings: Settings) -> Settings:
    """Settings with a broker: the configured one, else the local one, started if needed."""
    if settings.kafka_bootstrap_servers:
        # The local broker with authentication: the CLI logs in as the orchestrator.
        return with_role(settings, "orchestrator")
    if settings.runtime is RuntimeName.KUBERNETES:
        # A broker on this machine is out of reach of the pods.
        raise SettingsError("RUNTIME=kubernetes needs KAFKA_BOOTSTRAP_SERVERS: the cluster's "
                            "broker (k8s/settings.yaml sets kafka:9092)")
    infra = Infra(settings)
    if not infra.kafka.status().running:
        logger.info("no KAFKA_BOOTSTRAP_SERVERS configured: starting the local broker "
                    "(stop it with `python -m pipeline infra down`)")
        infra.up(with_postgres=False)
    return with_role(settings.with_kafka(infra.kafka.bootstrap), "orchestrator")


def use_shared_monitors(settings: Settings) -> bool:
    """Whether this run's orders go to the shared monitoring services (``MONITORS``):
    ``shared`` starts them here if needed; ``auto`` uses them when they serve these settings,
    and starts them when the broker is this state folder's own (the local default)."""
    from ops.infra.shared_monitors import SharedMonitors
    from pipeline.settings import Monitors

    if settings.monitors is Monitors.PER_ORDER:
        return False
    if settings.runtime is RuntimeName.KUBERNETES:
        # The cluster's monitor-consumer Deployment (k8s/monitor-consumer.yaml).
        return settings.monitors is Monitors.SHARED
    shared = SharedMonitors(settings)
    if shared.serving(settings):
        return True
    broker = Infra(settings).kafka
    if settings.monitors is Monitors.SHARED or (
            broker.status().running and broker.bootstrap == settings.kafka_bootstrap_servers):
        for line in shared.start():
            logger.info("%s", line)
        return True
    return False
