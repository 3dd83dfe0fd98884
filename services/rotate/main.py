"""rotate: rotate counter-clockwise by any angle."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from services.runtime.imaging import working_image
from services.runtime.spec import ImageTask, Param


def rotate(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Rotate counter-clockwise; multiples of 90 degrees are exact (no resampling)."""
    image = working_image(image)
    # Uncovered corners become transparent where the image has alpha, black otherwise.
    fill = (0, 0, 0, 0) if image.mode == "RGBA" else 0
    return image.rotate(
        params["degrees"],
        resample=Image.Resampling.BICUBIC,
        expand=params["expand"],
        fillcolor=fill,
    )


TASK = ImageTask(
    name="rotate",
    summary="Rotate counter-clockwise by degrees; expand grows the canvas to fit.",
    params={
        "degrees": Param(float, 90.0, minimum=-360, maximum=360, help="counter-clockwise angle"),
        "expand": Param(bool, True, help="enlarge the output to hold the whole rotated image"),
    },
    apply=rotate,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
