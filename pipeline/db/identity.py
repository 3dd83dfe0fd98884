"""Which database a URL leads to, and noticing when that is no longer the one a service holds.

A long-lived service (the shared monitor-consumer and sampler) keeps connections open. When its
database is replaced under it -- the SQLite file removed and made anew at the same path, a
PostgreSQL database dropped and created again -- those connections keep reading and writing
the old one (a deleted file stays open; a pool reconnects by name into a database whose ids
mean other things), while the orchestrators use the new one. Every database therefore carries
an identity, written once with its schema (``database_identity``, see pipeline/db/engine.py),
and :class:`HeldDatabase` compares the identity of what it holds with what its URL leads to now.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db.engine import IDENTITY_ROW, connect
from pipeline.db.schema import database_identity
from pipeline.errors import DatabaseError
from pipeline.settings import mask_url

logger = logging.getLogger(__name__)


class DatabaseReplaced(DatabaseError):
    """The database URL leads to another database than the one held: start over on it."""


def read_identity(engine: Engine) -> str | None:
    """The identity of the database ``engine`` is connected to; None when it has none (yet)."""
    try:
        with engine.connect() as conn:
            return conn.execute(select(database_identity.c.id)
                                .where(database_identity.c.name == IDENTITY_ROW)).scalar()
    except SQLAlchemyError:
        return None


class HeldDatabase:
    """The identity of the database a service holds, and a check of whether its URL now leads
    to another one.

    The check opens a fresh connection (held connections may point at a deleted file), except
    that a SQLite file that is not there is not created by it: a database removed and not yet
    made again is nothing to switch to.
    """

    def __init__(self, database_url: str, engine: Engine) -> None:
        self.url = database_url
        self._engine = engine
        self.identity = read_identity(engine)  # None: no schema there yet, read on the next check
        url = make_url(database_url)
        self._sqlite_file: Path | None = None
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            self._sqlite_file = Path(url.database).expanduser()

    def check(self) -> None:
        """Raise :class:`DatabaseReplaced` when the URL now leads to another database."""
        if self.replaced():
            raise DatabaseReplaced(f"the database at {mask_url(self.url)} was replaced (identity "
                                   f"{self.identity} is gone)")

    def replaced(self) -> bool:
        """Whether the URL now leads to a database with another identity."""
        if self.identity is None:
            self.identity = read_identity(self._engine)
            return False
        if self._sqlite_file is not None and not self._sqlite_file.exists():
            return False
        probe = connect(self.url, pooled=False)
        try:
            now = read_identity(probe)
        finally:
            probe.dispose()
        if now is not None and now != self.identity:
            logger.warning("the database at %s is another one now (identity %s, was %s)",
                           mask_url(self.url), now, self.identity)
            return True
        return False

