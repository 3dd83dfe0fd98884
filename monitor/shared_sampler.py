"""The shared sampler: one monitor-producer process per machine for every live order.

``python -m monitor producer --all`` subscribes to every ``task<ID>`` topic by pattern and runs
the per-order state machine of :class:`monitor.producer.MonitorProducer` for each order it
finds there, in one loop: each order's samples, STOP and TERMINATE go on that order's own
topics exactly as a per-order producer would send them. Only tasks whose ORDER names this
machine (the ``host`` header) are sampled; the machine that sampled an order's last task
sends its resource STOP.

One pass over ``/proc`` finds the children of all the tasks sampled at about one moment
(:class:`monitor.proc.ChildIndex`), so the cost per task is its own counters only.

Each machine's sampler is a consumer group of its own (``monitor-sampler-<host>-<deployment
id>``), since it must see every order's task topic. It commits an order's offset only once the order is over
(TERMINATE): restarted, it replays the orders still running from their first message and
ends up in the state those messages imply, as a restarted per-order producer does.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from pipeline.errors import ProtocolError
from pipeline.kafka import Consumer, Producer
from pipeline.lifetime import StopSignals
from pipeline.protocol import TASK_TOPIC_PATTERN, Message, order_id_of_topic
from pipeline.settings import Settings
from pipeline.db import connect
from pipeline.db.identity import DatabaseReplaced
from monitor.claims import OrderClaims
from monitor.consumer import SHARED_GROUP_CONFIG
from monitor.proc import ChildIndex
from monitor.producer import INTERVAL, TERMINATE_WAIT, Mode, MonitorProducer
from monitor.ready import announce_ready

logger = logging.getLogger(__name__)

# How long one pass over /proc serves every task sampled meanwhile.
CHILD_INDEX_AGE = 0.25
STATS_EVERY = 60.0


class SharedSampler:
    """Samples the running tasks of every order on this machine until stopped."""

    def __init__(self, settings: Settings, signals: StopSignals, interval: float = INTERVAL,
                 terminate_wait: float = TERMINATE_WAIT, host: str | None = None) -> None:
        self.settings = settings
        self.signals = signals
        self.interval = interval
        self.terminate_wait = terminate_wait
        self.host = host or os.environ.get("NODE_NAME") or socket.gethostname()
        self.orders: dict[int, MonitorProducer] = {}
        self.finished: set[int] = set()  # orders whose TERMINATE was seen: later messages are history
        self.malformed = 0
        self._children = ChildIndex(max_age=CHILD_INDEX_AGE)

    @property
    def group_id(self) -> str:
        return f"monitor-sampler-{self.host}-{self.settings.deployment_id()}"

    def run(self) -> None:
        """Sample until stopped; start over on a database replaced meanwhile (its orders are
        replayed from their task topics, whose offsets are committed only once they are over)."""
        while True:
            try:
                return self._serve()
            except DatabaseReplaced as exc:
                logger.warning("shared sampler: %s; starting over on the new one", exc)
                self.orders.clear()
                self.finished.clear()
                self._claims.close()

    def _serve(self) -> None:
        self._claims = OrderClaims(connect(self.settings.database_url), self.settings.database_url)
        with Consumer(self.settings, group_id=self.group_id, **SHARED_GROUP_CONFIG) as consumer, \
                Producer(self.settings, shared=True) as producer:
            consumer.on_revoke = self._revoked
            consumer.subscribe([TASK_TOPIC_PATTERN])
            announce_ready()
            logger.info("shared sampler ready on %s (group %s)", self.host, self.group_id)
            stats_at = time.monotonic() + STATS_EVERY
            while not self.signals.requested.is_set():
                wake = min([0.2, *(order.wake_in() for order in self.orders.values())])
                message = consumer.poll(wake)
                if message is not None:
                    self._route(message, consumer, producer)
                for order_id, order in list(self.orders.items()):
                    order.tick(producer)
                    if order.stop_overdue():
                        # Usual: the orchestrator deletes an order's topics as soon as it reads
                        # TERMINATE, often before this reader gets to it.
                        logger.info("order_id=%d no TERMINATE read within %gs (its topics may be gone "
                                    "already); forgetting the order", order_id, self.terminate_wait)
                        self._forget(order_id)
                if time.monotonic() >= stats_at:
                    stats_at = time.monotonic() + STATS_EVERY
                    logger.info("shared sampler: %d live orders, %d finished, %d malformed messages",
                                len(self.orders), len(self.finished), self.malformed)
            # Stopped: the live orders' messages stay uncommitted, and the next sampler
            # replays them (their tasks' HALT totals make the samples missed meanwhile).
            logger.info("shared sampler stopped with %d live orders", len(self.orders))

    def _route(self, message: Message, consumer: Consumer, producer: Producer) -> None:
        try:
            order_id = order_id_of_topic(message.topic)
        except ProtocolError as exc:
            self.malformed += 1
            logger.warning("skipping a message on %s: %s", message.topic, exc)
            return
        if order_id in self.finished:
            # Over; unless the database was replaced and the ID is a new order's.
            self._claims.check_database()
            return
        order = self.orders.get(order_id)
        if order is None:
            if not self._claims.ours(order_id):
                return  # another's order (see monitor.claims), or the database cannot tell yet
            order = self.orders[order_id] = MonitorProducer(
                self.settings, order_id, self.signals, self.interval, self.terminate_wait,
                mode=Mode.ORDER, host=self.host, only_this_host=True,
                children=self._children.descendants)
        if order.handle(message, producer):
            self._forget(order_id)
            consumer.mark_processed(message)
            consumer.commit()

    def _forget(self, order_id: int) -> None:
        order = self.orders.pop(order_id, None)
        if order is not None:
            self.malformed += order.malformed
        self.finished.add(order_id)

    def _revoked(self, partitions: list[tuple[str, int]]) -> None:
        # A deleted topic (its order over, or given up) or a rebalance: its state goes with it.
        for topic, _ in partitions:
            try:
                order_id = order_id_of_topic(topic)
            except ProtocolError:
                continue
            self.orders.pop(order_id, None)
