"""Features of the expected-usage model and their encoding as tensors (no database here).

Model rows come from :func:`models.rows.model_rows`, the one path from samples to rows that
training and live scoring share.

A model row is one target resource of one tick: the task, the resource, the task's position
in its order, the task before it, the pixels of the image it reads, the node's pressure, the
length of the interval the sample covers (a closing sample covers the end of the task, where
its output is written) and the run's **progress**: its CPU time so far over the CPU time its
work needs (models.work.with_progress), the clock a busy node does not stretch. Time since the
start is not an input: beyond the history's durations a network extrapolates it freely.
Categories become indices into learned embeddings (index 0 is ``<unk>``, so a task the model
never saw still scores); numbers are log-scaled where they span orders of magnitude and
standardised with training statistics; the pixels are clamped to the history's range.

**The network learns the residual on top of the work model** (models/work.py). What grows with
the work is divided by what the run's work is expected to need before the network sees it
(:func:`usage_scale`): a memory sample by the run's expected peak, a storage rate by the run's
expected bytes over the sample's interval (the share of the run's writes in this tick). So a
2x larger image or a heavier setting moves the band where the work model puts it, once; the
network only says how the usage is spread over the run. CPU percentages are not divided: a
single-threaded task uses one core whatever the image.

The target is ``log1p(value / scale)``, standardised per resource: quantiles survive a
monotone transform, so predicted quantiles map back to original units with ``expm1`` (clipped
at 0) times the scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from models.rows import CONTEXT_RESOURCE, NO_PREVIOUS, previous_task  # noqa: F401 - part of this module's face
from models.runs import NOISE_FLOOR

FEATURE_COLUMNS = ["task", "resource", "seconds", "position", "prev_task", "image_pixels", "image_channels",
                   "image_bytes", "params", "node_cpu_pressure", "interval_s", "cpu_before"]
CATEGORICAL = ("task", "resource", "prev_task")
NUMERIC = ("position", "log_pixels", "node_cpu_pressure", "interval_s", "progress")
OPTIONAL = (CONTEXT_RESOURCE, "interval_s", "cpu_before", "params", "image_channels", "image_bytes")
"""Features a frame may lack: the node's pressure (a kernel without PSI: the training median
stands in), the sample's interval (a whole tick is assumed), the run's CPU time so far
(progress is then taken as mid-way), the task's parameters and the input's channels and file
size (the history's typical ones)."""
SCALED = {"memory": "peak_memory", "disk_read": "bytes_read", "disk_write": "bytes_written"}
"""Resources divided by the run's expected total before the network sees them (:func:`usage_scale`)."""
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
    log_pixels_range: tuple[float, float]  # the history's smallest and largest: beyond, clamped
    pressure_fill: float  # a node without PSI reports none: taken as the training median
    scale_fill: tuple[float, ...]  # per resource index: the usage scale of a run without expectation
    target_mean: tuple[float, ...]  # per resource index, log1p scale
    target_std: tuple[float, ...]

    @classmethod
    def fit(cls, frame: pd.DataFrame, scale: np.ndarray | None = None) -> "Preprocessor":
        """Learn vocabularies and statistics from ``frame`` (FEATURE_COLUMNS and ``value``),
        whose values :func:`usage_scale` divides by ``scale`` (1 when not given)."""
        scale = np.ones(len(frame)) if scale is None else scale
        resources = (UNKNOWN, *sorted(frame["resource"].astype(str).unique()))
        pixels = _log_pixels(frame["image_pixels"])
        known = np.isfinite(pixels)
        fill = float(np.nanmedian(pixels)) if known.any() else 0.0
        span = (float(pixels[known].min()), float(pixels[known].max())) if known.any() else (fill, fill)
        pressure = _pressure(frame)
        pressure_fill = float(np.nanmedian(pressure)) if np.isfinite(pressure).any() else 0.0
        numeric = _numeric(frame, fill, pressure_fill, span)
        target = np.log1p((frame["value"].to_numpy(dtype=np.float64) / scale).clip(min=0))
        named = frame["resource"].astype(str).to_numpy()
        scale_fill = [1.0] + [float(np.median(scale[named == r])) for r in resources[1:]]
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
            log_pixels_range=span,
            pressure_fill=pressure_fill,
            scale_fill=tuple(scale_fill),
            target_mean=tuple(means),
            target_std=tuple(stds),
        )

    def encode(self, frame: pd.DataFrame) -> EncodedBatch:
        """The model inputs for ``frame``; unknown categories map to ``<unk>``."""
        numeric = (_numeric(frame, self.log_pixels_fill, self.pressure_fill, self.log_pixels_range)
                   - np.asarray(self.numeric_mean)) \
            / np.asarray(self.numeric_std)
        return EncodedBatch(
            task=_indices(frame["task"], self.tasks),
            resource=_indices(frame["resource"], self.resources),
            prev_task=_indices(frame["prev_task"], self.prev_tasks),
            numeric=torch.as_tensor(numeric, dtype=torch.float32),
        )

    def typical_scale(self) -> dict[str, float]:
        """Per resource, the usage scale of a run the work model has no expectation for."""
        return dict(zip(self.resources, self.scale_fill))

    def encode_target(self, values: np.ndarray, resource: torch.Tensor) -> torch.Tensor:
        """``log1p(value)`` (values already divided by their :func:`usage_scale`),
        standardised with the statistics of each row's resource."""
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
            missing = {f"the {len(NUMERIC)} numeric features of this version"}
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


