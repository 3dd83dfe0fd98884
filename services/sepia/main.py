"""sepia: warm brown toning."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from services.runtime.imaging import colour_image, from_array, split_alpha, to_array, with_alpha
from services.runtime.spec import ImageTask, Param

# The classic sepia matrix (rows: output R, G, B; columns: input R, G, B).
SEPIA = np.array(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32
)


def sepia(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Blend the sepia-toned image over the original by ``amount``; grey input becomes RGB."""
    base, alpha = split_alpha(colour_image(image))
    values = to_array(base)
    toned = values @ SEPIA.T
    amount = params["amount"]
    return with_alpha(from_array(values * (1 - amount) + toned * amount, "RGB"), alpha)


TASK = ImageTask(
    name="sepia",
    summary="Sepia toning; amount 0 keeps the colours, 1 is full sepia. Output is RGB(A).",
    params={
        "amount": Param(float, 1.0, minimum=0, maximum=1, help="strength of the toning", work=0.0),
    },
    apply=sepia,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
