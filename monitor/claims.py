"""Which orders a shared monitoring service serves.

Every order on the broker has ``task<ID>`` and ``resource<ID>`` topics, whoever monitors it:
an order run with monitors of its own, or one stored in another database (an ID means
nothing outside its database), must be left alone, or its samples would be stored twice or
in the wrong place and its monitors told to TERMINATE early. So a shared service takes an
order only when its own database holds it as asking for the shared services
(``orders.monitors``, recorded once the orchestrator has created the order's topics, which
it does exclusively) and either running or ended with its topics kept
(``orders.topics_kept``: cancelled before its samples were confirmed). An order over without
it has had its topics deleted, and a topic of its name now is another database's. A found
order's answer is final for the service's lifetime.

An order ID means something only in its database, and a database can be replaced under a
running service (the SQLite file removed and made anew, a PostgreSQL database dropped and
created again): before an order is looked up, the database the service holds is compared with
the one its URL leads to now, and :class:`~pipeline.db.identity.DatabaseReplaced` is raised
when they differ, for the service to start over on the new one (pipeline/db/identity.py).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Engine

from pipeline.db.identity import HeldDatabase
from pipeline.db.orders import SHARED_MONITORS, OrderStore, RunStatus

logger = logging.getLogger(__name__)


class OrderClaims:
    """``ours(order_id)``: a found order's answer is remembered; an order not (yet) in the
    database is asked about again, at most once a second (a topic left over from an earlier
    database can carry the ID of an order created later)."""

    RETRY_UNKNOWN = 1.0

    def __init__(self, engine: Engine, database_url: str) -> None:
        self._store = OrderStore(engine)
        self._held = HeldDatabase(database_url, engine)
        self._known: dict[int, bool] = {}
        self._unknown_since: dict[int, float] = {}

    def ours(self, order_id: int) -> bool | None:
        """True: serve it; False: not ours (or not in the database); None: the database
        cannot tell now. Raises DatabaseReplaced when the database was replaced."""
        known = self._known.get(order_id)
        if known is not None:
            return known
        asked = self._unknown_since.get(order_id)
        if asked is not None and time.monotonic() - asked < self.RETRY_UNKNOWN:
            return False
        self.check_database()
        try:
            found = self._store.get(order_id)
        except Exception as exc:  # noqa: BLE001 - a database outage: ask again later
            logger.warning("order_id=%d cannot tell whether it is ours (%s); asking again", order_id, exc)
            return None
        if found is None:
            self._unknown_since[order_id] = time.monotonic()
            return False
        self._unknown_since.pop(order_id, None)
        # A live order's topics are its own (the orchestrator creates them exclusively), and
        # so are those of an order that ended with its topics kept (cancelled before its
        # samples were confirmed): what is on them is still to be stored. An order over
        # without has had its topics deleted: a topic of that name now is another database's.
        answer = found.monitors == SHARED_MONITORS and (
            found.status in (RunStatus.PENDING, RunStatus.RUNNING) or bool(found.topics_kept))
        if not answer:
            logger.info("order_id=%d is not served by the shared monitors (its own monitors, or "
                        "over); its messages are left alone", order_id)
        self._known[order_id] = answer
        return answer

    def check_database(self) -> None:
        """Raise DatabaseReplaced when the URL leads to another database than the one held."""
        self._held.check()

    def close(self) -> None:
        """Let go of the database's connections (they may hold a replaced one)."""
        self._store.engine.dispose()

    def forget(self, order_id: int) -> None:
        self._known.pop(order_id, None)
