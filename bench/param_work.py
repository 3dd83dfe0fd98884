"""How each task's CPU work grows with its number parameters, against what the catalog declares.

``Param.work`` (services/runtime/spec.py) says a task's CPU work grows as ``value ** work``;
the expected-usage model starts from it for a setting the history never had. This measures
it: every number parameter of every task swept over its values (the others at their
defaults) on one photo-like image, the CPU time of the operation alone (the process's, best
of ``--repeat``), and the power between each pair of neighbouring values,
``log(cpu2 / cpu1) / log(v2 / v1)``, beside the declared one.

    ./dev python bench/param_work.py [--width 640 --height 480] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine  # noqa: E402
from services.catalog import all_tasks  # noqa: E402
from training.collect import make_image  # noqa: E402

SWEEPS = {
    ("median", "size"): (3, 5, 7, 9), ("median", "passes"): (1, 2, 4, 8),
    ("denoise", "search"): (1, 2, 3, 4, 6), ("denoise", "patch"): (1, 2, 3), ("denoise", "strength"): (6.0, 12.0, 24.0),
    ("upscale", "iterations"): (2, 5, 10, 20, 40), ("upscale", "factor"): (2, 3, 4),
    ("blur", "radius"): (1.0, 2.0, 4.0, 8.0), ("sharpen", "radius"): (1.0, 2.0, 4.0, 8.0),
    ("sharpen", "percent"): (50, 150, 400), ("jpeg", "quality"): (30, 60, 90),
    ("contrast", "factor"): (0.5, 1.5, 4.0), ("sepia", "amount"): (0.25, 0.5, 1.0),
    ("edge_detect", "gain"): (0.5, 1.0, 4.0), ("watermark", "size"): (0.04, 0.08, 0.32),
    ("watermark", "opacity"): (0.25, 0.5, 1.0), ("resize", "scale"): (0.25, 0.5, 1.0, 2.0),
    ("rotate", "degrees"): (15.0, 45.0, 90.0),
}
"""The values tried per (task, parameter): within the parameter's range, spanning the settings
orders use. A number parameter not listed is not measured (and said)."""


def cpu_seconds(task, image, params: dict, repeat: int) -> float:
    """The best of ``repeat`` CPU times of the operation (with its output's encoding)."""
    best = math.inf
    for _ in range(repeat):
        began = time.process_time()
        result = task.run(image, params)
        result.tobytes()
        best = min(best, time.process_time() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    image = make_image(args.width, args.height, seed=7)
    rows = []
    for name, task in all_tasks().items():
        for param, spec in task.params.items():
            if spec.kind not in (int, float):
                continue
            values = SWEEPS.get((name, param))
            if values is None:
                print(f"{name}.{param}: not swept (declared {spec.work})", flush=True)
                continue
            times = [cpu_seconds(task, image, {param: value}, args.repeat) for value in values]
            powers = [math.log(t2 / t1) / math.log(v2 / v1)
                      for (v1, t1), (v2, t2) in zip(zip(values, times), zip(values[1:], times[1:]))]
            rows.append({"task": name, "param": param, "declared": spec.work, "values": list(values),
                         "cpu_s": [round(t, 4) for t in times], "powers": [round(p, 2) for p in powers]})
            print(f"{name}.{param}: declared {spec.work}; cpu " + ", ".join(f"{v:g}: {t:.3f}s" for v, t in zip(values, times))
                  + "; power between neighbours " + ", ".join(f"{p:.2f}" for p in powers), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "image": [args.width, args.height],
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
