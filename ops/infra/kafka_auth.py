"""Authenticated local Kafka (``infra up --kafka-auth``): one SCRAM user per role, per-role ACLs.

Each kind of process gets the least the code needs (grep ``Producer``/``Consumer``/``TopicAdmin``
in orchestrator/, services/runtime/ and monitor/):

- ``orchestrator`` creates and deletes every order's ``task<ID>`` and ``resource<ID>``, reads
  ``task<ID>`` (TERMINATE) and writes STOP on both (``resource<ID>``: an abandoned order's last
  samples, orchestrator/abandoned.py), creates and reads ``orchestrator`` (PROGRESS) and
  ``anomalies``; its readers are groups ``reader-...``;
- ``task`` writes ORDER, HALT and STOP on ``task<ID>`` and PROGRESS on ``orchestrator``, nothing
  else. A prefixed ACL cannot say "its own order's topic": per-order credentials would be what
  enforces that; here the role is what is enforced;
- ``sampler`` (the monitor-producer, per order or shared) reads ``task<ID>`` (groups
  ``monitor-producer-<ID>``, ``monitor-sampler-...``) and writes samples and STOP on
  ``resource<ID>``;
- ``consumer`` (the monitor-consumer) reads ``resource<ID>`` (groups ``monitor-consumer-<ID>``,
  ``monitor-consumers-...``), writes TERMINATE on ``task<ID>``, creates and writes ``anomalies``;
- ``admin`` is the super user: the broker itself, and ``up`` creating these ACLs.

Topics are matched under ``TOPIC_PREFIX``; ``task`` and ``resource`` as prefixes (every order's
topics), ``orchestrator`` and ``anomalies`` literally. The passwords are random, kept in
``<state>/kafka/users.env`` (0600 from its first byte, never printed); the file's existence is
what turns authentication on for that broker from then on.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InfraError
from pipeline.protocol import ANOMALIES_TOPIC, ORCHESTRATOR_TOPIC
from pipeline.secret_files import write_secret
from pipeline.settings import Settings, read_env_file

logger = logging.getLogger(__name__)

PROTOCOL = "SASL_PLAINTEXT"
MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 4096  # Kafka's default, and the least it accepts for SHA-512
ADMIN = "admin"
ROLES = (ADMIN, "orchestrator", "task", "sampler", "consumer")
# Topic name prefixes of every order's topics (pipeline/protocol.py: task_topic, resource_topic).
TASK_TOPICS = "task"
RESOURCE_TOPICS = "resource"


@dataclass(frozen=True)
class Grant:
    """One ALLOW rule: ``operation`` on the ``resource`` (``topic``/``group``) named ``name``,
    or every one whose name starts with it (``prefixed``)."""

    resource: str
    name: str
    operation: str
    prefixed: bool = True


def _topic(name: str, *operations: str, prefixed: bool = True) -> list[Grant]:
    return [Grant("topic", name, op, prefixed) for op in operations]


def _group(name: str) -> list[Grant]:
    # READ on a group covers joining it, committing and fetching its offsets (DESCRIBE).
    return [Grant("group", name, "READ")]


GRANTS: dict[str, list[Grant]] = {
    "orchestrator": [
        *_topic(TASK_TOPICS, "CREATE", "DELETE", "READ", "WRITE"),
        *_topic(RESOURCE_TOPICS, "CREATE", "DELETE", "WRITE"),
        *_topic(ORCHESTRATOR_TOPIC, "CREATE", "READ", prefixed=False),
        *_topic(ANOMALIES_TOPIC, "CREATE", "READ", prefixed=False),
        *_group("reader-"),  # pipeline.kafka.Consumer's default group: ProgressListener, AnomalyFeed
    ],
    "task": [
        *_topic(TASK_TOPICS, "WRITE"),
        *_topic(ORCHESTRATOR_TOPIC, "WRITE", prefixed=False),
    ],
    "sampler": [
        *_topic(TASK_TOPICS, "READ"),
        *_topic(RESOURCE_TOPICS, "WRITE"),
        *_group("monitor-producer-"),  # per order (monitor/producer.py)
        *_group("monitor-sampler-"),  # shared (monitor/shared_sampler.py)
    ],
    "consumer": [
        *_topic(RESOURCE_TOPICS, "READ"),
        *_topic(TASK_TOPICS, "WRITE"),
        # Live scoring creates it if missing (monitor/live_scoring.py), then writes anomalies.
        *_topic(ANOMALIES_TOPIC, "CREATE", "WRITE", prefixed=False),
        *_group("monitor-consumer"),  # monitor-consumer-<ID> and monitor-consumers-<deployment>
    ],
}


class KafkaUsers:
    """The SCRAM users of one local broker and their passwords (``users.env``, 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> dict[str, str]:
        """A new random password per role, written before the broker is formatted with them."""
        passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
        self._write(passwords)
        return passwords

    def passwords(self) -> dict[str, str]:
        passwords = read_env_file(self.path)
        missing = [role for role in ROLES if not passwords.get(role)]
        if missing:
            raise InfraError(f"{self.path} lacks the password of {', '.join(missing)}; "
                             "`infra down` and remove its folder to start over")
        return passwords

    def password(self, role: str) -> str:
        return self.passwords()[role]

    def replace(self, role: str, password: str) -> None:
        self._write({**self.passwords(), role: password})

    def _write(self, passwords: dict[str, str]) -> None:
        # urlsafe passwords need no quoting in a JAAS line or in StorageTool's --add-scram.
        body = "# SCRAM-SHA-512 users of the local broker, by role; written by `infra up --kafka-auth`.\n"
        body += "".join(f"{role}={passwords[role]}\n" for role in ROLES)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_secret(self.path, body)

    def scram_arguments(self) -> list[str]:
        """StorageTool ``format`` arguments that create every user (they carry the passwords:
        they go in a private argument file, never on a command line others can read)."""
        passwords = self.passwords()
        arguments = []
        for role in ROLES:
            arguments += ["--add-scram", f"{MECHANISM}=[name={role},iterations={SCRAM_ITERATIONS},"
                                         f"password={passwords[role]}]"]
        return arguments

    def client_config(self, bootstrap: str, role: str) -> dict[str, str]:
        """librdkafka settings of a client acting as ``role``."""
        return {"bootstrap.servers": bootstrap, "security.protocol": PROTOCOL, "sasl.mechanism": MECHANISM,
                "sasl.username": role, "sasl.password": self.password(role)}

    def environment(self, role: str) -> dict[str, str]:
        """The variables that make a process's clients act as ``role`` (README's settings)."""
        return {"KAFKA_SECURITY_PROTOCOL": PROTOCOL, "KAFKA_SASL_MECHANISM": MECHANISM,
                "KAFKA_SASL_USERNAME": role, "KAFKA_SASL_PASSWORD": self.password(role)}


def acl_bindings(topic_prefix: str = "") -> list[Any]:
    """Every role's grants as confluent-kafka ACL bindings, topics under ``topic_prefix``."""
    from confluent_kafka.admin import (AclBinding, AclOperation, AclPermissionType, ResourcePatternType,
                                       ResourceType)

    bindings = []
    for role, grants in GRANTS.items():
        for grant in grants:
            name = topic_prefix + grant.name if grant.resource == "topic" else grant.name
            bindings.append(AclBinding(
                ResourceType[grant.resource.upper()], name,
                ResourcePatternType.PREFIXED if grant.prefixed else ResourcePatternType.LITERAL,
                f"User:{role}", "*", AclOperation[grant.operation], AclPermissionType.ALLOW))
    return bindings


def create_acls(admin_config: dict[str, Any], topic_prefix: str = "", timeout: float = 30.0) -> int:
    """Create every role's ACLs as the admin user (creating an existing one changes nothing);
    returns how many there are."""
    from confluent_kafka.admin import AdminClient

    bindings = acl_bindings(topic_prefix)
    admin = AdminClient({**admin_config, "logger": logger})  # kept: the futures die with it
    futures = admin.create_acls(bindings, request_timeout=timeout)
    for binding, future in futures.items():
        try:
            future.result(timeout)
        except Exception as exc:  # noqa: BLE001 - KafkaException or a timeout: one line either way
            raise InfraError(f"cannot create the ACL {binding}: {exc}") from exc
    return len(bindings)


def alter_password(admin_config: dict[str, Any], role: str, password: str, timeout: float = 30.0) -> None:
    """Set ``role``'s SCRAM password on the broker, as the admin user."""
    from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, \
        UserScramCredentialUpsertion

    upsert = UserScramCredentialUpsertion(
        role, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS), password.encode())
    admin = AdminClient({**admin_config, "logger": logger})  # kept: the futures die with it
    futures = admin.alter_user_scram_credentials([upsert], request_timeout=timeout)
    try:
        futures[role].result(timeout)
    except Exception as exc:  # noqa: BLE001 - one line
        raise InfraError(f"cannot change the password of {role}: {exc}") from exc


