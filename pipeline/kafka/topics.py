"""Logical topic names (``task<ID>``, ``orchestrator``, ...) and the names on the broker.

The protocol and everything above the Kafka wrappers speak logical names; only the wrappers
put ``TOPIC_PREFIX`` in front of them (and take it off what the broker reports), so that
deployments with different prefixes share a broker without ever meeting each other's topics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pipeline.settings import Settings


class TopicNames:
    """Maps logical topic names to physical ones under one prefix, and back."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    @classmethod
    def of(cls, settings: Settings) -> "TopicNames":
        return cls(settings.topic_prefix)

    def physical(self, topic: str) -> str:
        """The name on the broker of the logical ``topic``."""
        return self.prefix + topic

    def physical_all(self, topics: Iterable[str]) -> list[str]:
        return [self.physical(t) for t in topics]

    def pattern(self, pattern: str) -> str:
        """A subscription (a topic name, or a ``^``-regex as librdkafka reads it) for the
        physical names: the escaped prefix goes right after the anchor, so the regex still
        matches the logical names only, and only under this prefix."""
        if pattern.startswith("^"):
            return "^" + _escaped(self.prefix) + pattern[1:]
        return self.physical(pattern)

    def owns(self, physical: str) -> bool:
        """Whether ``physical`` is under this prefix (every name is, with no prefix)."""
        return physical.startswith(self.prefix)

    def logical(self, physical: str) -> str:
        """The logical name of a topic under this prefix; a name outside it is a bug (the
        wrappers only ever read, assign and list topics under their prefix)."""
        if not self.owns(physical):
            raise ValueError(f"topic {physical!r} is not under TOPIC_PREFIX {self.prefix!r}")
        return physical[len(self.prefix):]

    def logical_all(self, physical: Iterable[str]) -> set[str]:
        """The logical names of those of ``physical`` under this prefix; the others dropped."""
        return {self.logical(t) for t in physical if self.owns(t)}


def _escaped(text: str) -> str:
    """``text`` as a regex matching itself, in Python's and librdkafka's (POSIX) dialects
    alike: only punctuation other than ``_`` and ``-`` is backslashed (``re.escape`` also
    backslashes ``-``, which POSIX leaves undefined outside brackets)."""
    return re.sub(r"[^A-Za-z0-9_-]", lambda m: "\\" + m.group(0), text)
