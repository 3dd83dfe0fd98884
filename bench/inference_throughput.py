"""Benchmark: batched inference throughput of the expected-usage model (predictions/s).

For batch sizes 1, 64, 1,024 and 16,384 (``--batch-sizes``), two figures per device:

- ``predict``: ``ExpectedUsageModel.predict(frame)`` from a pandas frame to a pandas frame, as
  live scoring calls it (encoding, the network, decoding to original units);
- ``network``: the network alone on rows already encoded as tensors (the model's own cost).

Each figure is the median over ``--repeat`` timed rounds (default 5) of as many calls as fill
about ``--round-seconds`` (default 0.5 s), after a warm-up. The CPU always; CUDA too when a
device is available (timed with synchronisation). The model is the registered one
(``--model-uri models:/expected-usage@champion`` or ``models:/expected-usage/3``, on
``MLFLOW_TRACKING_URI`` or the project default store), a folder written by
``ExpectedUsageModel.save``, or by default one trained here on generated measurements
(``training.synthetic``, 240 orders; its training time is reported too).

    ./dev python bench/inference_throughput.py [--model-uri URI] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine, markdown_table, median, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from models.expected_usage import ExpectedUsageModel  # noqa: E402
from models.features import FEATURE_COLUMNS  # noqa: E402
from training import synthetic  # noqa: E402

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", help="models:/expected-usage@champion, models:/expected-usage/N, "
                                            "or a folder saved by ExpectedUsageModel.save")
    parser.add_argument("--batch-sizes", default="1,64,1024,16384")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, origin = _model(args.model_uri)
    rows = _rows(model, max(int(b) for b in args.batch_sizes.split(",")))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        model.to(device)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            frame = rows.head(batch)
            encoded = model.preprocessor.encode(frame).to(device)
            for path, call in (("predict", lambda: model.predict(frame)),
                               ("network", lambda: _forward(model, encoded))):
                seconds = _time(call, device, args.repeat, args.round_seconds)
                results.append({"device": device, "path": path, "batch": batch,
                                "ms_per_call": seconds * 1000, "predictions_per_s": batch / seconds})
    model.to("cpu")
    table = markdown_table(
        ["device", "path", "batch", "ms per call", "predictions/s"],
        [[r["device"], r["path"], f"{r['batch']:,}", f"{r['ms_per_call']:.3f}", f"{r['predictions_per_s']:,.0f}"]
         for r in results])
    print(f"model: {origin}; torch {torch.__version__}, {args.threads} CPU thread(s); load average {loadavg()}")
    print(table)
    write_json(args.json, {"machine": machine(), "model": origin, "threads": args.threads, "results": results})
    return 0


def _model(uri: str | None) -> tuple[ExpectedUsageModel, str]:
    if uri is None:
        from training.data import split_by_order
        from training.trainer import TrainConfig, fit

        split = split_by_order(synthetic.generate(240, seed=0), seed=0)
        outcome = fit(split.train, split.validation, TrainConfig(seed=0), progress=False)
        return outcome.model, (f"trained here on generated measurements ({len(split.train):,} rows) "
                               f"in {outcome.seconds:.1f}s, {len(outcome.history)} epochs")
    if Path(uri).is_dir():
        return ExpectedUsageModel.load(uri), f"saved model in {uri}"
    match = _MODEL_URI.match(uri)
    if match is None:
        raise SystemExit(f"error: --model-uri {uri!r}: expected models:/NAME@champion, "
                         "models:/NAME/VERSION or a folder")
    from pipeline.settings import Settings
    from models.registry import load_expected_usage

    if match["alias"] not in (None, "champion"):
        raise SystemExit(f"error: --model-uri {uri!r}: only the champion alias or a version number")
    tracking_uri = Settings.from_env().mlflow_tracking_uri
    loaded = load_expected_usage(tracking_uri, match["version"])  # None version: the champion
    if loaded is None:
        raise SystemExit(f"error: {uri} is not registered in {tracking_uri}")
    return loaded[0], f"{uri} (version {loaded[1]}) from {tracking_uri}"


def _rows(model: ExpectedUsageModel, count: int) -> pd.DataFrame:
    """``count`` realistic rows, tasks and resources drawn from the model's own vocabulary."""
    rng = np.random.default_rng(0)
    frame = synthetic.generate(60, seed=5)[FEATURE_COLUMNS].sample(n=count, replace=True, random_state=0)
    vocabulary = model.preprocessor
    frame["task"] = rng.choice(vocabulary.tasks[1:], size=count)
    frame["prev_task"] = rng.choice(vocabulary.prev_tasks[1:], size=count)
    frame["resource"] = rng.choice(vocabulary.resources[1:], size=count)
    return frame.reset_index(drop=True)


@torch.inference_mode()
def _forward(model: ExpectedUsageModel, encoded) -> torch.Tensor:
    return model.net(encoded)


def _time(call, device: str, repeat: int, round_seconds: float) -> float:
    """Median seconds per call over ``repeat`` rounds of about ``round_seconds`` each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call()
    sync()
    began, calls = time.perf_counter(), 0
    while time.perf_counter() - began < round_seconds / 5 or calls < 2:
        call()
        calls += 1
    sync()
    per_round = max(int(calls * round_seconds / max(time.perf_counter() - began, 1e-9)), 1)
    per_call = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        for _ in range(per_round):
            call()
        sync()
        per_call.append((time.perf_counter() - start) / per_round)
    return median(per_call)


if __name__ == "__main__":
    raise SystemExit(main())
