"""librdkafka configuration built from the settings."""

from __future__ import annotations

from typing import Any

from pipeline.errors import SettingsError
from pipeline.kafka.health import client_hooks
from pipeline.settings import Settings


def client_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Base configuration every client shares: bootstrap servers and security options."""
    if not settings.kafka_bootstrap_servers:
        raise SettingsError(
            "KAFKA_BOOTSTRAP_SERVERS is not set and no local broker is running: "
            "start one with `python -m pipeline infra up` or point it at a cluster"
        )
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        # librdkafka logs to stderr unless given a Python logger; its connection failures (a
        # line per retry per client) become one warning per outage (pipeline/kafka/health.py).
        **client_hooks(settings.kafka_bootstrap_servers),
    }
    config.update(settings.kafka_options)
    config.update(extra)
    return config
