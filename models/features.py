"""Features of the expected-usage model and their encoding as tensors (no database here).

Model rows come from :func:`models.rows.model_rows`, the one path from samples to rows that
training and live scoring share.

A model row is one target resource of one tick: the task, the resource, seconds since the
task started, the task's position in its order, the task before it, the pixels of the image
it reads, the node's pressure, the length of the interval the sample covers (a closing
sample covers the end of the task, where its output is written) and the run's **progress**:
its CPU time so far over the CPU time its task needs (models.work.with_progress), the clock a
busy node does not stretch. Categories become indices into learned embeddings (index 0
is ``<unk>``, so a task the model never saw still scores); numbers are log-scaled where they
span orders of magnitude and standardised with training statistics.

The target is ``log1p(value)``, standardised per resource: usage spans orders of magnitude
(a few KiB/s to hundreds of MiB) and quantiles survive a monotone transform, so predicted
quantiles map back to original units with ``expm1`` (clipped at 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from models.rows import CONTEXT_RESOURCE, NO_PREVIOUS, previous_task  # noqa: F401 - part of this module's face

FEATURE_COLUMNS = ["task", "resource", "seconds", "position", "prev_task", "image_pixels",
                   "node_cpu_pressure", "interval_s", "cpu_before"]
CATEGORICAL = ("task", "resource", "prev_task")
NUMERIC = ("log_seconds", "position", "log_pixels", "node_cpu_pressure", "interval_s", "progress")
OPTIONAL = (CONTEXT_RESOURCE, "interval_s", "cpu_before")
"""Features a frame may lack: the node's pressure (a kernel without PSI: the training median
stands in), the sample's interval (a whole tick is assumed) and the run's CPU time so far
(progress is then taken as mid-way)."""
UNKNOWN = "<unk>"
_MIN_STD = 1e-6


@dataclass(frozen=True)
class EncodedBatch:
    """Model inputs as tensors: three index columns and the standardised numbers."""

    task: torch.Tensor
    resource: torch.Tensor
    prev_task: torch.Tensor
    numeric: torch.Tensor

    def to(self, device: torch.device | str) -> "EncodedBatch":
        return EncodedBatch(self.task.to(device), self.resource.to(device),
                            self.prev_task.to(device), self.numeric.to(device))

    def __len__(self) -> int:
        return int(self.task.shape[0])

    def take(self, index: torch.Tensor | slice) -> "EncodedBatch":
        """The rows at ``index`` (a slice or an index tensor)."""
        return EncodedBatch(self.task[index], self.resource[index], self.prev_task[index],
                            self.numeric[index])


@dataclass(frozen=True)
class Preprocessor:
    """Vocabularies and scaling learnt from the training split; saved with the model."""

    tasks: tuple[str, ...]
    resources: tuple[str, ...]
    prev_tasks: tuple[str, ...]
    numeric_mean: tuple[float, ...]
    numeric_std: tuple[float, ...]
    log_pixels_fill: float
    pressure_fill: float  # a node without PSI reports none: taken as the training median
    target_mean: tuple[float, ...]  # per resource index, log1p scale
    target_std: tuple[float, ...]

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> "Preprocessor":
        """Learn vocabularies and statistics from ``frame`` (FEATURE_COLUMNS and ``value``)."""
        resources = (UNKNOWN, *sorted(frame["resource"].astype(str).unique()))
        pixels = _log_pixels(frame["image_pixels"])
        fill = float(np.nanmedian(pixels)) if np.isfinite(pixels).any() else 0.0
        pressure = _pressure(frame)
        pressure_fill = float(np.nanmedian(pressure)) if np.isfinite(pressure).any() else 0.0
        numeric = _numeric(frame, fill, pressure_fill)
        target = np.log1p(frame["value"].to_numpy(dtype=np.float64).clip(min=0))
        by_resource = pd.Series(target).groupby(frame["resource"].astype(str).to_numpy())
        overall = (float(target.mean()), _std(target))
        means = [overall[0]] + [float(by_resource.get_group(r).mean()) for r in resources[1:]]
        stds = [overall[1]] + [_std(by_resource.get_group(r).to_numpy()) for r in resources[1:]]
        return cls(
            tasks=(UNKNOWN, *sorted(frame["task"].astype(str).unique())),
            resources=resources,
            prev_tasks=(UNKNOWN, *sorted(set(frame["prev_task"].astype(str)) | {NO_PREVIOUS})),
            numeric_mean=tuple(float(v) for v in numeric.mean(axis=0)),
            numeric_std=tuple(_std(column) for column in numeric.T),
            log_pixels_fill=fill,
            pressure_fill=pressure_fill,
            target_mean=tuple(means),
            target_std=tuple(stds),
        )

    def encode(self, frame: pd.DataFrame) -> EncodedBatch:
        """The model inputs for ``frame``; unknown categories map to ``<unk>``."""
        numeric = (_numeric(frame, self.log_pixels_fill, self.pressure_fill) - np.asarray(self.numeric_mean)) \
            / np.asarray(self.numeric_std)
        return EncodedBatch(
            task=_indices(frame["task"], self.tasks),
            resource=_indices(frame["resource"], self.resources),
            prev_task=_indices(frame["prev_task"], self.prev_tasks),
            numeric=torch.as_tensor(numeric, dtype=torch.float32),
        )

    def encode_target(self, values: np.ndarray, resource: torch.Tensor) -> torch.Tensor:
        """``log1p(value)``, standardised with the statistics of each row's resource."""
        mean, std = self._target_stats(resource)
        logged = torch.as_tensor(np.log1p(np.clip(values, 0, None)), dtype=torch.float32)
        return (logged - mean) / std

    def decode_target(self, standardised: torch.Tensor, resource: torch.Tensor) -> torch.Tensor:
        """Back to original units; ``standardised`` is (rows, quantiles)."""
        mean, std = self._target_stats(resource.to(standardised.device), standardised.device)
        logged = standardised * std.unsqueeze(1) + mean.unsqueeze(1)
        return torch.expm1(logged).clamp_min(0.0)

    def _target_stats(self, resource: torch.Tensor, device: torch.device | str = "cpu"):
        mean = torch.tensor(self.target_mean, dtype=torch.float32, device=device)[resource]
        std = torch.tensor(self.target_std, dtype=torch.float32, device=device)[resource]
        return mean, std

    def to_dict(self) -> dict:
        """JSON-ready form (see :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessor":
        missing = {f for f in cls.__dataclass_fields__} - set(data)
        if not missing and len(data["numeric_mean"]) != len(NUMERIC):
            missing = {f"{len(NUMERIC) - len(data['numeric_mean'])} numeric feature(s)"}
        if missing:
            raise ValueError(f"preprocessing saved by an older version (no {', '.join(sorted(missing))}); "
                             "train a new model with `python -m training fit`")
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in data.items()})


def _indices(column: pd.Series, vocabulary: tuple[str, ...]) -> torch.Tensor:
    lookup = {name: i for i, name in enumerate(vocabulary)}
    codes = [lookup.get(name, 0) for name in column.astype(str).tolist()]
    return torch.as_tensor(codes, dtype=torch.long)


def _log_pixels(column: pd.Series) -> np.ndarray:
    pixels = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pixels > 0, np.log(pixels), np.nan)


def _pressure(frame: pd.DataFrame) -> np.ndarray:
    if CONTEXT_RESOURCE not in frame:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[CONTEXT_RESOURCE], errors="coerce").to_numpy(dtype=np.float64) / 100.0


def _numeric(frame: pd.DataFrame, log_pixels_fill: float, pressure_fill: float) -> np.ndarray:
    seconds = pd.to_numeric(frame["seconds"], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
    position = pd.to_numeric(frame["position"], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
    pixels = _log_pixels(frame["image_pixels"])
    pixels = np.where(np.isfinite(pixels), pixels, log_pixels_fill)
    pressure = _pressure(frame)
    pressure = np.where(np.isfinite(pressure), pressure, pressure_fill)
    interval = np.ones(len(frame))
    if "interval_s" in frame:
        interval = pd.to_numeric(frame["interval_s"], errors="coerce").fillna(1.0).to_numpy(dtype=np.float64)
    progress = np.full(len(frame), 0.5)
    if "progress" in frame:
        progress = pd.to_numeric(frame["progress"], errors="coerce").fillna(0.5).to_numpy(dtype=np.float64)
    return np.column_stack([np.log1p(seconds.clip(min=0)), position, pixels, pressure, interval.clip(0.0, 2.0),
                            progress])


def _std(values: np.ndarray) -> float:
    std = float(np.std(values)) if len(values) > 1 else 1.0
    return std if math.isfinite(std) and std > _MIN_STD else 1.0
