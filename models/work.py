"""Expected work of a task run: the CPU time it needs, and from it the expected duration.

A task's wall-clock duration stretches with the load it runs under (on a busy node it gets a
share of a core), but the CPU time a CPU-bound task needs does not: it depends on the task and
the size of its input. So the expected duration band of a running task is its expected CPU
time divided by the share of a core it has been getting so far, and a run that has already
used far more CPU time than the task ever needs is an **overrun**: a task kept alive past its
work (a hog, a busy loop), caught while it runs and whatever the load.

Per task, ``log(cpu seconds)`` is fitted as a straight line in ``log(input pixels)`` (a
constant when the history has one image size), and the band is the line plus the P10 and P90
of the residuals. A task with fewer than :data:`MIN_RUNS` runs in the history has no
expectation: it is never called overrun.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from models.rows import RUN_KEY

MIN_RUNS = 5
MAX_PROGRESS = 1.5  # beyond what healthy runs reach: a run past its work looks like its end
PROGRESS_FILL = 0.5  # a task with no expectation: mid-way, as good a guess as any


@dataclass(frozen=True)
class TaskWork:
    """``log(cpu_s) = intercept + slope * log(pixels)``, residual P10/P50/P90."""

    intercept: float
    slope: float
    residuals: tuple[float, float, float]
    runs: int
    max_pixels: float = float("inf")  # the largest input the history had

    def cpu_seconds(self, pixels: float) -> tuple[float, float, float]:
        """P10, P50 and P90 of the CPU seconds a run on ``pixels`` needs. Beyond the largest
        input the history had, in proportion to the pixels (a per-pixel operation's work is
        at least linear in them; a slope fitted on a narrow range may say less)."""
        known = bool(pixels and pixels > 0)
        beyond = max(1.0, pixels / self.max_pixels) if known else 1.0
        at = min(pixels, self.max_pixels) if known else 0.0
        base = self.intercept + (self.slope * np.log(at) if known and self.slope else 0.0)
        return tuple(float(np.exp(base + r) * beyond) for r in self.residuals)  # type: ignore[return-value]


@dataclass(frozen=True)
class ExpectedWork:
    """The expected CPU time of every task seen in the history."""

    tasks: dict[str, TaskWork]

    @classmethod
    def fit(cls, rows: pd.DataFrame) -> "ExpectedWork":
        """Learn from model rows (:func:`models.features.model_rows`) of whole, successful runs:
        a run's CPU time is its last ``cpu_seconds``."""
        if rows.empty or not {"cpu_seconds", "ts_ms"} <= set(rows.columns):
            return cls({})  # rows without the runs' CPU time (generated data): no expectation
        runs = (rows.sort_values("ts_ms").groupby(RUN_KEY, sort=False)
                .agg(task=("task", "first"), pixels=("image_pixels", "first"), cpu_s=("cpu_seconds", "last")))
        runs = runs[runs["cpu_s"] > 0]
        found = {}
        for task, group in runs.groupby("task"):
            if len(group) < MIN_RUNS:
                continue
            y = np.log(group["cpu_s"].to_numpy(dtype=np.float64))
            x = np.log(pd.to_numeric(group["pixels"], errors="coerce").to_numpy(dtype=np.float64))
            known = np.isfinite(x)
            slope, intercept = 0.0, float(np.median(y))
            if known.sum() >= MIN_RUNS and np.ptp(x[known]) > 0.1:
                slope, intercept = (float(v) for v in np.polyfit(x[known], y[known], 1))
            fitted = intercept + slope * np.where(known, x, 0.0)
            residuals = np.quantile(y - fitted, [0.1, 0.5, 0.9])
            largest = float(np.nanmax(np.exp(x))) if known.any() else float("inf")
            found[str(task)] = TaskWork(intercept, slope, tuple(float(r) for r in residuals), len(group), largest)
        return cls(found)

    def band(self, task: str, pixels: float) -> tuple[float, float, float] | None:
        """P10, P50, P90 CPU seconds of a run of ``task`` on ``pixels``; None when unknown."""
        work = self.tasks.get(task)
        return None if work is None else work.cpu_seconds(pixels)

    def size_ratio(self, tasks, pixels) -> np.ndarray:
        """Per row, how many times larger the input is than the largest the task's history
        had (1 within the history's range or for a task without one)."""
        ratios = [max(1.0, float(px) / self.tasks[t].max_pixels) if t in self.tasks and px == px and px > 0 else 1.0
                  for t, px in zip(tasks, pixels)]
        return np.asarray(ratios, dtype=np.float64)

    def to_dict(self) -> dict:
        return {task: asdict(work) for task, work in self.tasks.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ExpectedWork":
        return cls({task: TaskWork(w["intercept"], w["slope"], tuple(w["residuals"]), w["runs"],
                                   w.get("max_pixels", float("inf")))
                    for task, w in data.items()})


def with_progress(frame: pd.DataFrame, work: ExpectedWork) -> pd.DataFrame:
    """``frame`` with ``progress``: the run's CPU time before the sample over the median CPU
    time its task needs on an image of its size, clipped to [0, MAX_PROGRESS]. How far through
    its work a task is, whatever the load: on a busy node the seconds stretch, this does not."""
    if "cpu_before" not in frame or frame.empty:
        return frame.assign(progress=PROGRESS_FILL)
    expected = np.array([_median(work, task, pixels) for task, pixels in zip(frame["task"], frame["image_pixels"])])
    before = pd.to_numeric(frame["cpu_before"], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        progress = np.clip(before / expected, 0.0, MAX_PROGRESS)
    return frame.assign(progress=np.where(np.isfinite(progress), progress, PROGRESS_FILL))


def _median(work: ExpectedWork, task: str, pixels: float) -> float:
    band = work.band(str(task), float(pixels) if pixels == pixels else 0.0)
    return band[1] if band else np.nan
