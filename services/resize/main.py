"""resize: scale an image to a given width/height, or by a factor."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from services.runtime.imaging import working_image
from services.runtime.spec import ImageTask, Param, TaskParameterError

DEFAULT_SCALE = 0.5


def check_size_params(task_name: str, params: Mapping[str, object]) -> None:
    """Reject ``scale`` together with ``width``/``height``: the two ways contradict."""
    sized = params["width"] is not None or params["height"] is not None
    if params["scale"] is not None and sized:
        raise TaskParameterError(
            f"task {task_name!r}: give either 'scale' or 'width'/'height', not both"
        )


def target_size(size: tuple[int, int], params: Mapping[str, object]) -> tuple[int, int]:
    """Return the output size; a missing width or height keeps the aspect ratio."""
    width, height = size
    new_width, new_height = params["width"], params["height"]
    if new_width is None and new_height is None:
        scale = params["scale"] if params["scale"] is not None else DEFAULT_SCALE
        return max(1, round(width * scale)), max(1, round(height * scale))
    if new_height is None:
        new_height = max(1, round(height * new_width / width))
    if new_width is None:
        new_width = max(1, round(width * new_height / height))
    return new_width, new_height


def resize(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Resize with Lanczos resampling (sharp when shrinking, smooth when enlarging)."""
    image = working_image(image)
    return image.resize(target_size(image.size, params), Image.Resampling.LANCZOS)


TASK = ImageTask(
    name="resize",
    summary="Resize to width/height (one keeps the aspect ratio) or by a scale (default 0.5).",
    params={
        "width": Param(int, None, minimum=1, maximum=20000, help="output width in pixels"),
        "height": Param(int, None, minimum=1, maximum=20000, help="output height in pixels"),
        "scale": Param(float, None, minimum=0.01, maximum=8, help="factor applied to both sides"),
    },
    apply=resize,
    check=check_size_params,
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
