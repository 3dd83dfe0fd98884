"""Topic administration: create per-order topics and wait until they exist; delete them.

Topic names here are logical (see :mod:`pipeline.kafka.topics`): TOPIC_PREFIX is put in front
of them on the way to the broker, and taken off, with every topic outside it, on the way back.

A broker that is slow to answer (starved of CPU by the tasks of many orders on a small machine)
is not down: a request that times out is asked again, for as long as a producer waits to
deliver a message (:data:`PATIENCE`), and the process says once that the broker is slow.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence

import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import KafkaClientError
from pipeline.kafka.config import client_config
from pipeline.kafka.topics import TopicNames
from pipeline.settings import Settings

logger = logging.getLogger(__name__)

# One request is given this long (listing topics blocks that long, uninterruptibly: it bounds
# how long a cancel waits); one that got no answer is asked again until PATIENCE is spent:
# librdkafka's default message.timeout.ms, how long every producer here waits out a broker
# that does not answer.
REQUEST_TIMEOUT = 5.0
PATIENCE = 300.0
SLOW_SPELL_QUIET = 10.0
# What a broker that is slow or away answers with (a refusal, such as a failed login or an
# ACL, is final at once).
_NO_ANSWER = frozenset({
    confluent_kafka.KafkaError._TIMED_OUT, confluent_kafka.KafkaError._TRANSPORT,
    confluent_kafka.KafkaError._ALL_BROKERS_DOWN, confluent_kafka.KafkaError.REQUEST_TIMED_OUT,
    confluent_kafka.KafkaError.NOT_CONTROLLER,
})


# What the client hears when the broker refuses it (a wrong password): then a request left
# unanswered is no slowness, and asking again is no use.
_REFUSALS = frozenset({
    confluent_kafka.KafkaError._AUTHENTICATION, confluent_kafka.KafkaError.SASL_AUTHENTICATION_FAILED,
    confluent_kafka.KafkaError._SSL,
})


class _NoAnswer(Exception):
    """A request the broker did not answer in time: asked again while patience lasts."""


def _no_answer(exc: confluent_kafka.KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, confluent_kafka.KafkaError) and error.code() in _NO_ANSWER


class TopicAdmin:
    """Creates and deletes topics. Connects on first use. One instance may serve many threads
    (every order of an orchestrator run); ``stop`` (a cancel) ends its waiting early."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None,
                 patience: float = PATIENCE) -> None:
        self._config = client_config(settings)
        self._refusal: confluent_kafka.KafkaError | None = None
        self._forward_error = self._config.get("error_cb")
        self._config["error_cb"] = self._on_error
        self._bootstrap = settings.kafka_bootstrap_servers
        self._names = TopicNames.of(settings)
        self._admin: AdminClient | None = None
        self._stop = stop or threading.Event()
        self._patience = patience
        self._lock = threading.Lock()
        self._slow_since: float | None = None  # the broker has left a request unanswered
        self._last_unanswered = 0.0

    def _on_error(self, error: confluent_kafka.KafkaError) -> None:
        if error.code() in _REFUSALS:
            self._refusal = error
        if self._forward_error is not None:
            self._forward_error(error)

    def _client(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient(self._config)
            return self._admin

    def existing(self, timeout: float = REQUEST_TIMEOUT) -> set[str]:
        """Names of the topics the cluster has now under this TOPIC_PREFIX (logical names)."""
        return self._patiently("listing topics", lambda: self._list(timeout))

    def _list(self, timeout: float) -> set[str]:
        try:
            return self._names.logical_all(self._client().list_topics(timeout=timeout).topics)
        except confluent_kafka.KafkaException as exc:
            if _no_answer(exc):
                raise _NoAnswer(str(exc)) from exc
            raise KafkaClientError(f"cannot list topics: {exc}") from exc

    def create(self, topics: Sequence[str], partitions: int = 1, replication: int = -1,
               timeout: float = REQUEST_TIMEOUT) -> None:
        """Create ``topics`` (existing ones are fine) and return once all are visible.

        ``replication=-1`` takes the broker's default, so the same code serves a single-node
        broker and a cluster.
        """
        errors = [e for e in self._create(topics, partitions, replication, timeout).values() if e]
        if errors:
            raise errors[0]
        self._wait(lambda names: set(topics) <= names, f"topics {', '.join(topics)} to appear")

    def create_exclusive(self, topics: Sequence[str], partitions: int = 1, replication: int = -1,
                         timeout: float = REQUEST_TIMEOUT) -> set[str]:
        """Create those of ``topics`` that do not exist yet and return the ones that did.

        The broker lets exactly one of two concurrent creators of a name have it, so no
        caller ever takes a topic another one created for its own (as listing first and
        creating after could: two deployments handing out the same orderID at once). The
        topics created here are visible when this returns; when one cannot be created, those
        created here are deleted again before the error is raised.
        """
        not_created = self._create(topics, partitions, replication, timeout)
        existed = {t for t, error in not_created.items() if error is None}
        created = [t for t in topics if t not in not_created]
        errors = [e for e in not_created.values() if e]
        if errors:
            try:
                self.delete(created, timeout)
            except KafkaClientError as undo:
                logger.warning("topics %s created but not deleted again: %s", ", ".join(created), undo)
            raise errors[0]
        self._wait(lambda names: set(created) <= names, f"topics {', '.join(created)} to appear")
        return existed

    def _create(self, topics: Sequence[str], partitions: int, replication: int,
                timeout: float) -> dict[str, KafkaClientError | None]:
        """Ask the broker for ``topics``; those it did not create, each with the error why
        (None: the topic exists already).

        A request left unanswered is asked again. Should the first one have been carried out
        after all, the second finds the topic there: a topic that "exists already" after an
        unanswered request of this call's own is taken for this call's creation (a creator
        of another deployment would have to take that very name in that very second)."""
        pending = list(dict.fromkeys(topics))  # a name twice in one request crashes librdkafka
        not_created: dict[str, KafkaClientError | None] = {}
        unanswered: set[str] = set()

        def ask() -> None:
            nonlocal pending
            futures = self._client().create_topics(
                [NewTopic(self._names.physical(t), num_partitions=partitions, replication_factor=replication)
                 for t in pending],
                operation_timeout=timeout, request_timeout=timeout,
            )
            again = []
            for topic in pending:
                physical = self._names.physical(topic)
                try:
                    self._result(futures[physical], timeout + 1.0)
                except confluent_kafka.KafkaException as exc:
                    if exc.args[0].code() == confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                        if topic not in unanswered:
                            not_created[topic] = None
                    elif _no_answer(exc):
                        again.append(topic)
                    else:
                        not_created[topic] = KafkaClientError(f"cannot create topic {physical}: {exc}")
                except concurrent.futures.TimeoutError:
                    again.append(topic)
            unanswered.update(again)
            pending = again
            if again:
                raise _NoAnswer(f"no answer to creating {', '.join(again)} within {timeout:g}s")

        if pending:
            self._patiently("creating topics", ask)
        return not_created

    def delete(self, topics: Sequence[str], timeout: float = REQUEST_TIMEOUT) -> None:
        """Delete ``topics`` (missing ones are fine) and return once all are gone."""
        topics = list(dict.fromkeys(topics))  # a name twice in one request crashes librdkafka
        if not topics:
            return

        def ask() -> None:
            futures = self._client().delete_topics(self._names.physical_all(topics), operation_timeout=timeout,
                                                   request_timeout=timeout)
            for topic, future in futures.items():
                try:
                    self._result(future, timeout + 1.0)
                except confluent_kafka.KafkaException as exc:
                    if _no_answer(exc):
                        raise _NoAnswer(f"no answer to deleting {topic}: {exc}") from exc
                    if exc.args[0].code() != confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART:
                        raise KafkaClientError(f"cannot delete topic {topic}: {exc}") from exc
                except concurrent.futures.TimeoutError:
                    raise _NoAnswer(f"no answer to deleting {topic} within {timeout:g}s") from None

        self._patiently("deleting topics", ask)
        self._wait(lambda names: not set(topics) & names, f"topics {', '.join(topics)} to go")

    def _result(self, future: concurrent.futures.Future, timeout: float):
        """``future.result(timeout)``, given up early (TimeoutError) once stopped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(min(0.2, max(deadline - time.monotonic(), 0.0)))
            except concurrent.futures.TimeoutError:
                if self._stop.is_set() or time.monotonic() >= deadline:
                    raise

    def _wait(self, done, what: str) -> None:
        """Until ``done(existing topics)``; a broker that lists topics is answering, so this
        waits for the metadata to settle, asking less often as it goes."""
        deadline = time.monotonic() + self._patience
        pause = 0.05
        while not done(self.existing()):
            if time.monotonic() > deadline or self._stop.is_set():
                raise KafkaClientError(f"gave up after {self._patience:g}s waiting for {what}")
            self._stop.wait(pause)
            pause = min(pause * 2, 1.0)

    def _patiently(self, what: str, call):
        """``call()``, asked again while the broker leaves it unanswered, for up to the
        patience; then one :class:`KafkaClientError`. Says once that the broker is slow."""
        deadline = time.monotonic() + self._patience
        while True:
            try:
                result = call()
            except _NoAnswer as exc:
                self._client().poll(0)  # serves error_cb: did the broker refuse this client?
                if self._refusal is not None:
                    raise KafkaClientError(f"{what}: {self._bootstrap} refused this client: "
                                           f"{self._refusal.str()}") from exc
                if time.monotonic() >= deadline or self._stop.is_set():
                    why = "stopped" if self._stop.is_set() else f"for {self._patience:g}s"
                    raise KafkaClientError(f"{what}: no answer from {self._bootstrap} ({why}): {exc}") from exc
                self._slow(what, exc)
                self._stop.wait(0.5)
                continue
            self._answered()
            return result

    def _slow(self, what: str, exc: _NoAnswer) -> None:
        with self._lock:
            self._last_unanswered = time.monotonic()
            if self._slow_since is not None:
                return
            self._slow_since = self._last_unanswered
        logger.warning("broker %s is slow to answer (%s: %s); asking again for up to %gs",
                       self._bootstrap, what, exc, self._patience)

    def _answered(self) -> None:
        """A slow spell ends once requests have been answered for SLOW_SPELL_QUIET seconds:
        many threads asking at once would otherwise flap between slow and answering."""
        with self._lock:
            since = self._slow_since
            if since is None or time.monotonic() - self._last_unanswered < SLOW_SPELL_QUIET:
                return
            self._slow_since = None
        logger.warning("broker %s answers again (slow for %.1fs)", self._bootstrap, self._last_unanswered - since)
