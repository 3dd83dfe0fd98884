"""grayscale: convert an image to 8-bit luminance."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from services.runtime.imaging import working_image
from services.runtime.spec import ImageTask


def grayscale(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Return the ITU-R 601 luminance as an ``L`` image (transparency is dropped)."""
    return working_image(image).convert("L")


TASK = ImageTask(
    name="grayscale",
    summary="Convert to 8-bit grayscale (mode L).",
    params={},
    apply=grayscale,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
