"""monitor-consumer: stores every sample, numerically encoded, in the database (and scores it).

Two shapes share this code (:class:`MonitorConsumer`):

- **per order** (``python -m monitor consumer ORDER_ID``, the original shape): reads
  ``resource<ID>`` alone, and exits after that order's STOP.
- **shared** (``python -m monitor consumer --all``): one long-lived member of the consumer
  group ``monitor-consumers-<deployment id>`` (one per broker and database), subscribed to every ``resource<ID>`` topic by pattern. The
  group's members share the topics (add replicas to share the load); samples of all orders are
  stored in common batches, and the model is loaded once. Each order's STOP gets its own
  TERMINATE, exactly as the per-order consumer would send it, and the service goes on. It
  outlives fits: its scorer looks the ``champion`` up again for every order created after its
  last look-up, so an order started after a fit is scored with that fit's model, the first
  one included (monitor/live_scoring.py).

Either way samples are written in batches through the idempotent write path, and the Kafka
offsets are committed only after the batch's database commit: a consumer killed at any moment
(or a partition moved to another replica) leaves an uncommitted tail that is read again, and
the unique key drops what was already stored. On an order's STOP: flush, send TERMINATE on
``task<ID>``, and only then commit the STOP's own offset, so a crash in between repeats the
TERMINATE rather than losing it.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import SQLAlchemyError

from models.registry_probe import champion_may_exist
from monitor.claims import OrderClaims
from monitor.ready import announce_ready
from pipeline.db import MeasurementWriter, connect, create_schema
from pipeline.db.identity import DatabaseReplaced
from pipeline.db.retry import retrying
from pipeline.errors import ProtocolError
from pipeline.kafka import Consumer, Producer
from pipeline.lifetime import StopSignals
from pipeline.protocol import (
    RESOURCE_TOPIC_PATTERN, Message, MonitorStopped, MonitorTerminated, Sample, decode_resource_topic,
    order_id_of_topic, resource_topic,
)
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

BATCH_SIZE = 2000
BATCH_SECONDS = 0.5
"""Samples wait at most this long to be stored together (under a backlog a batch fills to
``BATCH_SIZE`` first; at 8 running tasks, 70 samples a second, this is two small commits a
second), and an anomaly as long to be seen; a run's closing sample does not wait:
its run's verdict (a regression of its totals) is due at the run's end, and the batch that
holds it is stored and scored at once."""
SHARED_GROUP = "monitor-consumers"  # + "-<deployment id>": one group per broker and database
# The shared consumer's group membership: new orders' topics are found within a second, a
# replica that dies without leaving has its topics moved to the others within 10 s, and
# assignment is incremental, so a new topic never pauses the others.
SHARED_GROUP_CONFIG = {
    "partition.assignment.strategy": "cooperative-sticky",
    "topic.metadata.refresh.interval.ms": 1000,
    "session.timeout.ms": 10000,
    "heartbeat.interval.ms": 1000,
}
STATS_EVERY = 60.0


def shared_group(settings: Settings) -> str:
    """The consumer group of the shared consumer's replicas for these settings."""
    return f"{SHARED_GROUP}-{settings.deployment_id()}"


