"""blur: Gaussian blur."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image, ImageFilter

from services.runtime.imaging import working_image
from services.runtime.spec import ImageTask, Param


def blur(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Blur every band, alpha included, so soft edges stay soft."""
    return working_image(image).filter(ImageFilter.GaussianBlur(params["radius"]))


TASK = ImageTask(
    name="blur",
    summary="Gaussian blur with the given radius.",
    params={
        "radius": Param(float, 2.0, minimum=0.1, maximum=50, help="standard deviation in pixels", work=0.0),
    },
    apply=blur,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
