"""Image helpers shared by the tasks: normalising modes and moving to and from numpy.

Tasks work in three modes only: ``L``, ``RGB`` and ``RGBA``. Inputs in any other mode
(palette, CMYK, 16-bit, ...) are converted once at the start of an operation so that every
operation sees real pixel values rather than palette indices.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WORKING_MODES = ("L", "RGB", "RGBA")


def working_image(image: Image.Image) -> Image.Image:
    """Return ``image`` in ``L``, ``RGB`` or ``RGBA``, keeping transparency where it exists."""
    mode = image.mode
    if mode in WORKING_MODES:
        return image
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    if mode == "F" or mode.startswith("I"):
        return _wide_grey_to_l(image)
    return image.convert("RGB")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255, turning most photos white.
    values = np.asarray(image, dtype=np.float64)
    if values.size and values.max() > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def colour_image(image: Image.Image) -> Image.Image:
    """Return ``image`` as ``RGB`` or ``RGBA`` (for operations defined on colour)."""
    image = working_image(image)
    return image.convert("RGB") if image.mode == "L" else image


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Split a working image into its ``L``/``RGB`` part and its alpha band (or None)."""
    image = working_image(image)
    if image.mode == "RGBA":
        return image.convert("RGB"), image.getchannel("A")
    return image, None


def with_alpha(image: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """Put ``alpha`` back onto an ``L``/``RGB`` image; the result is RGBA when alpha exists."""
    if alpha is None:
        return image
    result = image.convert("RGB") if image.mode != "RGB" else image.copy()
    if alpha.size != result.size:
        alpha = alpha.resize(result.size, Image.Resampling.BICUBIC)
    result.putalpha(alpha)
    return result


def to_array(image: Image.Image) -> np.ndarray:
    """Return an ``L`` or ``RGB`` image as a float32 array of shape (height, width, bands)."""
    values = np.asarray(image, dtype=np.float32)
    return values[:, :, None] if values.ndim == 2 else values


def from_array(values: np.ndarray, mode: str) -> Image.Image:
    """Round and clip a (height, width, bands) array into an 8-bit ``L`` or ``RGB`` image."""
    pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if mode == "L":
        pixels = pixels.reshape(pixels.shape[0], pixels.shape[1])
    elif mode != "RGB" or pixels.shape[2] != 3:
        raise ValueError(f"from_array makes L or RGB images, not {mode} from shape {pixels.shape}")
    return Image.fromarray(pixels)
