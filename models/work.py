"""Expected work of a task run: its totals given the pixels it reads and its parameters.

Image work is a per-pixel operation done on an image of some size with some settings, so a
run's CPU time, peak memory and bytes written (:mod:`models.runs`) follow from the pixels and
the parameters. Per task and total, with ``x = log(pixels)`` and ``z`` the parameters as
numbers (:func:`param_features`)::

    total = base + exp(b0 + b1 * x + c . z + d * pressure)

a fixed part (the interpreter, the libraries, the encoder's headers) and a part that grows
with the work: a power of the pixels (``b1`` is held near 1, what a per-pixel operation does,
unless the history's sizes say it grows faster, and never below 1: :data:`MIN_SLOPE`) times a power of each parameter
that varied in the history or whose power the task's catalog entry declares
(``services.runtime.spec.Param.work``: ``median``'s window ``size`` 1.8, ``upscale``'s
``iterations`` 0.85; the CPU time's coefficient is held near it, so a setting no run had moves
the band as the work does, and the history corrects it where the parameter varied), of the
input's channels (``x`` counts a channel as a full share of the work; a grey image held by PIL
in one byte per pixel against a colour one's four, or an operation that converts to colour
first, is not: where the history had both, the fit says by how much), of the
input's detail (its file's bytes per value) and, once the run has ended, of its output's (how
many bytes the result encoded to: the encoder's time and the bytes written follow the content,
which no size says). The node's CPU pressure over the run (``d``) takes up what a busy machine
adds to the CPU time of the same work (cache and scheduling). A covariate not known yet (the
output while the task runs) takes its history's median. It is fitted on ``log(total + floor)`` (the floors of
:data:`models.runs.NOISE_FLOOR`), with the residuals' P10/P50/P90 and their spread: a 2x
larger image or a heavier setting moves the whole band, through one formula applied once,
with no clamping to the history's range.

What this module does not guess: a task with fewer than :data:`MIN_RUNS` runs, or a run whose
input size is unknown, has no expectation (None): it is said, never turned into an overrun.
The expected CPU time also gives a running task its **progress** (:func:`with_progress`):
its CPU time so far over what its work needs, the clock a busy node does not stretch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from models.runs import CPU_TOTALS, NOISE_FLOOR, TOTALS, run_totals

logger = logging.getLogger(__name__)

MIN_RUNS = 5
HELDOUT_RUNS = 20  # held-out runs of a total before their quantiles set its band's edges
MAX_PROGRESS = 1.5  # beyond what healthy runs reach: a run past its work looks like its end
PROGRESS_FILL = 0.5  # a task with no expectation: mid-way, as good a guess as any
PRESSURE = "@pressure"  # the covariate name of the node's CPU pressure (a fraction of 1)
DETAIL = "@detail"  # ... of the input's detail: log(file bytes per value)
OUTPUT_DETAIL = "@output"  # ... of the output's: log(its bytes per input value), known at a run's end
CHANNELS = "@channels"  # ... of the input's channels, log(channels): how far a channel is not a full share of the work
BY_OUTPUT = "bytes_written@output"  # the name of a task's fit of its writes against its output's size
# How strongly the fit holds b1 near 1 and the other coefficients near 0, as residuals in the
# units of log(total): a slope of 1.25 costs as much as one run 0.05 off its fit.
SLOPE_PRIOR = 0.2
MIN_SLOPE = 1.0
"""The least power of the pixels the part that grows with the work may have: an image
operation touches every value at least once, so its growing part is at least in proportion
to them, and whatever does not grow is the fixed ``base``. Left free (down to 0), the fit
found powers of 0.3-0.8 on small inputs, where the fixed part dominates, and extrapolated
them: ``sepia`` on 3.8 million pixels, 8x its history's largest, was expected at a third of
its 2.3 CPU-s, a healthy run judged a regression 8-10 spreads out (issue 25, seed-2
evaluation); at least 1, the runs so far beyond scored at most 6.5 spreads, and those within
the history's sizes at most 4.4 instead of 6.2."""
COEF_PRIOR = 0.05
OUTPUT_SLOPE_PRIOR = 20.0  # writes against the output's bytes: the slope is 1
PARAM_OFFSET = 0.01
MIN_SPREAD = {"cpu_seconds": 0.05, "operation_seconds": 0.03, "peak_memory": 0.02, "bytes_read": 0.02,
              "bytes_written": 0.02}
