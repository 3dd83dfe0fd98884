"""Command line of ``python -m pipeline``: local infrastructure, settings, cluster deploy."""

from __future__ import annotations

import argparse

from ops import deploy
from ops.infra.kafka_auth import ROLES
from ops.infra.manager import Infra, Ports
from pipeline.logs import configure_logging
from pipeline.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    infra = commands.add_parser("infra", help="local Kafka broker, PostgreSQL, shared monitors")
    actions = infra.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start the local broker (and PostgreSQL); idempotent")
    up.add_argument("--postgres", action="store_true", help="also start a PostgreSQL cluster")
    up.add_argument("--kafka-port", type=int, help="default: $PIPELINE_KAFKA_PORT or 9092")
    up.add_argument("--postgres-port", type=int, help="default: $PIPELINE_POSTGRES_PORT or 5433")
    up.add_argument("--no-monitors", action="store_true",
                    help="do not start the shared monitoring services (sampler and consumer)")
    up.add_argument("--monitor-consumers", type=int, default=None, metavar="N",
                    help="replicas of the shared monitor-consumer; default 1 (or as before)")
    up.add_argument("--kafka-auth", action="store_true",
                    help="a new broker takes SASL/SCRAM logins, one user per role, held to per-role ACLs "
                         "(kept from then on)")
    actions.add_parser("status", help="what runs where")
    rotate = actions.add_parser("rotate-password", help="a new random password for a Kafka role (--kafka-auth)")
    rotate.add_argument("role", choices=ROLES)
    actions.add_parser("down", help="stop what `up` started")
    commands.add_parser("settings", help="print the effective settings (secrets masked)")
    deploy.add_arguments(commands.add_parser(
        "deploy", help="deploy the services in k8s/ to a Kubernetes cluster (docs/kubernetes.md)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    # An expected failure ends in one line through pipeline/entry.py (the __main__).
    settings = Settings.from_env()
    if args.command == "settings":
        for name, value in settings.describe().items():
            print(f"{name}={value}")
        return 0
    if args.command == "deploy":
        return deploy.command(args, settings)
    if args.action == "up":
        infra = Infra(settings, Ports(kafka=args.kafka_port or settings.local_kafka_port,
                                      postgres=args.postgres_port or settings.local_postgres_port))
        lines = infra.up(with_postgres=args.postgres, monitors=not args.no_monitors,
                         consumers=args.monitor_consumers, kafka_auth=args.kafka_auth)
        lines.append(f"settings written to {settings.state_dir / 'infra.env'}")
    elif args.action == "status":
        lines = Infra(settings).status()
    elif args.action == "rotate-password":
        lines = Infra(settings).rotate_password(args.role)
    else:
        lines = Infra(settings).down()
    print("\n".join(lines))
    return 0
