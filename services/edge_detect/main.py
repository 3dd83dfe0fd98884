"""edge_detect: Sobel gradient magnitude of the luminance."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from services.runtime.imaging import from_array, working_image
from services.runtime.spec import ImageTask, Param


def sobel_magnitude(grey: np.ndarray) -> np.ndarray:
    """Return the Sobel gradient magnitude of a 2-D array (same shape).

    Borders are padded by repeating the edge pixels, so a flat image gives exactly zero.
    """
    padded = np.pad(grey, 1, mode="edge")
    # Smooth across, then differentiate along: the separable form of the Sobel kernels.
    rows = padded[:-2, :] + 2 * padded[1:-1, :] + padded[2:, :]
    cols = padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]
    gx = rows[:, 2:] - rows[:, :-2]
    gy = cols[2:, :] - cols[:-2, :]
    return np.hypot(gx, gy)


def edge_detect(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Return an ``L`` image that is bright where the luminance changes quickly."""
    grey = np.asarray(working_image(image).convert("L"), dtype=np.float32)
    # A full black-to-white step gives a magnitude of 4 * 255; map that to white.
    edges = sobel_magnitude(grey) * (params["gain"] / 4.0)
    if params["threshold"] > 0:
        edges = np.where(edges >= params["threshold"], 255.0, 0.0)
    return from_array(edges, "L")


TASK = ImageTask(
    name="edge_detect",
    summary="Sobel edge magnitude as a grayscale image, optionally thresholded to black/white.",
    params={
        "gain": Param(float, 1.0, minimum=0.1, maximum=20, help="brightness multiplier of edges", work=0.0),
        "threshold": Param(int, 0, minimum=0, maximum=255, help="binarise at this level (0: off)", work=0.0),
    },
    apply=edge_detect,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
