"""Generated measurements with a known structure, for tests and benchmarks.

Usage depends on the task, the image size, the time since the task started and (a little) on
the position and the previous task, times log-normal noise of known spread, so the true P10,
P50 and P90 of every sample are known: ``true_p50`` is returned alongside, and the true band is
``true_p50 * exp(+-1.2816 * sigma)``. The model's feature columns, the value, its time (``ts``,
``ts_ms``) and the run's CPU time (``cpu_before``, ``cpu_seconds``: a run's CPU is its nominal
percentage of a core), so the work model has the runs' totals to learn from.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from models.features import NO_PREVIOUS

# task: (seconds per megapixel, cpu %, memory MiB per megapixel, disk read, disk write KiB/s per MP)
TASKS = {
    "resize": (0.8, 60.0, 12.0, 900.0, 400.0),
    "grayscale": (0.5, 40.0, 6.0, 700.0, 250.0),
    "blur": (2.0, 95.0, 20.0, 800.0, 500.0),
    "sharpen": (1.5, 85.0, 18.0, 800.0, 450.0),
    "denoise": (6.0, 180.0, 45.0, 1200.0, 300.0),
    "rotate": (1.0, 70.0, 30.0, 900.0, 600.0),
}
SIGMA = {"cpu": 0.2, "memory": 0.08, "disk_read": 0.35, "disk_write": 0.35}
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def generate(n_orders: int = 240, seed: int = 0) -> pd.DataFrame:
    """``n_orders`` orders of 2-4 random tasks over images of 0.1-4 megapixels."""
    rng = np.random.default_rng(seed)
    load = np.random.default_rng(seed + 1)  # the node's pressure: an input that explains nothing here
    names = list(TASKS)
    rows: list[tuple] = []
    for order_id in range(1, n_orders + 1):
        pixels = float(np.exp(rng.uniform(np.log(0.1e6), np.log(4e6))))
        order_tasks = list(rng.choice(names, size=int(rng.integers(2, 5))))
        clock = START + timedelta(minutes=order_id)
        pressure = float(load.uniform(0, 90))
        for position, task in enumerate(order_tasks):
            prev = order_tasks[position - 1] if position else NO_PREVIOUS
            megapixels = pixels / 1e6
            duration = 1.0 + TASKS[task][0] * megapixels
            for second in np.arange(0.5 + rng.uniform(0, 0.4), duration, 1.0):
                for resource in SIGMA:
                    median = expected_median(task, resource, second, megapixels, position, prev)
                    value = median * np.exp(rng.normal(0.0, SIGMA[resource]))
                    at = clock + timedelta(seconds=float(second))
                    cpu_before = max(float(second) - 1.0, 0.0) * TASKS[task][1] / 100
                    rows.append((order_id, 1, task, resource, float(second), position, prev, pixels, "{}",
                                 pressure, 1.0, cpu_before, cpu_before + TASKS[task][1] / 100, float(value), at,
                                 int(at.timestamp() * 1000), median))
            clock += timedelta(seconds=duration + 0.5)
    return pd.DataFrame(rows, columns=["order_id", "attempt", "task", "resource", "seconds", "position",
                                       "prev_task", "image_pixels", "params", "node_cpu_pressure", "interval_s",
                                       "cpu_before", "cpu_seconds", "value", "ts", "ts_ms", "true_p50"])


def expected_median(task: str, resource: str, seconds: float, megapixels: float,
                    position: int, prev_task: str) -> float:
    """The true median usage of one sample."""
    _, cpu, memory, read, write = TASKS[task]
    if resource == "cpu":
        ramp = 0.35 + 0.65 * (1.0 - np.exp(-seconds / 1.5))
        return cpu * ramp * (1.25 if position == 0 else 1.0)
    if resource == "memory":
        cold = 25.0 if prev_task == NO_PREVIOUS else 0.0
        return 40.0 + cold + memory * megapixels * (1.0 + 0.3 * min(seconds, 5.0) / 5.0)
    if resource == "disk_read":
        return 5.0 + read * megapixels * np.exp(-seconds / 2.0)
    return 2.0 + write * megapixels * seconds / (1.0 + seconds)