"""The least spread of a total (log units, a standard deviation): what the same work varies by
from run to run whatever the history says. A history of a few identical runs can fall within
2 % of each other by chance, but the CPU time of one median filter, run 40 times over in one
process on this 2-vCPU node, has had a spread of 0.02 to 0.06 from one try to the next, its
slowest run 1.07x to 1.21x the median, quiet or with the other vCPU busy
(bench/cpu_time_noise.py); CI saw healthy runs 1.13x and 1.20x their history's median. Memory and bytes follow the data, not the machine."""


SLOPE_DOUBT = 0.05
"""How far a task's total may depart from its fitted power of the pixels beyond the inputs its
history had, in log units per e-fold (x2.7) of pixels past the largest (or below the
smallest): a per-pixel operation is linear in its pixels, but caches, the allocator's arenas
and mmap threshold and fixed-size buffers are not, so ten times the largest input is a guess
ten times as uncertain as twice it. Set after the issue-25 evaluation found healthy runs of
``sepia`` and ``equalize`` on inputs 8x their history's largest at 0.11 and 0.19 above the
fit, 0.05 and 0.09 per e-fold, where the residuals' spread (0.02) called them regressions."""

POWER_DOUBT = 0.5
"""How far a task's total may depart from its fitted (or declared) power of a parameter beyond
the values its history had, in log units per e-fold of the parameter past them. A declared
power is the author's measurement on one input (bench/param_work.py) and the fit's is the
history's: neither holds far outside, where the work's structure (a window that stops fitting
the caches, a pass that starts to converge) takes over. The issue-25 evaluation (seed 6) ran
``denoise`` with search 4 after a history of 2 and 3: its healthy runs took 1.56x the CPU time
the fit (power 1.1-1.6) expected, 0.44 log units over 0.29 e-folds."""


