"""jpeg: re-encode as JPEG at a given quality (lossy compression artefacts included)."""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image

from services.runtime.imaging import working_image
from services.runtime.spec import ImageTask, Param

# Pillow's names for chroma subsampling: 4:4:4 keeps colour detail, 4:2:0 halves it.
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def flatten(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Return an ``L`` or ``RGB`` image; transparency is composited onto ``background``."""
    image = working_image(image)
    if image.mode != "RGBA":
        return image
    canvas = Image.new("RGB", image.size, background)
    canvas.paste(image, mask=image.getchannel("A"))
    return canvas


def jpeg(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Encode and decode as JPEG, so the output carries exactly the JPEG's pixels."""
    buffer = io.BytesIO()
    flatten(image).save(
        buffer,
        "JPEG",
        quality=params["quality"],
        subsampling=SUBSAMPLING[params["subsampling"]],
        optimize=True,
    )
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.copy()


TASK = ImageTask(
    name="jpeg",
    summary="Re-encode as JPEG with the given quality; the output file is a JPEG.",
    params={
        "quality": Param(int, 75, minimum=1, maximum=95, help="JPEG quality (95 is near-lossless)"),
        "subsampling": Param(str, "4:2:0", choices=tuple(SUBSAMPLING), help="chroma subsampling"),
    },
    apply=jpeg,
    output_format="JPEG",
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
