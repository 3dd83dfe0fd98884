"""``python -m training collect``: build a usage history that varies what the model must explain.

The expected-usage model learns from stored samples, and a history of one image size run one
order at a time teaches it nothing about input size or a busy node: its bands then call every
busy hour a stall. This command generates images of several sizes, writes orders over several
task sequences and runs them at several concurrency levels through the real pipeline
(``python -m orchestrator run --max-concurrent N``), so every task run is stored with the
pixels it read and the node's CPU pressure at each tick.

Images are generated (seeded, nothing downloaded): smooth random fields with edges and noise,
so the filters have texture to work on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = ((640, 480), (1024, 768), (1600, 1200))
DEFAULT_CONCURRENCY = (1, 4, 8)
DEFAULT_MODES = ("RGB", "L")
"""Colour and grey inputs: a task reads both in production (after ``grayscale``, or a grey
photo), and a grey pixel is not a third of a colour one's work (PIL holds it in one byte
against four): the work model learns each task's channel effect only from a history of both."""
DEFAULT_VARIANTS = {
    "median": ({"passes": 1, "size": 3}, {"passes": 2, "size": 5}, {"passes": 3, "size": 3}, {"passes": 1, "size": 5}),
    "denoise": ({"search": 2}, {"search": 3}, {"search": 2, "patch": 2}),
    "upscale": ({"iterations": 5}, {"iterations": 10}, {"iterations": 15}),
    "blur": ({"radius": 1.0}, {"radius": 2.0}, {"radius": 4.0}),
    "sharpen": ({"radius": 1.0}, {"radius": 2.0}, {"radius": 3.0, "percent": 200}),
    "jpeg": ({"quality": 60}, {"quality": 75}, {"quality": 90}),
}
"""Parameter settings each task cycles through: the work model learns how a task's work grows
with a parameter only from a history in which it varied (models/work.py)."""
DEFAULT_SEQUENCES = (
    ("median", "grayscale", "sharpen"),
    ("denoise", "contrast", "jpeg"),
    ("upscale", "blur", "edge_detect"),
    ("resize", "median", "sepia"),
    ("sepia", "denoise", "flip"),
    ("equalize", "upscale", "median"),
)


class CollectError(PipelineError):
    """Bad arguments, or the orchestrator could not run the orders."""

    exit_code = 2


@dataclass(frozen=True)
class CollectPlan:
    """What to run: ``orders`` orders at each concurrency level, cycling over the images (each
    size in each of ``modes``) and sequences."""

    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES
    modes: tuple[str, ...] = DEFAULT_MODES
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    sequences: tuple[tuple[str, ...], ...] = DEFAULT_SEQUENCES
    orders: int = 12
    seed: int = 0
    prefix: str = "history"
    variants: dict[str, tuple[dict, ...]] = field(default_factory=lambda: dict(DEFAULT_VARIANTS))


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: a smooth random field, a few hard-edged shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, height // 64), max(2, width // 64), 3)) * 255
    field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = min(width, x0 + int(rng.integers(width // 10, width // 3))), \
            min(height, y0 + int(rng.integers(height // 10, height // 3)))
        field[y0:y1, x0:x1] = rng.random(3) * 255
    field += rng.normal(0, 8, field.shape)
    return Image.fromarray(field.clip(0, 255).astype(np.uint8), "RGB")


def write_orders(plan: CollectPlan, folder: Path) -> dict[int, list[Path]]:
    """Images and order files in ``folder``; the order files per concurrency level. Each
    task of :attr:`CollectPlan.variants` takes its next parameter setting."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, (width, height) in enumerate(plan.sizes):
        for mode in plan.modes:
            path = folder / f"{plan.prefix}-{width}x{height}-{mode}-{plan.seed}.jpg"
            if not path.exists():
                make_image(width, height, plan.seed * 1000 + i).convert(mode).save(path, quality=92)
            images.append(path)
    files: dict[int, list[Path]] = {}
    number = 0
    settings = {task: cycle(variants) for task, variants in plan.variants.items() if variants}
    # one cycle over every image and sequence, shuffled once (seeded), across the levels: each
    # level gets a mix of them, and no pair is left out of a history of as many orders as pairs
    pairs = [(image, sequence) for sequence in plan.sequences for image in images]
    random.Random(plan.seed).shuffle(pairs)
    pairs = cycle(pairs)
    for level in plan.concurrency:
        level_files = []
        for _ in range(plan.orders):
            image, sequence = next(pairs)
            number += 1
            path = folder / f"{plan.prefix}-{plan.seed}-{number:04d}.json"
            tasks = [{"name": task, "params": next(settings[task])} if task in settings else task
                     for task in sequence]
            path.write_text(json.dumps({"id": f"{plan.prefix}-c{level}-{'-'.join(sequence)}",
                                        "image": str(image), "tasks": tasks}))
            level_files.append(path)
        files[level] = level_files
    return files


def collect(plan: CollectPlan, folder: Path, env: dict[str, str] | None = None) -> dict[int, int]:
    """Run the plan's orders level by level; the exit status of the orchestrator per level.

    The orchestrator prints its own progress; a level whose orders failed (status 1) does not
    stop the others, since failed runs are left out of training anyway."""
    statuses = {}
    for level, files in write_orders(plan, folder).items():
        print(f"collect: {len(files)} order(s) at concurrency {level}", flush=True)
        result = subprocess.run([sys.executable, "-m", "orchestrator", "run", *map(str, files),
                                 "--max-concurrent", str(level)], cwd=REPO,
                                env={**os.environ, **(env or {})})
        if result.returncode not in (0, 1):
            raise CollectError(f"the orchestrator stopped with status {result.returncode} at concurrency {level}")
        statuses[level] = result.returncode
    return statuses


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``640x480,1024x768`` -> ((640, 480), (1024, 768))."""
    try:
        sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        raise CollectError(f"--sizes {text!r}: expected WIDTHxHEIGHT[,WIDTHxHEIGHT...]") from None
    if any(len(s) != 2 or min(s) < 16 or max(s) > 8000 for s in sizes):
        raise CollectError(f"--sizes {text!r}: each size is WIDTHxHEIGHT, 16 to 8000 pixels a side")
    return sizes  # type: ignore[return-value]


def parse_modes(text: str) -> tuple[str, ...]:
    """``RGB,L`` -> ("RGB", "L"): PIL image modes the generated images are saved in."""
    modes = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [mode for mode in modes if mode not in ("RGB", "L")]
    if not modes or unknown:
        raise CollectError(f"--modes {text!r}: give RGB, L or both, e.g. RGB,L")
    return modes


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CollectError(f"--concurrency {text!r}: expected numbers like 1,4,8") from None
    if any(level < 1 for level in levels):
        raise CollectError("--concurrency: every level must be at least 1")
    return levels


def parse_sequences(text: str) -> tuple[tuple[str, ...], ...]:
    """``median,grayscale;denoise,jpeg`` -> (("median", "grayscale"), ("denoise", "jpeg"))."""
    from services.catalog import get_task

    sequences = tuple(tuple(name.strip() for name in part.split(",") if name.strip())
                      for part in text.split(";") if part.strip())
    if not sequences:
        raise CollectError("--sequences: give at least one task sequence, e.g. median,grayscale;denoise")
    for sequence in sequences:
        for name in sequence:
            get_task(name)  # an unknown task is one line naming the known ones
    return sequences
