"""A single-node Apache Kafka 4.x broker in KRaft mode, run from the Maven Central jars."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipeline.errors import InfraError
from ops.infra.kafka_auth import ADMIN, KafkaUsers
from ops.infra.state import pid_alive, port_open, process_cmdline
from pipeline.secret_files import private_dir, write_secret
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

KAFKA_VERSION = os.environ.get("PIPELINE_KAFKA_VERSION", "4.1.2")
LOG4J_VERSION = "2.24.3"
HOST = "127.0.0.1"
_START_TIMEOUT = 90.0
_STOP_TIMEOUT = 30.0

_SERVER_PROPERTIES = """\
# Written by `python -m pipeline infra up`: a single-node KRaft broker for development.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={host}:{controller_port}
controller.listener.names=CONTROLLER
{listeners}log.dirs={data_dir}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
delete.topic.enable=true
auto.create.topics.enable=false
"""

_PLAINTEXT_LISTENERS = """\
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
"""

# `up --kafka-auth`: clients log in with SCRAM-SHA-512 (users made at format time) and are held
# to the ACLs `up` creates (ops/infra/kafka_auth.py). The controller listener, on loopback,
# takes PLAIN with the admin's password only: KRaft cannot check SCRAM there (the credentials
# live in the metadata the controller serves), and a PLAINTEXT one would make the broker's own
# registration User:ANONYMOUS, which would then have to be a super user, and so would any local
# process that connects to that port.
_SASL_LISTENERS = """\
listeners=SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=SASL_PLAINTEXT://{host}:{port}
inter.broker.listener.name=SASL_PLAINTEXT
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
sasl.mechanism.controller.protocol=PLAIN
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="{admin_password}";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="{admin_password}" user_admin="{admin_password}";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin
"""

_ADMIN_PROPERTIES = """\
# The local broker's admin user, for Kafka's tools: --command-config this file. Private.
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="{password}";
"""

_LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


@dataclass(frozen=True)
class BrokerStatus:
    """What runs, as recorded by ``up``."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path


