"""The one code path from samples to model rows, for training and live scoring alike.

:func:`model_rows` turns raw samples (one row per resource per tick of a task run) into model
rows. Training (``training.data``) and live scoring (``monitor.live_scoring``) both call it, so
a sample gets the same features either way (tests/unit/test_model_rows.py holds them to that).
Per tick it derives:

- ``cpu_demand``: cpu + cpu_wait, the time the tree's threads ran or waited to run. Sharing
  the cores with other work moves usage from cpu to cpu_wait but leaves demand alone, so a
  CPU-bound task's demand is what contention cannot change: a scored resource of its own.
- ``node_cpu_pressure`` of the same tick as an input: how busy the node was (a context
  series the sampler measures, never a target).
- ``cpu_seconds``: the run's CPU time up to and including the tick, and ``cpu_before`` up to
  the tick's start: the run's progress clock. On a busy node a task's wall-clock seconds
  stretch, its CPU time does not (used for the progress feature and the expected-duration
  check, :mod:`models.work`).

No PyTorch here: the monitor-consumer imports this without the model's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

NO_PREVIOUS = "<none>"
RUN_KEY = ["order_id", "position", "attempt"]
RAW_COLUMNS = [*RUN_KEY, "task", "prev_task", "image_pixels", "image_channels", "image_bytes", "output_bytes",
               "operation_seconds", "params", "started_ms", "ts_ms", "resource", "value"]
"""What :func:`model_rows` reads: one sample with its run's facts (image_pixels, _channels,
_bytes: of the image the run reads; output_bytes: the size of the output it wrote, known at
its end; operation_seconds: the CPU time of its image operation alone, reported by the task at
its end; NaN when not known; params: the run's task parameters as JSON (:data:`NO_PARAMS`
when not recorded); started_ms: when the run's process started)."""
RUN_FACTS = ["task", "prev_task", "image_pixels", "image_channels", "image_bytes", "output_bytes",
             "operation_seconds", "params", "started_ms"]
NO_PARAMS = "{}"
CONTEXT_RESOURCE = "node_cpu_pressure"
DEMAND = "cpu_demand"
TARGET_RESOURCES = ("cpu", "memory", "disk_read", "disk_write", "cpu_wait", DEMAND)
ROW_COLUMNS = [*RUN_KEY, "task", "resource", "seconds", "prev_task", "image_pixels", "image_channels", "image_bytes",
               "output_bytes", "operation_seconds", "params", CONTEXT_RESOURCE, "value", "ts_ms", "interval_s", "cpu_seconds", "cpu_before"]


@dataclass
class RunState:
    """What the earlier ticks of a run left for the next: the last tick's time and the CPU
    time so far. Live scoring keeps one per running task; training starts each run afresh."""

    last_ms: int
    cpu_seconds: float = 0.0


def model_rows(raw: pd.DataFrame, state: dict[tuple, RunState] | None = None) -> pd.DataFrame:
    """Model rows (:data:`ROW_COLUMNS`) for ``raw`` samples (:data:`RAW_COLUMNS`), sorted by
    run, time and resource. Each run's ticks must come in time order, after those of earlier
    calls with the same ``state`` (updated in place); without ``state`` every run is whole."""
    if raw.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    state = {} if state is None else state
    missing = {"params": NO_PARAMS, "image_channels": np.nan, "image_bytes": np.nan, "output_bytes": np.nan,
               "operation_seconds": np.nan}
    raw = raw.assign(**{c: v for c, v in missing.items() if c not in raw})
    facts = raw.groupby(RUN_KEY, sort=False)[RUN_FACTS].first()
    wide = (raw.pivot_table(index=[*RUN_KEY, "ts_ms"], columns="resource", values="value", aggfunc="last")
            .reset_index().sort_values([*RUN_KEY, "ts_ms"], kind="stable"))
    wide.columns.name = None
    for column in ("cpu", "cpu_wait", CONTEXT_RESOURCE):
        if column not in wide:
            wide[column] = np.nan
    wide = wide.join(facts, on=RUN_KEY)
    keys = list(zip(*(wide[c].to_numpy() for c in RUN_KEY)))
    first = ~wide.duplicated(RUN_KEY).to_numpy()
    previous = wide.groupby(RUN_KEY, sort=False)["ts_ms"].shift(1).to_numpy(dtype=np.float64)
    before = np.array([state[k].last_ms if k in state else s for k, s in zip(keys, wide["started_ms"])],
                      dtype=np.float64)
    previous = np.where(first, before, previous)
    ts = wide["ts_ms"].to_numpy(dtype=np.float64)
    wide["interval_s"] = np.clip((ts - previous) / 1000.0, 0.001, None)
    spent = (wide["cpu"].fillna(0.0) / 100.0 * wide["interval_s"])
    carried = np.array([state[k].cpu_seconds if k in state else 0.0 for k in keys])
    wide["cpu_seconds"] = carried + spent.groupby([wide[c] for c in RUN_KEY], sort=False).cumsum().to_numpy()
    wide["cpu_before"] = wide["cpu_seconds"] - spent
    wide[DEMAND] = wide["cpu"] + wide["cpu_wait"]
    wide["seconds"] = np.clip((ts - wide["started_ms"].to_numpy(dtype=np.float64)) / 1000.0, 0.0, None)
    last = wide.drop_duplicates(RUN_KEY, keep="last")
    for key, ts_ms, cpu_seconds in zip(zip(*(last[c].to_numpy() for c in RUN_KEY)), last["ts_ms"],
                                       last["cpu_seconds"]):
        state[key] = RunState(int(ts_ms), float(cpu_seconds))
    targets = [r for r in TARGET_RESOURCES if r in wide]
    rows = wide.melt(id_vars=[c for c in ROW_COLUMNS if c not in ("resource", "value")],
                     value_vars=targets, var_name="resource", value_name="value").dropna(subset=["value"])
    order = {r: i for i, r in enumerate(TARGET_RESOURCES)}
    rows = rows.assign(_r=rows["resource"].map(order)).sort_values([*RUN_KEY, "ts_ms", "_r"], kind="stable")
    return rows[ROW_COLUMNS].reset_index(drop=True)


def previous_task(task_list: str, position: int) -> str:
    """The task run before ``position`` in a ``,``-joined task list, or ``<none>``."""
    names = task_list.split(",")
    return names[position - 1] if 0 < position <= len(names) else NO_PREVIOUS
