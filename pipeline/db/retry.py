"""Riding out a lost database connection: retry with backoff for a while, then one clear error.

A PostgreSQL restart, a failover or a network blip ends every open connection; the pool's
pre-ping replaces dead connections on checkout, but a statement already under way (or a
server that is not back yet) still fails. Such a failure is retried with exponential backoff
for ``patience`` seconds (the ``DB_RETRY_SECONDS`` setting); anything else (a constraint, a
missing table, a bad query) is raised at once, since waiting cannot fix it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg2
from sqlalchemy.exc import DBAPIError

from pipeline.errors import DatabaseError

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY = 0.5
MAX_DELAY = 10.0
# SQLSTATE classes and codes of a connection that is gone or a server not ready yet:
# 08 connection exception; 57P01-57P03 admin/crash shutdown, cannot connect now.
_LOST_STATES = ("08", "57P01", "57P02", "57P03")
# A refused connection carries no SQLSTATE; these refusals are not transient.
_PERMANENT_REFUSALS = ("authentication", "does not exist", "pg_hba.conf", "permission denied",
                       "invalid", "unsupported")


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) means the database is unreachable for now."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            code = exc.pgcode or ""
            if code:
                return code.startswith(_LOST_STATES)
            text = str(exc).lower()
            return not any(word in text for word in _PERMANENT_REFUSALS)
        if isinstance(exc, sqlite3.OperationalError):
            return "locked" in str(exc) or "busy" in str(exc)
        exc = getattr(exc, "orig", None) or exc.__cause__
    return False


def first_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement dump and background link."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def retrying(operation: Callable[[], T], what: str, patience: float,
             stop: threading.Event | None = None) -> T:
    """``operation()``, retried while the database is unreachable, for at most ``patience``
    seconds; then :class:`DatabaseError` saying what could not be done. ``stop`` (set by a
    signal handler) ends the waiting early with the same error."""
    deadline = time.monotonic() + patience
    delay = FIRST_DELAY
    announced = False
    while True:
        try:
            result = operation()
        except Exception as exc:  # noqa: BLE001 - classified right below
            if not connection_lost(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                raise DatabaseError(f"{what}: the database has been unreachable for "
                                    f"{patience:g}s ({first_line(exc)})") from exc
            if not announced:
                logger.warning("%s: database unreachable (%s); retrying for up to %gs",
                               what, first_line(exc), patience)
                announced = True
            wait = min(delay, left)
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            delay = min(delay * 2, MAX_DELAY)
            continue
        if announced:
            logger.warning("%s: database reachable again", what)
        return result