class MonitorConsumer:
    """Reads ``resource<ID>`` of one order until its STOP, or of every order until stopped."""

    def __init__(self, settings: Settings, signals: StopSignals, order_id: int | None = None,
                 batch_size: int = BATCH_SIZE, batch_seconds: float = BATCH_SECONDS) -> None:
        self.settings = settings
        self.order_id = order_id  # None: the shared service
        self.signals = signals
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.stored = 0
        self.received = 0
        self.malformed = 0
        self.orders_done = 0
        self.scorer = None  # a LiveScorer while live scoring runs
        self._pending: list[tuple[Message, Sample | None]] = []
        self._run_ended = False  # a closing sample is pending: store it now
        self._label = f"order_id={order_id}" if order_id is not None else "shared"

    @property
    def shared(self) -> bool:
        return self.order_id is None

    def run(self) -> bool:
        """Consume until the order's STOP (True) or a stop signal (False: for a per-order
        consumer, TERMINATE is then not sent). The shared consumer starts over on a database
        replaced under it (monitor/claims.py): what it had not committed is read again, and
        claimed in the new database."""
        while True:
            try:
                return self._serve()
            except DatabaseReplaced as exc:
                if not self.shared:
                    raise
                logger.warning("%s %s; starting over on the new one", self._label, exc)
                if self.scorer is not None:
                    self.scorer.close(timeout=10.0)
                    self.scorer = None
                self._writer.engine.dispose()  # its connections hold the old database

    def _serve(self) -> bool:
        engine = connect(self.settings.database_url)
        retrying(lambda: create_schema(engine), f"{self._label} preparing the schema",
                 self.settings.db_retry_seconds, self.signals.requested)
        self._writer = MeasurementWriter(engine)
        self._claims = OrderClaims(engine, self.settings.database_url) if self.shared else None
        group = shared_group(self.settings) if self.shared else f"monitor-consumer-{self.order_id}"
        overrides = SHARED_GROUP_CONFIG if self.shared else {}
        with Consumer(self.settings, group_id=group, **overrides) as consumer, \
                Producer(self.settings, shared=self.shared, **{"enable.idempotence": False}) as producer:
            # (not idempotent: its first message would wait ~500 ms for a producer id, and a
            # duplicated TERMINATE or anomaly harms nobody)
            self._consumer = consumer
            if self.shared:
                consumer.on_revoke = lambda _partitions: self._flush()
                consumer.subscribe([RESOURCE_TOPIC_PATTERN])
            else:
                consumer.assign([resource_topic(self.order_id)])
            self._start_scoring(engine, producer)
            announce_ready()
            logger.info("%s monitor-consumer ready%s", self._label,
                        f" (group {group})" if self.shared else "")
            try:
                return self._loop(producer)
            except DatabaseReplaced:
                # What is pending was claimed in the old database; uncommitted, it is read
                # again and claimed anew (not flushed when the consumer closes on the way out).
                self._pending = []
                raise

    def _start_scoring(self, engine, producer: Producer) -> None:
        if not self.settings.live_scoring:
            logger.info("%s live scoring is off (LIVE_SCORING=off)", self._label)
            return
        if not self.shared and not champion_may_exist(self.settings.mlflow_tracking_uri):
            # It starts after its order was created: a champion registered later is not its order's.
            logger.warning("%s no 'champion' expected-usage model registered yet; samples are stored "
                           "but not scored (train one with `python -m training fit`)", self._label)
            return
        # Imported and loaded only to score, and before reporting ready: the model's libraries
        # cost seconds of CPU, which must not be taken from the tasks. The shared consumer keeps
        # a scorer without a model too: it takes the first champion in use for the first order
        # created after the fit (until then it imports neither MLflow nor PyTorch).
        from monitor.live_scoring import LiveScorer

        scorer = LiveScorer(self.settings, engine, producer, self._label).start()
        if scorer.detector is None:
            logger.warning("%s no 'champion' expected-usage model to score with; samples are stored but "
                           "not scored (train one with `python -m training fit`%s)", self._label,
                           ": orders started after it are scored with it" if self.shared else "")
            if not self.shared:
                scorer.close()
                return
        self.scorer = scorer

    def _loop(self, producer: Producer) -> bool:
        flush_at = time.monotonic() + self.batch_seconds
        stats_at = time.monotonic() + STATS_EVERY
        while not self.signals.requested.is_set():
            messages = self._consumer.consume(self.batch_size, timeout=0.2)
            if self.scorer is not None:
                # Score in the pauses between arrivals: live, that is within a second.
                self.scorer.consumer_busy(bool(messages))
            stops = []
            for message in messages:
                stopped = self._decode(message)
                if stopped is not None:
                    stops.append((stopped, message))
            if stops:
                # Every STOP of this batch: its order's samples stored (one flush for all),
                # then each order's TERMINATE, then the STOPs' own offsets.
                self._flush()
                self._terminate([order_id for order_id, _ in stops], producer)
                for _, message in stops:
                    self._consumer.mark_processed(message)
                self._consumer.commit()
                if not self.shared:
                    return True
            now = time.monotonic()
            if len(self._pending) >= self.batch_size or now >= flush_at or self._run_ended:
                self._flush()
                flush_at = time.monotonic() + self.batch_seconds
            if self.shared and now >= stats_at:
                stats_at = now + STATS_EVERY
                logger.info("shared: %d samples stored, %d orders finished, %d malformed so far",
                            self.stored, self.orders_done, self.malformed)
        self._flush()
        if self.scorer is not None:
            self.scorer.close(timeout=10.0)
        logger.info("%s stopped by signal after storing %d samples", self._label, self.stored)
        return False

    def _decode(self, message: Message) -> int | None:
        """Queue a sample for the next flush; the orderID when ``message`` is a STOP."""
        self.received += 1
        try:
            order_id = order_id_of_topic(message.topic)
            if self._claims is not None and self._claims.ours(order_id) is False:
                return None  # another's order (see monitor.claims): left alone, uncommitted
            decoded = decode_resource_topic(message, order_id)
        except ProtocolError as exc:
            self.malformed += 1
            logger.warning("%s skipping malformed message on %s at offset %s (%d so far): %s",
                           self._label, message.topic, message.offset, self.malformed, exc)
            self._pending.append((message, None))
            return None
        if isinstance(decoded, MonitorStopped):
            return order_id
        self._pending.append((message, decoded))
        self._run_ended = self._run_ended or bool(decoded.closing)
        return None

    def _flush(self) -> None:
        """Store what is pending, then commit its offsets (also called before a rebalance
        takes partitions away)."""
        pending, self._pending, self._run_ended = self._pending, [], False
        if not pending:
            return
        batch = [m for _, m in pending if m is not None]
        self.stored += self._write(batch)
        if self.scorer is not None:
            self.scorer.submit(batch)
        for message, _ in pending:
            self._consumer.mark_processed(message)
        self._consumer.commit()

    def _write(self, batch: list[Sample]) -> int:
        """Write, riding out a lost database for ``DB_RETRY_SECONDS``; the offsets stay
        uncommitted meanwhile, so neither a stop nor giving up loses anything: the samples
        are read again by whoever resumes (a restarted consumer, the shared one starting over)."""
        try:
            return retrying(lambda: self._writer.write(batch), f"{self._label} storing {len(batch)} samples",
                            self.settings.db_retry_seconds, self.signals.requested)
        except SQLAlchemyError:
            # A write refused (an order or a name the database does not know) may be the first
            # sign of a database replaced under a shared consumer.
            if self._claims is not None:
                self._claims.check_database()
            raise

    def _terminate(self, order_ids: list[int], producer: Producer) -> None:
        """The orders' samples are stored (and scored): tell their monitor-producers."""
        if self.scorer is not None:
            # A per-order consumer exits next, so it scores first; the shared one scores on,
            # in the pauses between arrivals, and its deviations follow within seconds.
            self.scorer.finish(order_ids, wait=not self.shared)
        for order_id in order_ids:
            producer.send(MonitorTerminated(order_id).encode())
        producer.flush()
        for order_id in order_ids:
            self.orders_done += 1
            if self._claims is not None:
                self._claims.forget(order_id)
            if self.shared:
                logger.info("order_id=%d STOP received: samples stored; TERMINATE sent", order_id)
            else:
                scored = self.scorer.summary() if self.scorer else "scoring off"
                logger.info("order_id=%d STOP received: %d samples stored (%s), %d malformed; TERMINATE sent",
                            order_id, self.stored, scored, self.malformed)
