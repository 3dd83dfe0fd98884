"""median: repeated median filtering (heavy; removes salt-and-pepper noise)."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image, ImageFilter

from services.runtime.imaging import split_alpha, with_alpha
from services.runtime.spec import ImageTask, Param


def median(image: Image.Image, params: Mapping[str, object]) -> Image.Image:
    """Apply a ``size`` x ``size`` median filter ``passes`` times; alpha is kept."""
    base, alpha = split_alpha(image)
    kernel = ImageFilter.MedianFilter(params["size"])
    for _ in range(params["passes"]):
        base = base.filter(kernel)
    return with_alpha(base, alpha)


TASK = ImageTask(
    name="median",
    summary="Median filter repeated several times (heavy: seconds of CPU on a photo).",
    params={
        "size": Param(int, 5, choices=(3, 5, 7, 9), help="window side in pixels", work=1.8),
        "passes": Param(int, 2, minimum=1, maximum=10, help="how many times to filter", work=0.6),
    },
    apply=median,
    resources={"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
)

if __name__ == "__main__":
    from services.runtime.runner import main

    raise SystemExit(main(TASK))