def role_environment(settings: Settings, role: str) -> dict[str, str]:
    """The credentials ``role`` uses on this state folder's broker, as environment variables;
    empty when ``settings`` point at another broker or this one runs without authentication.

    For whoever starts a process of that role beside the local broker (the shared monitors,
    the local runtime's tasks and monitors): it overrides whatever credentials its parent has.
    """
    broker = _local_broker(settings)
    if broker is None:
        return {}
    return broker.users.environment(role)


def with_role(settings: Settings, role: str) -> Settings:
    """``settings`` with ``role``'s credentials for the local authenticated broker, unless they
    name a SASL user of their own (or another broker) already."""
    if "sasl.username" in settings.kafka_options:
        return settings
    broker = _local_broker(settings)
    if broker is None:
        return settings
    users = broker.users
    options = {**settings.kafka_options, "security.protocol": PROTOCOL, "sasl.mechanism": MECHANISM,
               "sasl.username": role, "sasl.password": users.password(role)}
    return dataclasses.replace(settings, kafka_options=options)


def _local_broker(settings: Settings):
    """This state folder's broker when ``settings`` use it and it authenticates, else None."""
    from ops.infra.manager import Infra

    broker = Infra(settings).kafka
    if not broker.users.exists() or settings.kafka_bootstrap_servers != broker.bootstrap:
        return None
    return broker
