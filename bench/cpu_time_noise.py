"""How much the CPU time of the same work varies from run to run: the least spread a run's CPU
time can be judged against (models/work.py ``MIN_SPREAD``).

The median task's own operation is run ``--runs`` times over on the same image in this one
process (no interpreter start, no I/O, no Kafka: the same instructions every time), once on a
quiet node and once with a spinning process on every other CPU, and each run's CPU time is
read with ``time.process_time``. Printed: the median, the range, the largest over the median and the standard deviation of
``log(CPU time)``, the unit the work model's spread is in.

    python bench/cpu_time_noise.py [--runs 25] [--image orders/images/scene-1024x768.jpg]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import time
from pathlib import Path

from PIL import Image

from services.median.main import median

REPO = Path(__file__).resolve().parents[1]


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def cpu_times(image: Image.Image, runs: int, params: dict) -> list[float]:
    times = []
    for _ in range(runs):
        began = time.process_time()
        median(image, params)
        times.append(time.process_time() - began)
    return times


def line(label: str, times: list[float]) -> str:
    logs = [math.log(t) for t in times]
    middle = statistics.median(times)
    return (f"| {label} | {len(times)} | {middle:.3f} s | {min(times):.3f}-{max(times):.3f} s | "
            f"{max(times) / middle:.2f}x | {statistics.stdev(logs):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--image", default=str(REPO / "orders/images/scene-1024x768.jpg"))
    args = parser.parse_args()
    image = Image.open(args.image).convert("RGB")
    params = {"size": 9, "passes": 1}
    cpu_times(image, 2, params)  # warm-up
    print("| node | runs | median CPU time | range | largest / median | sd of log(CPU time) |\n"
          "|---|---|---|---|---|---|")
    print(line("quiet", cpu_times(image, args.runs, params)), flush=True)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                for _ in range(max((os.cpu_count() or 2) - 1, 1))]
    for spinner in spinners:
        spinner.start()
    try:
        time.sleep(0.5)
        print(line(f"{len(spinners)} other CPU(s) busy", cpu_times(image, args.runs, params)), flush=True)
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()


if __name__ == "__main__":
    main()
