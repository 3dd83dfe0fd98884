"""The local broker's users, ACLs and configuration with and without ``--kafka-auth`` (no broker
runs here; tests/integration/test_kafka_auth.py holds them against a real one)."""

from __future__ import annotations

import stat

from confluent_kafka.admin import ResourcePatternType, ResourceType

from ops.infra.kafka_auth import GRANTS, ROLES, acl_bindings
from ops.infra.kafka_broker import KafkaBroker
from pipeline.settings import Settings


def _broker(tmp_path) -> KafkaBroker:
    return KafkaBroker(Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path)}), port=19092)


def test_every_role_but_admin_has_grants_and_topics_follow_the_prefix():
    assert set(GRANTS) == set(ROLES) - {"admin"}
    bindings = acl_bindings("team-a.")
    topics = {(b.principal, b.name, b.resource_pattern_type, b.operation.name)
              for b in bindings if b.restype == ResourceType.TOPIC}
    assert ("User:task", "team-a.task", ResourcePatternType.PREFIXED, "WRITE") in topics
    assert ("User:task", "team-a.orchestrator", ResourcePatternType.LITERAL, "WRITE") in topics
    assert not any(name.startswith("team-a.resource") for principal, name, _, _ in topics if principal == "User:task")
    groups = {b.name for b in bindings if b.restype == ResourceType.GROUP}
    assert groups == {"reader-", "monitor-producer-", "monitor-sampler-", "monitor-consumer"}  # never prefixed


def test_users_get_distinct_random_passwords_in_a_private_file(tmp_path):
    broker = _broker(tmp_path)
    passwords = broker.users.create()
    assert sorted(passwords) == sorted(ROLES) and len(set(passwords.values())) == len(ROLES)
    assert stat.S_IMODE(broker.users.path.stat().st_mode) == 0o600
    assert broker.users.passwords() == passwords
    # StorageTool's --add-scram takes name=...,password=... inside [...]: nothing to quote.
    assert not any(ch in password for password in passwords.values() for ch in ',]["\\= ')
    assert len(broker.users.scram_arguments()) == 2 * len(ROLES)


def test_with_users_the_broker_checks_logins_and_acls_and_keeps_its_config_private(tmp_path):
    broker = _broker(tmp_path)
    broker.home.mkdir(parents=True)
    plain = broker.write_config().read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in plain
    assert "sasl" not in plain.lower() and "authorizer" not in plain

    broker.users.create()
    config = broker.write_config()
    text = config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(broker.admin_properties.stat().st_mode) == 0o600
    assert "listeners=SASL_PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in text
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in text
    assert "allow.everyone.if.no.acl.found=false" in text
    assert "super.users=User:admin\n" in text and "ANONYMOUS" not in text
    assert "CONTROLLER:SASL_PLAINTEXT" in text  # no anonymous super user on the controller port
    assert broker.users.password("admin") in text
