"""Logging set-up, called only by entry points."""

from __future__ import annotations

import logging
import os


def configure_logging(level: str | None = None) -> None:
    """One line per record, identifiers in the message (``order_id=42 task=blur``)."""
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # librdkafka and the HTTP clients are chatty at INFO.
    for noisy in ("urllib3", "kubernetes", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
