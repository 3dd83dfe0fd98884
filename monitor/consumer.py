"""monitor-consumer: stores every sample of one order, numerically encoded, in the database.

Samples are written in batches through the idempotent write path, and the Kafka offsets are
committed only after the batch's database commit: a consumer killed at any moment and started
again reads the uncommitted tail once more, and the unique key drops what was already stored.
On the producer's STOP it flushes, sends TERMINATE on ``task<ID>`` and exits.
"""

from __future__ import annotations

import logging
import time

from pipeline.db import Measurement, MeasurementWriter, connect, create_schema
from pipeline.errors import DatabaseError, ProtocolError
from pipeline.kafka import Consumer, Producer
from pipeline.protocol import Message, MonitorStopped, MonitorTerminated, decode_resource_topic, resource_topic
from pipeline.settings import Settings
from monitor.signals import StopSignals, announce_ready
from training.registry_probe import champion_may_exist

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
BATCH_SECONDS = 1.0


class MonitorConsumer:
    """Reads ``resource<ID>`` until the monitor-producer's STOP."""

    def __init__(self, settings: Settings, order_id: int, signals: StopSignals,
                 batch_size: int = BATCH_SIZE, batch_seconds: float = BATCH_SECONDS) -> None:
        self.settings = settings
        self.order_id = order_id
        self.signals = signals
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.stored = 0
        self.received = 0
        self.malformed = 0
        self.scorer = None  # a LiveScorer while live scoring runs

    def run(self) -> bool:
        """Consume until STOP (True) or a stop signal (False: TERMINATE is not sent)."""
        engine = connect(self.settings.database_url)
        create_schema(engine)
        writer = MeasurementWriter(engine)
        with Consumer(self.settings, group_id=f"monitor-consumer-{self.order_id}") as consumer, \
                Producer(self.settings, **{"enable.idempotence": False}) as producer:
            # (not idempotent: its first message would wait ~500 ms for a producer id, and a
            # duplicated TERMINATE or anomaly harms nobody)
            consumer.assign([resource_topic(self.order_id)])
            if not self.settings.live_scoring:
                logger.info("order_id=%d live scoring is off (LIVE_SCORING=off)", self.order_id)
            elif not champion_may_exist(self.settings.mlflow_tracking_uri):
                logger.warning("order_id=%d no 'champion' expected-usage model registered yet; samples "
                               "are stored but not scored (train one with `python -m training fit`)",
                               self.order_id)
            else:
                # Imported and loaded only to score, and before reporting ready: the model's
                # libraries cost seconds of CPU, which must not be taken from the tasks.
                from monitor.live_scoring import LiveScorer

                self.scorer = LiveScorer(self.settings, engine, self.order_id, producer).start()
            announce_ready()
            logger.info("order_id=%d monitor-consumer ready", self.order_id)
            pending: list[tuple[Message, Measurement | None]] = []
            flush_at = time.monotonic() + self.batch_seconds
            while not self.signals.requested.is_set():
                messages = consumer.consume(self.batch_size, timeout=0.2)
                if self.scorer is not None:
                    # Score in the pauses between arrivals: live, that is within a second.
                    self.scorer.consumer_busy(bool(messages))
                stopped = False
                for message in messages:
                    measurement, stopped = self._decode(message)
                    pending.append((message, measurement))
                    if stopped:
                        break
                if stopped or len(pending) >= self.batch_size or time.monotonic() >= flush_at:
                    self._flush(writer, consumer, pending)
                    pending = []
                    flush_at = time.monotonic() + self.batch_seconds
                if stopped:
                    self._terminate(producer)
                    return True
            self._flush(writer, consumer, pending)
            if self.scorer is not None:
                self.scorer.close(timeout=10.0)
            logger.info("order_id=%d stopped by signal after storing %d samples", self.order_id, self.stored)
            return False

    def _decode(self, message: Message) -> tuple[Measurement | None, bool]:
        self.received += 1
        try:
            decoded = decode_resource_topic(message, self.order_id)
        except ProtocolError as exc:
            self.malformed += 1
            logger.warning("order_id=%d skipping malformed message at offset %s (%d so far): %s",
                           self.order_id, message.offset, self.malformed, exc)
            return None, False
        if isinstance(decoded, MonitorStopped):
            return None, True
        return Measurement(self.order_id, decoded.task_name, decoded.resource, decoded.value,
                           decoded.timestamp_ms, decoded.index, decoded.attempt), False

    def _flush(self, writer: MeasurementWriter, consumer: Consumer,
               pending: list[tuple[Message, Measurement | None]]) -> None:
        if not pending:
            return
        batch = [m for _, m in pending if m is not None]
        self.stored += self._write(writer, batch)
        if self.scorer is not None:
            self.scorer.submit(batch)
        for message, _ in pending:
            consumer.mark_processed(message)
        consumer.commit()

    def _write(self, writer: MeasurementWriter, batch: list[Measurement]) -> int:
        """Write, retrying with backoff while the database is unavailable; the offsets stay
        uncommitted meanwhile, so a stop in between loses nothing either."""
        delay = 0.5
        while True:
            try:
                return writer.write(batch)
            except DatabaseError as exc:
                if self.signals.requested.is_set():
                    raise
                logger.warning("order_id=%d storing %d samples failed, retrying in %.1fs: %s",
                               self.order_id, len(batch), delay, exc)
                self.signals.requested.wait(delay)
                delay = min(delay * 2, 10.0)

    def _terminate(self, producer: Producer) -> None:
        if self.scorer is not None:
            self.scorer.close()
        producer.send_now(MonitorTerminated(self.order_id).encode())
        scored = self.scorer.summary() if self.scorer else "scoring off"
        logger.info("order_id=%d STOP received: %d samples stored (%s), %d malformed; TERMINATE sent",
                    self.order_id, self.stored, scored, self.malformed)
