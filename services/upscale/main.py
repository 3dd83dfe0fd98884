"""upscale: enlarge by an integer factor with iterative back-projection (heavy)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from services.runtime.imaging import from_array, split_alpha, to_array, with_alpha
from services.runtime.spec import ImageTask, Param


def _resized(values: np.ndarray, size: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    # Pillow resamples 32-bit float ("F") images, which keeps the residuals signed.
    return np.array(Image.fromarray(values).resize(size, method), dtype=np.float32)


def back_project(low: np.ndarray, factor: int, iterations: int) -> np.ndarray:
    """Upscale a 2-D float array so that shrinking the result gives back ``low``.

    Irani-Peleg back-projection: start from a bicubic enlargement, then repeatedly
    shrink it, compare with the original and spread the difference back up.
    """
    low_size = (low.shape[1], low.shape[0])
    high_size = (low_size[0] * factor, low_size[1] * factor)
    high = _resized(low, high_size, Image.Resampling.BICUBIC)
    for _ in range(iterations):
        simulated = _resized(high, low_size, Image.Resampling.BOX)
        high += _resized(low - simulated, high_size, Image.Resampling.BICUBIC)
    return high


def upscale(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Enlarge every band by ``factor``; alpha is enlarged smoothly without refinement."""
    base, alpha = split_alpha(image)
    values = to_array(base)
    factor, iterations = params["factor"], params["iterations"]
    bands = [
        back_project(np.ascontiguousarray(values[:, :, band]), factor, iterations)
        for band in range(values.shape[2])
    ]
    return with_alpha(from_array(np.stack(bands, axis=2), base.mode), alpha)


TASK = ImageTask(
    name="upscale",
    summary="Enlarge 2-4x by iterative back-projection (heavy: cost grows with factor squared).",
    params={
        "factor": Param(int, 2, minimum=2, maximum=4, help="enlargement of each side", work=2.0),
        "iterations": Param(int, 10, minimum=0, maximum=50, help="refinement passes", work=0.85),
    },
    apply=upscale,
    resources={"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