def _numeric(frame: pd.DataFrame, log_pixels_fill: float, pressure_fill: float,
             log_pixels_range: tuple[float, float]) -> np.ndarray:
    position = pd.to_numeric(frame["position"], errors="coerce").fillna(0).to_numpy(dtype=np.float64)
    pixels = _log_pixels(frame["image_pixels"])
    pixels = np.clip(np.where(np.isfinite(pixels), pixels, log_pixels_fill), *log_pixels_range)
    pressure = _pressure(frame)
    pressure = np.where(np.isfinite(pressure), pressure, pressure_fill)
    interval = np.ones(len(frame))
    if "interval_s" in frame:
        interval = pd.to_numeric(frame["interval_s"], errors="coerce").fillna(1.0).to_numpy(dtype=np.float64)
    progress = np.full(len(frame), 0.5)
    if "progress" in frame:
        progress = pd.to_numeric(frame["progress"], errors="coerce").fillna(0.5).to_numpy(dtype=np.float64)
    return np.column_stack([position, pixels, pressure, interval.clip(0.0, 2.0), progress])


def usage_scale(frame: pd.DataFrame, work, fill: Mapping[str, float] | None = None) -> np.ndarray:
    """Per row, what its value is divided by before the network sees it: for :data:`SCALED`
    resources the run's expected total (models.work.ExpectedWork ``work``, at its median; a
    storage rate's total over the row's interval), else 1. A run the work model has no
    expectation for (a task it never saw, an unknown input size) takes ``fill[resource]``,
    the history's typical scale."""
    scale = np.ones(len(frame))
    resource = frame["resource"].astype(str).to_numpy()
    for name, total in SCALED.items():
        rows = resource == name
        if not rows.any():
            continue
        expected = work.medians(frame[rows], total) + NOISE_FLOOR[total]
        if name != "memory":
            interval = pd.to_numeric(frame["interval_s"], errors="coerce").to_numpy(dtype=np.float64)[rows] \
                if "interval_s" in frame else np.ones(rows.sum())
            expected = expected / np.clip(np.nan_to_num(interval, nan=1.0), 0.001, None)
        typical = (fill or {}).get(name, 1.0)
        scale[rows] = np.where(np.isfinite(expected) & (expected > 0), expected, typical)
    return scale


def _std(values: np.ndarray) -> float:
    std = float(np.std(values)) if len(values) > 1 else 1.0
    return std if math.isfinite(std) and std > _MIN_STD else 1.0
