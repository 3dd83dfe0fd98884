"""denoise: non-local means in numpy (deliberately CPU- and memory-heavy)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from services.runtime.imaging import from_array, split_alpha, to_array, with_alpha
from services.runtime.spec import ImageTask, Param


def box_sum(values: np.ndarray, size: int) -> np.ndarray:
    """Sum every ``size`` x ``size`` window of a 2-D array ("valid" windows only).

    Adding shifted slices is exact in float32, unlike an integral image over a whole photo.
    """
    height, width = values.shape[0] - size + 1, values.shape[1] - size + 1
    rows = sum(values[i : i + height, :] for i in range(size))
    return sum(rows[:, j : j + width] for j in range(size))


def non_local_means(values: np.ndarray, strength: float, search: int, patch: int) -> np.ndarray:
    """Denoise a (height, width, bands) float array by non-local means.

    Each pixel becomes a weighted mean of the pixels within ``search`` of it; the weight
    falls with the mean squared difference of the (2*patch+1)^2 patches around them.
    """
    height, width, _ = values.shape
    margin = search + patch
    padded = np.pad(values, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    span_y, span_x = height + 2 * patch, width + 2 * patch
    centre = padded[search : search + span_y, search : search + span_x]
    patch_area = (2 * patch + 1) ** 2
    total = np.zeros_like(values)
    weights = np.zeros((height, width), dtype=np.float32)
    for dy in range(-search, search + 1):
        for dx in range(-search, search + 1):
            shifted = padded[search + dy : search + dy + span_y, search + dx : search + dx + span_x]
            distance = np.square(centre - shifted).mean(axis=2)
            distance = box_sum(distance, 2 * patch + 1) / patch_area
            weight = np.exp(-distance / (strength * strength))
            total += weight[:, :, None] * shifted[patch : patch + height, patch : patch + width]
            weights += weight
    return total / weights[:, :, None]


def denoise(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Remove noise while keeping edges; alpha is kept as it is."""
    base, alpha = split_alpha(image)
    result = non_local_means(to_array(base), params["strength"], params["search"], params["patch"])
    return with_alpha(from_array(result, base.mode), alpha)


TASK = ImageTask(
    name="denoise",
    summary="Non-local means denoising (heavy: seconds of CPU and ~10x the image in memory).",
    params={
        "strength": Param(
            float, 12.0, minimum=1, maximum=100, help="about the noise's standard deviation", work=0.0
        ),
        "search": Param(int, 3, minimum=1, maximum=10, help="search radius in pixels", work=1.6),
        "patch": Param(int, 1, minimum=1, maximum=3, help="patch radius in pixels", work=0.0),
    },
    apply=denoise,
    resources={"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