def param_features(params: str | dict | None) -> dict[str, float]:
    """A run's task parameters as numbers: a number ``v >= 0`` as ``log(v + 0.01)`` (work grows
    as a power of a count or a size: 6 passes are 3 times 2, whatever 2 and 6 are; the 0.01
    only keeps 0 finite), a negative one as ``-log(|v| + 0.01)``, a boolean as 0 or 1; strings
    and nulls are left out (a choice among names has no magnitude to extrapolate)."""
    if isinstance(params, str):
        try:
            params = json.loads(params or "{}")
        except ValueError:
            return {}
    found = {}
    for name, value in (params or {}).items():
        if isinstance(value, bool):
            found[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            found[name] = math.log(value + PARAM_OFFSET) if value >= 0 else -math.log(PARAM_OFFSET - value)
    return found


@dataclass(frozen=True)
class InputSize:
    """What a run's work scales with, known when it starts: the pixels and channels of the
    image it reads (their product: the values a per-channel operation touches) and its file's
    size (how much detail it holds). NaN where not known; without pixels nothing is expected."""

    pixels: float
    channels: float = math.nan
    file_bytes: float = math.nan
    output_bytes: float = math.nan  # the output the run wrote: known at its end only

    @property
    def known(self) -> bool:
        return _known(self.pixels)

    @classmethod
    def of(cls, row) -> "InputSize":
        """From a row with ``image_pixels`` (and optionally ``image_channels``, ``image_bytes``)."""
        get = row.get if hasattr(row, "get") else lambda name, default=math.nan: getattr(row, name, default)
        return cls(_float(get("image_pixels", math.nan)), _float(get("image_channels", math.nan)),
                   _float(get("image_bytes", math.nan)), _float(get("output_bytes", math.nan)))


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _size(size) -> InputSize:
    return size if isinstance(size, InputSize) else InputSize(_float(size))


@dataclass(frozen=True)
class TotalFit:
    """One task's one total: ``log(total + floor) ~ log(base + exp(b0 + b1 x + c.z) + floor)``
    plus residual quantiles; ``x`` the log of the input's values (pixels x channels).
    ``covariates`` name the entries of ``coef`` after b0 and b1."""

    total: str
    base: float
    coef: tuple[float, ...]
    covariates: tuple[str, ...]
    fill: tuple[float, ...]  # a covariate's value when a run does not say (training median)
    residuals: tuple[float, float, float]  # P10, P50, P90 in log units
    spread: float  # (P90 - P10) / 2.563: the residuals' standard deviation if normal
    runs: int
    pixels: tuple[float, float]  # the smallest and largest input the history had
    channels: float = 3.0  # an input's channels when a run does not say (training median)
    size_by: str = "values"  # what x is the log of: the input's "values", or the run's "output" bytes
    heldout: tuple[float, float] | None = None  # the band's edges in spreads, from runs the fit never saw
    # per covariate, the smallest and largest value the history had (parameters only; None
    # for the others): a setting beyond them is a guess, as a size beyond the history's is
    ranges: tuple[tuple[float, float] | None, ...] = ()

    @property
    def floor(self) -> float:
        return NOISE_FLOOR[self.total]

    def _log_grown(self, size: InputSize, features: dict[str, float], pressure: float) -> float:
        if self.size_by == "output":
            return self.coef[0] + self.coef[1] * math.log(max(size.output_bytes, 1.0))
        values = dict(features)
        channels = size.channels if _known(size.channels) else self.channels
        if math.isfinite(pressure):
            values[PRESSURE] = pressure / 100.0
        values[CHANNELS] = math.log(channels)
        if _known(size.file_bytes):
            values[DETAIL] = math.log(size.file_bytes / (size.pixels * channels))
        if _known(size.output_bytes):
            values[OUTPUT_DETAIL] = math.log(size.output_bytes / (size.pixels * channels))
        z = np.array([values.get(name, fill) for name, fill in zip(self.covariates, self.fill)])
        return min(self.coef[0] + self.coef[1] * math.log(size.pixels * channels)
                   + float(z @ np.asarray(self.coef[2:])), 700.0)

    def log_median(self, size: InputSize | float, features: dict[str, float], pressure: float = math.nan) -> float:
        """``log(total + floor)`` at the residuals' median."""
        size = _size(size)
        return math.log(self.base + math.exp(self._log_grown(size, features, pressure)) + self.floor) + self.residuals[1]

    def beyond(self, size: InputSize | float) -> float:
        """How far the input lies outside the pixels the history had: ``log`` of the ratio to
        the nearer end (0 inside, and for a fit by the output's size, which is exact)."""
        size = _size(size)
        if self.size_by == "output" or not size.known:
            return 0.0
        low, high = self.pixels
        return max(0.0, math.log(size.pixels / high), math.log(low / size.pixels))

    def beyond_settings(self, features: dict[str, float] | None) -> float:
        """How far ``features`` (:func:`param_features`) lie outside the values the history
        had, in log units (the root of the squares over the parameters; 0 inside)."""
        if not features or not self.ranges:
            return 0.0
        squares = 0.0
        for name, known in zip(self.covariates, self.ranges):
            value = features.get(name)
            if known is not None and value is not None and math.isfinite(value):
                squares += max(0.0, value - known[1], known[0] - value) ** 2
        return math.sqrt(squares)

    def spread_at(self, log_median: float, size: InputSize | float | None = None,
                  features: dict[str, float] | None = None) -> float:
        """The spread of ``log(total + floor)`` around ``log_median``: the residuals', at
        least what one floor's worth of difference is there (near 0, a total's own noise is
        the floor, not a share of the total); for an input of ``size`` beyond the history's
        the doubt about the power it grows by (:data:`SLOPE_DOUBT`), and for settings beyond
        the history's the doubt about their powers (:data:`POWER_DOUBT`), added in quadrature."""
        own = max(self.spread, math.log1p(self.floor / math.exp(log_median)))
        size_doubt = 0.0 if size is None else SLOPE_DOUBT * self.beyond(size)
        return math.sqrt(own ** 2 + size_doubt ** 2 + (POWER_DOUBT * self.beyond_settings(features)) ** 2)

    def band(self, size: InputSize | float, features: dict[str, float], pressure: float = math.nan) -> tuple[float, float, float]:
        """P10, P50 and P90 of the total, in its units. Where ``fit`` gave the fit
        :attr:`heldout` quantiles, the edges lie that many spreads (:meth:`spread_at`) from
        the median: a fit's own residuals are narrower than the runs it never saw, a larger
        image or a new setting among them (conformal). Otherwise the residuals' quantiles,
        widened by the doubt about the power at ``size`` beyond the history's inputs."""
        log_median = self.log_median(size, features, pressure)
        centre = log_median - self.residuals[1]
        p10, p50, p90 = self.residuals
        if self.heldout is not None:
            spread = self.spread_at(log_median, size, features)
            quantiles = (min(p50 + spread * self.heldout[0], p50), p50, max(p50 + spread * self.heldout[1], p50))
        else:
            half = 1.2816 * math.hypot(self.spread, SLOPE_DOUBT * self.beyond(size))
            quantiles = (min(p10, p50 - half), p50, max(p90, p50 + half))
        return tuple(max(math.exp(centre + r) - self.floor, 0.0) for r in quantiles)  # type: ignore[return-value]

    @classmethod
    def fit_by_output(cls, runs: pd.DataFrame) -> "TotalFit | None":
        """``bytes_written`` against the size of the output the run wrote (a run writes its
        output once, and a little besides): exact whatever the image's content, which the
        input alone cannot say (a smoothed image encodes to a third of a noisy one's bytes)."""
        written = _column(runs, "bytes_written")
        output = _column(runs, "output_bytes")
        usable = np.isfinite(written) & (written >= 0) & np.isfinite(output) & (output > 0)
        if usable.sum() < MIN_RUNS:
            return None
        floor = NOISE_FLOOR["bytes_written"]
        x, y = np.log(output[usable]), np.log(written[usable] + floor)
        # a byte of output is a byte written: the slope is held at 1 (the history's outputs are
        # smaller than a 2x image's, and a slope a little under 1 would call its writes a fault)
        theta = _fit(y, x, np.empty((len(y), 0)), floor, float(written[usable].max()), slope_prior=OUTPUT_SLOPE_PRIOR)
        base, coef = math.exp(theta[0]), tuple(float(v) for v in theta[1:])
        residuals = y - np.log(base + np.exp(np.minimum(coef[0] + coef[1] * x, 700.0)) + floor)
        quantiles, spread = _residual_band(residuals, "bytes_written")
        pixels = _column(runs, "image_pixels")[usable]
        return cls("bytes_written", base, coef, (), (), quantiles, spread,
                   int(usable.sum()), (float(np.nanmin(pixels)), float(np.nanmax(pixels))), 3.0, "output")

    @classmethod
    def fit(cls, total: str, runs: pd.DataFrame, powers: dict[str, float] | None = None) -> "TotalFit | None":
        """Fit on ``runs`` (:func:`models.runs.run_totals` rows of one task); None with too few.
        ``powers``: the task's declared powers of its CPU work in its parameters
        (services.runtime.spec.Param.work), the CPU time's coefficients' prior centres."""
        values = _column(runs, total)  # absent: runs from before it was measured
        pixels = pd.to_numeric(runs["image_pixels"], errors="coerce").to_numpy(dtype=np.float64)
        usable = np.isfinite(values) & (values >= 0) & np.isfinite(pixels) & (pixels > 0)
        if usable.sum() < MIN_RUNS:
            return None
        runs, values, pixels = runs[usable], values[usable], pixels[usable]
        channels = _column(runs, "image_channels")
        channel_fill = float(np.nanmedian(channels)) if np.isfinite(channels).any() else 3.0
        channels = np.where(np.isfinite(channels) & (channels > 0), channels, channel_fill)
        x = np.log(pixels * channels)
        file_bytes, output_bytes = _column(runs, "image_bytes"), _column(runs, "output_bytes")
        with np.errstate(divide="ignore", invalid="ignore"):
            detail = np.where(np.isfinite(file_bytes) & (file_bytes > 0), np.log(file_bytes / (pixels * channels)), np.nan)
            output = np.where(np.isfinite(output_bytes) & (output_bytes > 0),
                              np.log(output_bytes / (pixels * channels)), np.nan)
        floor = NOISE_FLOOR[total]
        y = np.log(values + floor)
        features = [param_features(p) for p in runs["params"]]
        names = sorted({name for f in features for name in f})
        declared = dict(powers or {}) if total in CPU_TOTALS else {}
        columns, kept, fills, centres, ranges = [], [], [], [], []
        for name in names:
            column = np.array([f.get(name, np.nan) for f in features])
            fill = float(np.nanmedian(column)) if np.isfinite(column).any() else 0.0
            column = np.where(np.isfinite(column), column, fill)
            # a parameter the history never varied teaches nothing, unless its power is declared
            if np.ptp(column) > 1e-9 or name in declared:
                columns.append(column)
                kept.append(name)
                fills.append(fill)
                centres.append(declared.get(name, 0.0))
                ranges.append((float(column.min()), float(column.max())))
        pressure = pd.to_numeric(runs["pressure"], errors="coerce").to_numpy(dtype=np.float64) / 100.0
        covariates = ((PRESSURE, pressure, 0.02), (CHANNELS, np.log(channels), 0.05), (DETAIL, detail, 0.05),
                      (OUTPUT_DETAIL, output, 0.05))
        for name, column, least in covariates:
            if np.isfinite(column).sum() >= MIN_RUNS and np.nanstd(column) > least:
                fill = float(np.nanmedian(column))
                columns.append(np.where(np.isfinite(column), column, fill))
                kept.append(name)
                fills.append(fill)
                centres.append(0.0)
                ranges.append(None)
        # a busier node adds to the CPU time of the same work (caches, a shared core), never takes
        # from it: a history that ran a task mostly on a quiet node must not learn the opposite
        least = [0.0 if name == PRESSURE and total in CPU_TOTALS else -4.0 for name in kept]
        z = np.column_stack(columns) if columns else np.empty((len(y), 0))
        theta = _fit(y, x, z, floor, float(values.max()), centres=np.asarray(centres), least=least)
        base, coef = math.exp(theta[0]), tuple(float(v) for v in theta[1:])
        grown = np.exp(np.minimum(coef[0] + coef[1] * x + z @ np.asarray(coef[2:]), 700.0))
        residuals = y - np.log(base + grown + floor)
        quantiles, spread = _residual_band(residuals, total)
        return cls(total, base, coef, tuple(kept), tuple(fills), quantiles, spread, int(len(y)),
                   (float(pixels.min()), float(pixels.max())), channel_fill, ranges=tuple(ranges))


def _residual_band(residuals: np.ndarray, total: str) -> tuple[tuple[float, float, float], float]:
    """The residuals' P10, P50, P90 and spread ((P90 - P10) / 2.563, at least the total's
    :data:`MIN_SPREAD`); the P10-P90 band is at least as wide as the spread says."""
    p10, p50, p90 = (float(v) for v in np.quantile(residuals, [0.1, 0.5, 0.9]))
    spread = max((p90 - p10) / 2.563, MIN_SPREAD[total])
    half = 1.2816 * spread
    return (min(p10, p50 - half), p50, max(p90, p50 + half)), spread


def _fit(y: np.ndarray, x: np.ndarray, z: np.ndarray, floor: float, largest: float,
         slope_prior: float = SLOPE_PRIOR, centres: np.ndarray | None = None,
         least: list[float] | None = None) -> np.ndarray:
    """theta = (log base, b0, b1, c...) by robust least squares on the log scale, with the
    priors of the module docstring (``c`` held near ``centres``, default 0, and at least
    ``least``, default -4); the better of two starts (mostly fixed, mostly grown)."""
    k = z.shape[1]
    centres = np.zeros(k) if centres is None else centres

    def residuals(theta: np.ndarray) -> np.ndarray:
        grown = np.exp(np.minimum(theta[1] + theta[2] * x + z @ theta[3:], 700.0))
        fit = np.log(math.exp(theta[0]) + grown + floor)
        return np.concatenate([y - fit, [slope_prior * (theta[2] - 1.0)], COEF_PRIOR * (theta[3:] - centres)])

    low = [math.log(1e-9), -60.0, MIN_SLOPE, *(least if least is not None else [-4.0] * k)]
    high = [math.log(largest + 1.0) + 1.0, 60.0, 2.0, *[4.0] * k]
    best = None
    for fixed_share in (0.5, 0.01):
        typical = float(np.exp(np.median(y)))
        start = np.array([math.log(max(typical * fixed_share, 1e-9)),
                          math.log(max(typical * (1 - fixed_share), 1e-9)) - float(np.median(x)), 1.0, *centres])
        start = np.clip(start, np.array(low) + 1e-9, np.array(high) - 1e-9)
        result = least_squares(residuals, start, bounds=(low, high), loss="soft_l1", f_scale=0.1)
        if best is None or result.cost < best.cost:
            best = result
    return best.x


@dataclass(frozen=True)
class ExpectedWork:
    """Every task's :class:`TotalFit` per total (:data:`models.runs.TOTALS`)."""

    tasks: dict[str, dict[str, TotalFit]] = field(default_factory=dict)

    @classmethod
    def fit(cls, rows: pd.DataFrame, powers: dict[str, dict[str, float]] | None = None) -> "ExpectedWork":
        """Learn from model rows (:func:`models.rows.model_rows`) of whole, successful runs;
        ``powers``: per task, the declared powers of its CPU work in its parameters
        (services.catalog.work_powers)."""
        if rows.empty or not {"cpu_seconds", "ts_ms"} <= set(rows.columns):
            return cls({})  # rows without the runs' CPU time (generated data): no expectation
        return cls.fit_runs(run_totals(rows), powers)

    @classmethod
    def fit_runs(cls, runs: pd.DataFrame, powers: dict[str, dict[str, float]] | None = None) -> "ExpectedWork":
        """Learn from :func:`models.runs.run_totals` rows."""
        found: dict[str, dict[str, TotalFit]] = {}
        for task, group in runs.groupby("task"):
            declared = (powers or {}).get(str(task))
            fits = {total: fit for total in TOTALS if (fit := TotalFit.fit(total, group, declared)) is not None}
            if (by_output := TotalFit.fit_by_output(group)) is not None:
                fits[BY_OUTPUT] = by_output
            if fits:
                found[str(task)] = fits
        return cls(found)

    def verdict_fit(self, task: str, total: str, size: InputSize) -> TotalFit | None:
        """The fit a run's ``total`` is judged by at its end: its bytes written against the
        output it wrote when both are known, else what its input says."""
        if total == "bytes_written" and _known(size.output_bytes) and (fit := self.fit_of(task, BY_OUTPUT)):
            return fit
        return self.fit_of(task, total)

    def fit_of(self, task: str, total: str) -> TotalFit | None:
        return self.tasks.get(task, {}).get(total)

    def band(self, task: str, size: InputSize | float, params: str | dict | None = None, total: str = "cpu_seconds",
             pressure: float = math.nan) -> tuple[float, float, float] | None:
        """P10, P50, P90 of ``total`` for a run of ``task`` on an input of ``size``
        (:class:`InputSize`, or just its pixels) with ``params``; None when the task has no
        expectation of it or the input's size is unknown."""
        fit, size = self.fit_of(task, total), _size(size)
        if fit is None or not size.known:
            return None
        return fit.band(size, param_features(params), pressure)

    def medians(self, frame: pd.DataFrame, total: str) -> np.ndarray:
        """Per row of ``frame`` (task, image_pixels, params), the median ``total`` of its run
        at the history's typical pressure; NaN where there is no expectation."""
        params = frame["params"].astype(str) if "params" in frame else ["{}"] * len(frame)
        numbers = [np.nan_to_num(_column(frame, name), nan=-1.0) for name in ("image_pixels", "image_channels",
                                                                               "image_bytes")]
        keys = list(zip(frame["task"].astype(str), *(n.tolist() for n in numbers), params))
        cache: dict[tuple, float] = {}  # keyed by plain floats, unknown as -1 (NaN is never equal to itself)
        out = np.empty(len(keys))
        for i, key in enumerate(keys):
            if key not in cache:
                size = InputSize(*(value if value >= 0 else math.nan for value in key[1:4]))
                band = self.band(key[0], size, key[4], total)
                cache[key] = band[1] if band else np.nan
            out[i] = cache[key]
        return out

    def with_heldout(self, statistics: pd.DataFrame) -> "ExpectedWork":
        """The same fits with the P10 and P90 of held-out runs' statistics (``kind`` ``run:<total>``,
        :func:`models.alarms.alarm_statistics` of runs each fold's model never saw) as the
        band's edges of every task's fit that judges that total at a run's end. Pooled over
        the tasks: a task has a few held-out runs, the model's error on new inputs is alike."""
        edges = {}
        for kind, part in statistics.groupby("kind") if len(statistics) else ():
            values = part["statistic"].to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            if str(kind).startswith("run:") and len(values) >= HELDOUT_RUNS:
                low, high = np.quantile(values, [0.1, 0.9])
                total = str(kind)[4:]
                # a run's writes are judged by the output it wrote (verdict_fit)
                edges[BY_OUTPUT if total == "bytes_written" else total] = (float(low), float(high))
        return ExpectedWork({task: {total: replace(fit, heldout=edges[total]) if total in edges else fit
                                    for total, fit in fits.items()} for task, fits in self.tasks.items()})

    def to_dict(self) -> dict:
        return {task: {total: asdict(fit) for total, fit in fits.items()} for task, fits in self.tasks.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ExpectedWork":
        return cls({task: {total: TotalFit(**{**fit, "coef": tuple(fit["coef"]), "covariates": tuple(fit["covariates"]),
                                              "fill": tuple(fit["fill"]), "residuals": tuple(fit["residuals"]),
                                              "pixels": tuple(fit["pixels"]),
                                              "heldout": tuple(fit["heldout"]) if fit.get("heldout") else None,
                                              "ranges": tuple(tuple(r) if r is not None else None
                                                              for r in fit.get("ranges", ()))})
                           for total, fit in fits.items()}
                    for task, fits in data.items()})


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)


def _known(pixels) -> bool:
    try:
        return math.isfinite(float(pixels)) and float(pixels) > 0
    except (TypeError, ValueError):
        return False


def with_progress(frame: pd.DataFrame, work: ExpectedWork) -> pd.DataFrame:
    """``frame`` with ``progress``: the run's CPU time before the sample over the median CPU
    time its task needs on its input with its parameters, clipped to [0, MAX_PROGRESS]. How
    far through its work a task is, whatever the load: on a busy node the seconds stretch,
    this does not."""
    if "cpu_before" not in frame or frame.empty:
        return frame.assign(progress=PROGRESS_FILL)
    expected = work.medians(frame, "cpu_seconds")
    before = pd.to_numeric(frame["cpu_before"], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        progress = np.clip(before / expected, 0.0, MAX_PROGRESS)
    return frame.assign(progress=np.where(np.isfinite(progress), progress, PROGRESS_FILL))
