"""A task run's totals: what image work is nearly deterministic in.

A run's samples are rates and levels over intervals that add up to the run (monitor/sampler.py),
so its totals follow from its model rows (:func:`models.rows.model_rows`): the CPU time it
used, its peak resident memory, the bytes it read from and wrote to storage. Given the task,
the pixels it reads and its parameters these hardly vary from run to run, so a release that
makes a task do 1.5 times the work, hold 1.5 times the memory or write its output twice stands
far outside them, even for a 0.2 s task that has one sample (:mod:`models.work` holds what to
expect, :class:`analysis.scoring.RunCheck` judges a run at its end).

Training (over every stored run) and live scoring (one run at its end) both call
:func:`run_totals`. No PyTorch here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.rows import CONTEXT_RESOURCE, NO_PARAMS, RUN_KEY

TOTALS = ("cpu_seconds", "operation_seconds", "peak_memory", "bytes_read", "bytes_written")
"""``operation_seconds`` is the one total the run reports rather than its samples add up: the
CPU time of its image operation alone (services/runtime/totals.py), the process's fixed part
(start-up, decoding, the Kafka client) left out, so that 1.5 times the work is 1.5 times it."""
CPU_TOTALS = ("cpu_seconds", "operation_seconds")
UNITS = {"cpu_seconds": "s", "operation_seconds": "s", "peak_memory": "MiB", "bytes_read": "KiB",
         "bytes_written": "KiB"}
NOISE_FLOOR = {"cpu_seconds": 0.02, "operation_seconds": 0.002, "peak_memory": 2.0, "bytes_read": 64.0,
               "bytes_written": 16.0}
"""What a total is compared on top of (``log(total + floor)``): the physical resolution below
which two runs of the same work differ anyway. CPU: the reaped children's share is counted in
10 ms clock ticks, up to two per child; the operation's CPU time is read in ns, but a
light operation's first touch of its buffers (page faults, cold caches) moves it by a few ms;
memory: the allocator's arenas and the page tables move
by a few MiB from run to run; reads: the kernel reads ahead in chunks of up to 128 KiB, so a
run that reads a few pages may be counted tens of KiB; writes: a file written dirties a few
4 KiB pages of metadata (its inode, its directory) besides its data."""
RUN_COLUMNS = [*RUN_KEY, "task", "prev_task", "image_pixels", "image_channels", "image_bytes", "output_bytes", "params",
               "pressure", "samples", "seconds", "ended_ms", *TOTALS]
_REPORTED = "operation_seconds"


def run_totals(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run of ``rows`` (model rows of whole runs): its facts, the node's mean CPU
    pressure over it (``pressure``, percent; NaN without PSI), its number of ticks
    (``samples``), its length in seconds and :data:`TOTALS`. A total whose resource was never
    measured (an unreadable I/O counter) is NaN, never 0."""
    if rows.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    frame = rows.assign(_amount=pd.to_numeric(rows["value"], errors="coerce")
                        * pd.to_numeric(rows["interval_s"], errors="coerce"))
    by_run = frame.groupby(RUN_KEY, sort=False)
    runs = by_run.agg(task=("task", "first"), prev_task=("prev_task", "first"),
                      image_pixels=("image_pixels", "first"), seconds=("seconds", "max"),
                      ended_ms=("ts_ms", "max"), samples=("ts_ms", "nunique"),
                      cpu_seconds=("cpu_seconds", "max"))
    runs["params"] = by_run["params"].first() if "params" in frame else NO_PARAMS
    for fact in ("image_channels", "image_bytes", "output_bytes", _REPORTED):
        runs[fact] = by_run[fact].first() if fact in frame else np.nan  # the first known
    resource = frame["resource"]
    runs["peak_memory"] = frame[resource == "memory"].groupby(RUN_KEY, sort=False)["value"].max()
    for total, name in (("bytes_read", "disk_read"), ("bytes_written", "disk_write")):
        runs[total] = frame[resource == name].groupby(RUN_KEY, sort=False)["_amount"].sum()
    if CONTEXT_RESOURCE in frame:
        ticks = frame.drop_duplicates([*RUN_KEY, "ts_ms"])
        runs["pressure"] = ticks.groupby(RUN_KEY, sort=False)[CONTEXT_RESOURCE].mean()
    else:
        runs["pressure"] = np.nan
    return runs.reset_index()[RUN_COLUMNS]
