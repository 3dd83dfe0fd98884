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
from pipeline.infra.state import pid_alive, port_open, process_cmdline
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
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data_dir}
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
    ``<state_dir>/kafka``.
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

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

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
        template = resources.files("pipeline.infra").joinpath("kafka-pom.xml").read_text()
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

    def start(self) -> bool:
        """Start the broker unless ours already runs; returns True when it was started now."""
        if self.status().running:
            return False
        if port_open(HOST, self.port) or port_open(HOST, self.controller_port):
            raise InfraError(
                f"port {self.port} or {self.controller_port} on {HOST} is taken by another process; "
                "choose another with --kafka-port or set KAFKA_BOOTSTRAP_SERVERS to that broker"
            )
        self.ensure_jars()
        java = _require("java", "a Java 17+ runtime")
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.home / "server.properties"
        config.write_text(_SERVER_PROPERTIES.format(
            host=HOST, port=self.port, controller_port=self.controller_port, data_dir=self.data_dir))
        log4j = self.home / "log4j2.properties"
        log4j.write_text(_LOG4J2_PROPERTIES)
        classpath = f"{self.libs_dir}/*"
        if not (self.data_dir / "meta.properties").exists():
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

    def _format(self, java: str, classpath: str, config: Path) -> None:
        cluster_id = subprocess.run(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        result = subprocess.run(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
             "-t", cluster_id, "-c", str(config)],
            capture_output=True, text=True, check=False,
        )
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
                admin = admin or AdminClient({"bootstrap.servers": self.bootstrap, "logger": logger})
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
        if pid_alive(pid) and str(self.home / "server.properties") in process_cmdline(pid):
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
