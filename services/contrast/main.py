"""contrast: scale contrast around the mean grey level."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image, ImageEnhance

from services.runtime.imaging import split_alpha, with_alpha
from services.runtime.spec import ImageTask, Param


def contrast(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Multiply contrast by ``factor`` (1 unchanged, 0 flat grey); alpha is kept."""
    base, alpha = split_alpha(image)
    return with_alpha(ImageEnhance.Contrast(base).enhance(params["factor"]), alpha)


TASK = ImageTask(
    name="contrast",
    summary="Change contrast by a factor (1 keeps the image, below 1 flattens, above 1 boosts).",
    params={
        "factor": Param(float, 1.5, minimum=0, maximum=10, help="contrast multiplier", work=0.0),
    },
    apply=contrast,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
