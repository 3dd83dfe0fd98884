"""flip: mirror horizontally or vertically."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from services.runtime.imaging import working_image
from services.runtime.spec import ImageTask, Param

DIRECTIONS = {
    "horizontal": Image.Transpose.FLIP_LEFT_RIGHT,
    "vertical": Image.Transpose.FLIP_TOP_BOTTOM,
}


def flip(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Mirror the image; ``horizontal`` swaps left and right."""
    return working_image(image).transpose(DIRECTIONS[params["direction"]])


TASK = ImageTask(
    name="flip",
    summary="Mirror the image horizontally (left-right) or vertically (top-bottom).",
    params={
        "direction": Param(str, "horizontal", choices=tuple(DIRECTIONS), help="mirror axis"),
    },
    apply=flip,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
