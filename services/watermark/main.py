"""watermark: draw semi-transparent text onto the image."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image, ImageDraw, ImageFont

from services.runtime.imaging import working_image
from services.runtime.spec import ImageTask, Param

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def text_origin(
    canvas: tuple[int, int], box: tuple[int, int, int, int], position: str, margin: int
) -> tuple[int, int]:
    """Return where to draw text whose bounding box, drawn at (0, 0), is ``box``."""
    width, height = canvas
    left, top, right, bottom = box
    text_w, text_h = right - left, bottom - top
    if position == "center":
        x, y = (width - text_w) // 2, (height - text_h) // 2
    else:
        vertical, horizontal = position.split("-")
        x = margin if horizontal == "left" else width - margin - text_w
        y = margin if vertical == "top" else height - margin - text_h
    return x - left, y - top


def watermark(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Overlay white text with a dark outline, ``opacity`` 0 (invisible) to 1 (solid)."""
    image = working_image(image)
    base = image.convert("RGBA")
    font_px = max(8, round(min(base.size) * params["size"]))
    font = ImageFont.load_default(size=font_px)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    outline = max(1, font_px // 15)
    box = draw.textbbox((0, 0), params["text"], font=font, stroke_width=outline)
    origin = text_origin(base.size, box, params["position"], margin=max(2, font_px // 3))
    alpha = round(255 * params["opacity"])
    draw.text(
        origin,
        params["text"],
        font=font,
        fill=(255, 255, 255, alpha),
        stroke_width=outline,
        stroke_fill=(0, 0, 0, alpha),
    )
    marked = Image.alpha_composite(base, overlay)
    # Keep the caller's kind of image: grey stays grey, opaque stays opaque.
    return marked if image.mode == "RGBA" else marked.convert(image.mode)


TASK = ImageTask(
    name="watermark",
    summary="Draw semi-transparent text (default 'image-pipeline') in a corner or the centre.",
    params={
        "text": Param(str, "image-pipeline", minimum=1, maximum=200, help="the text to draw"),
        "opacity": Param(float, 0.5, minimum=0, maximum=1, help="0 invisible, 1 solid"),
        "position": Param(str, "bottom-right", choices=POSITIONS, help="where to place the text"),
        "size": Param(
            float, 0.08, minimum=0.01, maximum=1, help="text height as a share of the shorter side"
        ),
    },
    apply=watermark,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
