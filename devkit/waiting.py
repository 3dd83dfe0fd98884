"""Waiting for events, not for time: what tests (and benchmarks) poll until their scenario's
event has happened, with an overall timeout that only a hang reaches.

A test that sleeps and then acts guesses how long something takes: on a busy machine the
guess is wrong and the test fails, or, worse, passes without its scenario having happened
(nothing committed yet before a kill, an outage over before anyone noticed it). These helpers
wait for the event itself: a condition (:func:`wait_for`), a line a process prints
(:class:`Output`), a consumer group's committed offset (:func:`committed_offset`), a topic
read to its end (:func:`read_to_end`).
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, TypeVar

T = TypeVar("T")

# Far beyond anything a healthy run takes on a loaded machine: reaching it means a hang.
PATIENCE = 120.0


def wait_for(probe: Callable[[], T], what: str | Callable[[], str], timeout: float = PATIENCE,
             every: float = 0.05) -> T:
    """Poll ``probe`` every ``every`` seconds until it returns a truthy value, and return that
    value; AssertionError saying ``what`` (or what ``what()`` says then) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not within {timeout:g}s")
        time.sleep(every)


class Output:
    """Collects what a process writes to its stdout and stderr pipes (text mode), line by line,
    as it writes it, so that a test can wait for a line and still get everything at the end.

    Use it instead of ``communicate()``: ``Output(process)``, then :meth:`wait_for_line` as
    often as the scenario needs, then :meth:`finish` for the exit status and the whole output.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self._lock = threading.Lock()
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                         for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
                         if stream is not None]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self._lines[name].append(line)

    @property
    def stdout(self) -> str:
        with self._lock:
            return "".join(self._lines["stdout"])

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._lines["stderr"])

    def text(self) -> str:
        """Both streams so far, stdout first (for assertion messages)."""
        return self.stdout + self.stderr

    def count(self, fragment: str) -> int:
        """How many lines so far, on either stream, contain ``fragment``."""
        with self._lock:
            return sum(fragment in line for lines in self._lines.values() for line in lines)

    def wait_for_line(self, fragment: str, count: int = 1, timeout: float = PATIENCE) -> None:
        """Until ``count`` lines containing ``fragment`` have been written; AssertionError (with
        the output so far) when the process ends first or after ``timeout``."""
        def seen() -> bool:
            if self.count(fragment) >= count:
                return True
            if self.process.poll() is not None:
                for reader in self._readers:
                    reader.join(10)
                if self.count(fragment) >= count:
                    return True
                raise AssertionError(f"the process exited ({self.process.returncode}) without writing "
                                     f"{fragment!r}:\n{self.text()[-3000:]}")
            return False

        wait_for(seen, lambda: f"no line with {fragment!r}:\n{self.text()[-3000:]}", timeout)

    def finish(self, timeout: float = PATIENCE * 2) -> tuple[int, str, str]:
        """The exit status, stdout and stderr once the process has ended (killed after
        ``timeout``, then AssertionError)."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"still running after {timeout:g}s:\n{self.text()[-3000:]}") from None
        for reader in self._readers:
            reader.join(30)
        return code, self.stdout, self.stderr


def committed_offset(settings, group: str, topic: str, partition: int = 0) -> int:
    """The offset ``group`` has committed on ``topic`` (a logical name), -1 when none: how many
    of the partition's messages the group has recorded as processed."""
    import confluent_kafka

    from pipeline.kafka.config import client_config
    from pipeline.kafka.topics import TopicNames

    client = confluent_kafka.Consumer(client_config(settings, **{"group.id": group, "enable.auto.commit": False}))
    try:
        wanted = confluent_kafka.TopicPartition(TopicNames.of(settings).physical(topic), partition)
        [found] = client.committed([wanted], timeout=30)
        return found.offset if found.offset >= 0 else -1
    finally:
        client.close()


def end_offsets(settings, topic: str, partition: int = 0) -> tuple[int, int]:
    """(first, next) offsets of ``topic`` (a logical name) now: its messages are first..next-1."""
    import confluent_kafka

    from pipeline.kafka.config import client_config
    from pipeline.kafka.topics import TopicNames

    client = confluent_kafka.Consumer(client_config(settings, **{
        "group.id": f"reader-{uuid.uuid4().hex[:12]}", "enable.auto.commit": False}))
    try:
        wanted = confluent_kafka.TopicPartition(TopicNames.of(settings).physical(topic), partition)
        return client.get_watermark_offsets(wanted, timeout=30)
    finally:
        client.close()


def read_to_end(settings, topic: str, timeout: float = PATIENCE) -> list:
    """Every message on ``topic`` (a logical name, one partition) from its start up to its end
    as it is now, as :class:`pipeline.protocol.Message`: all of them however slowly the broker
    delivers, where waiting for a quiet spell would stop early on a slow broker."""
    from pipeline.kafka import Consumer

    first, end = end_offsets(settings, topic)
    messages: list = []
    if end <= first:
        return messages
    with Consumer(settings) as consumer:
        consumer.assign([topic])
        deadline = time.monotonic() + timeout
        while not messages or messages[-1].offset + 1 < end:
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: {len(messages)} of its messages up to offset {end} "
                                     f"read in {timeout:g}s")
            message = consumer.poll(0.5)
            if message is not None:
                messages.append(message)
    return messages