class KafkaBroker:
    """Downloads, formats, starts and stops the local broker.

    Jars are cached under ``<cache_dir>/kafka/<version>/libs`` (outside any checkout, so a
    second ``up`` downloads nothing); data, config, log and pid file under
    ``<state_dir>/kafka``. A broker started once with ``auth`` keeps authenticating its
    clients: its users file (``users.env``, beside the data) says so from then on.
    """

    def __init__(self, settings: Settings, port: int = 9092, controller_port: int | None = None,
                 version: str = KAFKA_VERSION) -> None:
        self.port = port
        self.controller_port = controller_port or port + 1
        self.version = version
        self.libs_dir = settings.cache_dir / "kafka" / version / "libs"
        self.home = settings.state_dir / "kafka"
        self.data_dir = self.home / "data"
        self.pid_file = self.home / "broker.pid"
        self.log_file = self.home / "broker.log"
        self.config_file = self.home / "server.properties"
        self.users = KafkaUsers(self.home / "users.env")
        # The admin's client settings for Kafka's own tools (`--command-config`), e.g. to
        # change a password by hand (docs/kubernetes.md, "Roles and credentials").
        self.admin_properties = self.home / "admin.properties"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def authenticated(self) -> bool:
        """Whether clients must log in (SCRAM users made by ``up --kafka-auth``)."""
        return self.users.exists()

    def client_config(self, role: str = ADMIN) -> dict[str, str]:
        """librdkafka settings that reach this broker, as ``role`` when it authenticates."""
        if not self.authenticated:
            return {"bootstrap.servers": self.bootstrap}
        return self.users.client_config(self.bootstrap, role)

    def status(self) -> BrokerStatus:
        """Whether the broker recorded in the pid file is alive."""
        pid = self._recorded_pid()
        return BrokerStatus(pid is not None, pid, self.bootstrap, self.data_dir)

    def jars_cached(self) -> bool:
        """Whether the jars are already downloaded."""
        return (self.libs_dir / ".complete").exists()

    def ensure_jars(self) -> None:
        """Resolve the broker's jars from Maven Central once; later calls download nothing."""
        if self.jars_cached():
            return
        mvn = _require("mvn", "Maven")
        _require("java", "a Java 17+ runtime")
        template = resources.files("ops.infra").joinpath("kafka-pom.xml").read_text()
        pom = template.replace("@KAFKA_VERSION@", self.version).replace("@LOG4J_VERSION@", LOG4J_VERSION)
        logger.info("downloading Apache Kafka %s jars from Maven Central (first run only)", self.version)
        self.libs_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.libs_dir.parent) as tmp:
            pom_path = Path(tmp) / "pom.xml"
            pom_path.write_text(pom)
            out = Path(tmp) / "libs"
            result = subprocess.run(
                [mvn, "-B", "-q", "-f", str(pom_path), "dependency:copy-dependencies",
                 "-DincludeScope=runtime", f"-DoutputDirectory={out}"],
                capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
                raise InfraError(f"Maven could not resolve Kafka {self.version}: {' | '.join(tail)}")
            (out / ".complete").write_text(self.version)
            if self.libs_dir.exists():
                shutil.rmtree(self.libs_dir)
            out.rename(self.libs_dir)

    def start(self, auth: bool = False) -> bool:
        """Start the broker unless ours already runs; returns True when it was started now.

        ``auth``: a broker formatted now gets SCRAM users and ACL checks; one formatted without
        them cannot have them added (its users exist only from its first start), which is said.
        """
        formatted = (self.data_dir / "meta.properties").exists()
        if auth and formatted and not self.authenticated:
            raise InfraError(
                f"the broker in {self.home} was set up without --kafka-auth and its users can only be "
                f"made when it is first formatted: `infra down`, remove {self.home} (its topics go "
                "with it), then `infra up --kafka-auth`")
        if self.status().running:
            return False
        if port_open(HOST, self.port) or port_open(HOST, self.controller_port):
            raise InfraError(
                f"port {self.port} or {self.controller_port} on {HOST} is taken by another process; "
                "choose another with --kafka-port or set KAFKA_BOOTSTRAP_SERVERS to that broker"
            )
        self.ensure_jars()
        java = _require("java", "a Java 17+ runtime")
        if auth or self.authenticated:
            private_dir(self.home)  # the data, the passwords: the owner's only
        else:
            self.home.mkdir(parents=True, exist_ok=True)
        if auth and not self.authenticated:
            self.users.create()
        config = self.write_config()
        log4j = self.home / "log4j2.properties"
        log4j.write_text(_LOG4J2_PROPERTIES)
        classpath = f"{self.libs_dir}/*"
        if not formatted:
            self._format(java, classpath, config)
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                [java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                 f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath, "kafka.Kafka", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the caller's terminal must not reach it
            )
        self.pid_file.write_text(str(process.pid))
        self._wait_ready(process)
        return True

    def write_config(self) -> Path:
        """server.properties for this start; with authentication it holds the admin's password,
        so it is written private, like the admin's client properties beside it."""
        if not self.authenticated:
            listeners = _PLAINTEXT_LISTENERS.format(host=HOST, port=self.port, controller_port=self.controller_port)
            self.config_file.write_text(_SERVER_PROPERTIES.format(
                host=HOST, controller_port=self.controller_port, listeners=listeners, data_dir=self.data_dir))
            return self.config_file
        password = self.users.password(ADMIN)
        listeners = _SASL_LISTENERS.format(host=HOST, port=self.port, controller_port=self.controller_port,
                                           admin_password=password)
        write_secret(self.config_file, _SERVER_PROPERTIES.format(
            host=HOST, controller_port=self.controller_port, listeners=listeners, data_dir=self.data_dir))
        write_secret(self.admin_properties, _ADMIN_PROPERTIES.format(password=password))
        return self.config_file

    def _format(self, java: str, classpath: str, config: Path) -> None:
        cluster_id = subprocess.run(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        command = [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
                   "-t", cluster_id, "-c", str(config)]
        if not self.authenticated:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        else:
            # The users' passwords must not show in `ps`: the main class and its arguments go in
            # a private argument file (java @file), the config's path after it.
            arguments = write_secret(self.home / "format.args",
                                     "\n".join(["kafka.tools.StorageTool", "format", "--standalone",
                                                "-t", cluster_id, *self.users.scram_arguments()]) + "\n")
            try:
                result = subprocess.run([java, "-cp", classpath, f"@{arguments}", "-c", str(config)],
                                        capture_output=True, text=True, check=False)
            finally:
                arguments.unlink(missing_ok=True)
        if result.returncode != 0:
            raise InfraError(f"formatting the Kafka log directory failed: {result.stderr.strip()[-400:]}")

    def _wait_ready(self, process: subprocess.Popen) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + _START_TIMEOUT
        admin = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise InfraError(f"the Kafka broker exited with status {process.returncode}; see {self.log_file}")
            if port_open(HOST, self.port):
                admin = admin or AdminClient({**self.client_config(ADMIN), "logger": logger})
                try:
                    admin.list_topics(timeout=2)
                    return
                except Exception:  # noqa: BLE001 - not ready yet; the deadline bounds this
                    pass
            time.sleep(0.2)
        self.stop()
        raise InfraError(f"the Kafka broker did not accept clients within {_START_TIMEOUT:g}s; see {self.log_file}")

    def stop(self) -> bool:
        """Stop our broker (SIGTERM, then SIGKILL after a grace period); True if one ran."""
        pid = self._recorded_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            logger.warning("broker pid=%d ignored SIGTERM for %gs; killing it", pid, _STOP_TIMEOUT)
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def _recorded_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        # A stale pid file may name a recycled pid: only a JVM running our config is ours.
        if pid_alive(pid) and str(self.config_file) in process_cmdline(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None


def _require(program: str, what: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise InfraError(
            f"`{program}` not found: install {what} (Debian: apt-get install "
            f"{'maven' if program == 'mvn' else 'openjdk-17-jre-headless'}) to run the local broker, "
            "or set KAFKA_BOOTSTRAP_SERVERS to an existing Kafka cluster"
        )
    return path
