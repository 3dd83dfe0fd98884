"""Broker health as the user sees it: one warning when the broker goes away, one line when it
is back, instead of librdkafka's error line per retry per client.

While the broker is down librdkafka reports every reconnect attempt of every client (about ten
a second each) through its log callback (facility FAIL, level ERROR: "Connect to ... failed:
Connection refused") and its error callback (``_TRANSPORT``, ``_ALL_BROKERS_DOWN``), and says
nothing when a connection succeeds again. So every client of a process reports to one
:class:`BrokerHealth` per bootstrap string (:func:`client_hooks`, which ``client_config``
adds), which logs that chatter at DEBUG and decides for itself whether the broker is away:

* a connection failure is checked with a TCP connect to the bootstrap servers. Refused (or
  timed out, unresolvable): an outage opens with one warning. Accepted: the failure was a
  connection the client re-opens by itself (an idle one the broker closed, a broker still
  starting up), and nothing is said. So a failure seen right after the broker came back does
  not open a second outage unless the broker really is unreachable again;
* while an outage is open, a daemon thread probes every :data:`PROBE_INTERVAL` seconds and the
  first accepted connect closes it with one line. librdkafka gives no "connected" signal
  without its debug logging (``debug=broker``, hundreds of lines a second), so the probe is
  the one way to say "back" promptly even when no message flows;
* failures that go on for :data:`STUCK_AFTER` seconds although the port accepts connections
  (a listener advertising an unreachable address, a TLS/plaintext mismatch) are a problem the
  probe cannot see: they are said once, with librdkafka's own words.

Other librdkafka log lines (authentication, unknown topics, ...) pass through unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import confluent_kafka

logger = logging.getLogger(__name__)
_librdkafka = logging.getLogger("librdkafka")

PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 2.0
STUCK_AFTER = 10.0  # failures although the port answers, for this long, are said
STUCK_GAP = 15.0  # a pause this long between such failures starts counting afresh

# librdkafka's words for a connection that failed or was lost (never a hint at a configuration
# problem such as "verify that security.protocol is correctly configured").
_CONNECTION_FAILURE = re.compile(
    r"Connect to .* failed|Disconnected|brokers are down|Connection refused|Connection reset"
    r"|Broken pipe|timed out in state CONNECT|Connection setup timed out|Failed to resolve"
    r"|Network is unreachable|No route to host",
    re.IGNORECASE,
)
# Case-sensitive: librdkafka's hints say SSL and SASL, while the broker names of such listeners
# (``sasl_ssl://host:9093/1``), which every line carries, are lower case.
_CONFIGURATION_HINT = re.compile(r"security\.protocol|SSL|SASL|[Aa]uthenticat|certificate")
_CONNECTION_CODES = {
    confluent_kafka.KafkaError._TRANSPORT,
    confluent_kafka.KafkaError._ALL_BROKERS_DOWN,
    confluent_kafka.KafkaError._RESOLVE,
    confluent_kafka.KafkaError._TIMED_OUT,
}


# What a broker that has just started says while it settles, and librdkafka retries by itself.
_SETTLING = re.compile(r"(load in progress|not available|Not coordinator).*retrying", re.IGNORECASE)


def is_connection_failure(text: str) -> bool:
    """Whether a librdkafka message says only that a broker connection failed or was lost."""
    return bool(_CONNECTION_FAILURE.search(text)) and not _CONFIGURATION_HINT.search(text)


def reachable(bootstrap: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether any of the bootstrap servers accepts a TCP connection."""
    for host, port in _addresses(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def _addresses(bootstrap: str) -> list[tuple[str, int]]:
    """``host:port`` pairs of a bootstrap string (``PLAINTEXT://h:9092,[::1]:9093``)."""
    found = []
    for item in bootstrap.split(","):
        item = item.strip().rpartition("://")[2]
        host, _, port = item.rpartition(":")
        if not host:
            host, port = item, "9092"
        try:
            found.append((host.strip("[]"), int(port)))
        except ValueError:
            continue
    return found


class BrokerHealth:
    """Whether this process can reach one broker (its bootstrap servers), told once per change.

    ``probe`` and ``clock`` stand in for the TCP connect and the time in tests; with
    ``threads=False`` nothing probes in the background and a test calls :meth:`probe_once`.
    """

    def __init__(self, bootstrap: str, probe: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic, threads: bool = True) -> None:
        self.bootstrap = bootstrap
        self._probe = probe or (lambda: reachable(bootstrap))
        self._clock = clock
        self._threads = threads
        self._lock = threading.Lock()
        self._down = False  # an outage is open (warned)
        self._checking = False  # a probe is due or running
        self._first_failure: float | None = None  # of the failure being checked, or of the outage
        self._last_detail = ""
        self._stuck_since: float | None = None  # failures although the port answers
        self._stuck_last = 0.0
        self._stuck_said = False

    @property
    def down(self) -> bool:
        return self._down

    def connection_failed(self, detail: str) -> None:
        """A client lost or could not open a connection: check whether the broker is away."""
        with self._lock:
            self._last_detail = detail
            if self._first_failure is None:
                self._first_failure = self._clock()
            if self._checking:  # the probe under way (or the outage's prober) answers this one too
                return
            self._checking = True
        if self._threads:
            threading.Thread(target=self._probe_until_reachable, name="broker-health", daemon=True).start()

    def probe_once(self) -> bool:
        """Probe the broker and open or close the outage; True while it is unreachable."""
        answered = self._probe()
        now = self._clock()
        with self._lock:
            if not answered:
                if not self._down:
                    self._down = True
                    self._stuck_since = None
                    logger.warning("broker %s unreachable, retrying", self.bootstrap)
                return True
            if self._down:
                logger.warning("broker %s reachable again after %.1fs", self.bootstrap,
                               now - (self._first_failure if self._first_failure is not None else now))
                self._down = False
            elif self._first_failure is not None:
                self._failed_though_answering(now)
            self._first_failure = None
            self._checking = False
            return False

    def _probe_until_reachable(self) -> None:
        while self.probe_once():
            time.sleep(PROBE_INTERVAL)

    def _failed_though_answering(self, now: float) -> None:
        """A failure the probe does not explain: normal once in a while (an idle connection the
        broker closed, a broker still starting); said once when it goes on for long."""
        if self._stuck_since is None or now - self._stuck_last > STUCK_GAP:
            self._stuck_since, self._stuck_said = now, False
        self._stuck_last = now
        if not self._stuck_said and now - self._stuck_since >= STUCK_AFTER:
            self._stuck_said = True
            logger.warning("broker %s accepts connections but its clients keep failing: %s",
                           self.bootstrap, self._last_detail)

    def on_log(self, level: int, fmt: str, *args: Any) -> None:
        """librdkafka's log callback: connection failures go to DEBUG (and are checked),
        everything else to the ``librdkafka`` logger as it came."""
        text = fmt % args if args else fmt
        if level >= logging.INFO and is_connection_failure(text):
            self.connection_failed(text)
            level = logging.DEBUG
        elif _SETTLING.search(text):
            level = logging.DEBUG
        _librdkafka.log(level, fmt, *args)

    def on_error(self, error: confluent_kafka.KafkaError) -> None:
        """librdkafka's error callback (``error_cb``): connection failures are checked; a fatal
        error is logged; the rest librdkafka has logged already, as it did before an error
        callback was set."""
        text = error.str()
        if error.code() in _CONNECTION_CODES and (error.code() == confluent_kafka.KafkaError._ALL_BROKERS_DOWN
                                                  or is_connection_failure(text)):
            self.connection_failed(text)
            _librdkafka.debug("%s: %s", error.name(), text)
        elif error.fatal():
            _librdkafka.error("fatal error %s: %s", error.name(), text)
        else:
            _librdkafka.debug("%s: %s", error.name(), text)


class _LogAdapter:
    """The object librdkafka's ``logger`` setting wants: anything with a ``log`` method."""

    def __init__(self, health: BrokerHealth) -> None:
        self.log = health.on_log


_trackers: dict[str, BrokerHealth] = {}
_trackers_lock = threading.Lock()


def broker_health(bootstrap: str) -> BrokerHealth:
    """The process's one tracker for ``bootstrap``: one warning per outage whatever the number
    of clients."""
    with _trackers_lock:
        health = _trackers.get(bootstrap)
        if health is None:
            health = _trackers[bootstrap] = BrokerHealth(bootstrap)
        return health


def client_hooks(bootstrap: str) -> dict[str, Any]:
    """The ``logger`` and ``error_cb`` settings that report a client's connections to its tracker."""
    health = broker_health(bootstrap)
    return {"logger": _LogAdapter(health), "error_cb": health.on_error}


def _forget_after_fork() -> None:
    # A forked child has no prober thread: a tracker copied mid-outage would wait forever.
    global _trackers_lock
    _trackers.clear()
    _trackers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
