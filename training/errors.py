"""The errors of training: a subtree of :class:`~pipeline.errors.PipelineError`."""

from __future__ import annotations

from pipeline.errors import PipelineError


class TrainingError(PipelineError):
    """A fit cannot go on (bad option, unusable device, MLflow refused an operation)."""

    exit_code = 2


class InsufficientDataError(TrainingError):
    """Too few stored orders with measurements to train, validate and test a model."""
