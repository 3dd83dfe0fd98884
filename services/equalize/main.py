"""equalize: histogram equalisation."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image, ImageOps

from services.runtime.imaging import split_alpha, with_alpha
from services.runtime.spec import ImageTask, Param


def equalize(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Spread the histogram over 0..255.

    ``luminance`` equalises only brightness (Y of YCbCr), so colours keep their hue;
    ``channels`` equalises R, G and B separately, which is stronger but shifts colours.
    """
    base, alpha = split_alpha(image)
    if base.mode == "L" or params["method"] == "channels":
        result = ImageOps.equalize(base)
    else:
        y, cb, cr = base.convert("YCbCr").split()
        result = Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert("RGB")
    return with_alpha(result, alpha)


TASK = ImageTask(
    name="equalize",
    summary="Histogram equalisation of the luminance (default) or of each colour channel.",
    params={
        "method": Param(
            str, "luminance", choices=("luminance", "channels"), help="what to equalise"
        ),
    },
    apply=equalize,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
