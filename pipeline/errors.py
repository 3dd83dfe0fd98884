"""The project's one exception tree.

Every error a user can cause or meet derives from :class:`PipelineError`; entry points turn
it into one clear line and an exit status instead of a traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1


class SettingsError(PipelineError):
    """An environment variable holds a value the pipeline cannot use."""

    exit_code = 2


class ProtocolError(PipelineError):
    """A Kafka message does not follow the protocol (docs/protocol.md)."""


class KafkaClientError(PipelineError):
    """The broker refused or failed an operation (produce, consume, admin)."""


class DatabaseError(PipelineError):
    """The database refused or failed an operation."""


class InfraError(PipelineError):
    """Local infrastructure (broker, PostgreSQL) could not be started, stopped or found."""


class ClusterError(PipelineError):
    """The Kubernetes API server is unreachable, refused a request or is missing something."""

    exit_code = 2
