"""sharpen: unsharp mask."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image, ImageFilter

from services.runtime.imaging import split_alpha, with_alpha
from services.runtime.spec import ImageTask, Param


def sharpen(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Sharpen the colour bands; alpha is left alone so edges do not grow halos."""
    base, alpha = split_alpha(image)
    mask = ImageFilter.UnsharpMask(
        radius=params["radius"], percent=params["percent"], threshold=params["threshold"]
    )
    return with_alpha(base.filter(mask), alpha)


TASK = ImageTask(
    name="sharpen",
    summary="Sharpen with an unsharp mask (radius, strength in percent, threshold).",
    params={
        "radius": Param(float, 2.0, minimum=0.1, maximum=50, help="blur radius of the mask", work=0.0),
        "percent": Param(int, 150, minimum=1, maximum=1000, help="strength in percent", work=0.0),
        "threshold": Param(int, 3, minimum=0, maximum=255, help="smallest difference sharpened", work=0.0),
    },
    apply=sharpen,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
