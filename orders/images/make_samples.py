"""Make the sample images the example orders use.

    python orders/images/make_samples.py          # writes next to this script

Synthetic scenes (deterministic: fixed seeds, no clock, no network):

- ``scene-640x480.jpg``   RGB, sky gradient, sun, hills, houses, sensor noise
- ``scene-1024x768.jpg``  RGB, the same kind of scene at a larger size (heavier tasks)
- ``pattern-320x320.png`` grayscale (mode L), rings and a checkerboard: hard edges for
  edge_detect and sharpen, flat areas for equalize

When scikit-learn is installed, its two bundled photographs are copied as well
(``china.jpg``, ``flower.jpg``, 640x427, CC BY 2.0, see README.md for attribution): real
photos give the tasks realistic texture. The script never downloads anything.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB landscape: smooth gradients, solid shapes and mild noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    sky = np.stack(
        [90 + 120 * y + 0 * x, 140 + 90 * y + 0 * x, 230 - 40 * y + 0 * x], axis=-1
    )
    image = Image.fromarray(sky.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    sun_x, sun_y, sun_r = width * 0.78, height * 0.22, min(width, height) * 0.08
    draw.ellipse((sun_x - sun_r, sun_y - sun_r, sun_x + sun_r, sun_y + sun_r), fill=(255, 221, 120))

    # Hills as sums of sines, so each seed gives a different but smooth skyline.
    for layer, colour in enumerate([(70, 130, 60), (50, 105, 45), (35, 80, 35)]):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        xs = np.arange(width + 1)
        base = height * (0.55 + 0.12 * layer)
        ridge = base + height * 0.06 * sum(
            np.sin(xs / width * (k + 1) * 2 * np.pi + phase[k]) / (k + 1) for k in range(3)
        )
        draw.polygon([(0, height)] + list(zip(xs.tolist(), ridge.tolist())) + [(width, height)], fill=colour)

    for _ in range(6):
        w = int(rng.integers(width // 20, width // 10))
        h = int(w * rng.uniform(0.6, 1.0))
        left = int(rng.integers(0, width - w))
        bottom = int(height * rng.uniform(0.82, 0.97))
        wall = tuple(int(c) for c in rng.integers(150, 240, size=3))
        draw.rectangle((left, bottom - h, left + w, bottom), fill=wall, outline=(40, 40, 40))
        roof = [(left - 3, bottom - h), (left + w + 3, bottom - h), (left + w // 2, bottom - h - w // 2)]
        draw.polygon(roof, fill=(150, 50, 40))
        draw.rectangle((left + w // 3, bottom - h // 2, left + 2 * w // 3, bottom), fill=(90, 60, 40))

    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, size=(height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")


def pattern(size: int) -> Image.Image:
    """A grayscale test card: concentric rings over a checkerboard, with a dark margin."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = (size - 1) / 2
    radius = np.hypot(x - centre, y - centre)
    rings = 0.5 + 0.5 * np.cos(radius / size * 24 * np.pi)
    checker = ((x // (size // 8) + y // (size // 8)) % 2).astype(np.float32)
    values = np.where(radius < size * 0.4, rings, 0.3 + 0.4 * checker)
    # A narrow dynamic range, so that equalize visibly stretches it.
    values = 40 + 150 * values
    values[:8, :] = values[-8:, :] = values[:, :8] = values[:, -8:] = 20
    return Image.fromarray(values.astype(np.uint8), "L")


def copy_sklearn_photos(out_dir: Path) -> list[Path]:
    """Copy scikit-learn's bundled photos into ``out_dir``; none when it is not installed."""
    try:
        from sklearn.datasets import images as sk_images
    except ImportError:
        return []
    source = Path(sk_images.__file__).resolve().parent
    copied = []
    for name in SKLEARN_PHOTOS:
        if (source / name).is_file():
            copied.append(Path(shutil.copyfile(source / name, out_dir / name)))
    return copied


def make_samples(out_dir: Path = HERE) -> list[Path]:
    """Write every sample image into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in [
        ("scene-640x480.jpg", scene(640, 480, seed=1)),
        ("scene-1024x768.jpg", scene(1024, 768, seed=2)),
    ]:
        # Fixed quality and no optimize pass: the same bytes on every run.
        image.save(out_dir / name, "JPEG", quality=88)
        written.append(out_dir / name)
    pattern(320).save(out_dir / "pattern-320x320.png", "PNG")
    written.append(out_dir / "pattern-320x320.png")
    return written + copy_sklearn_photos(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: %(default)s)")
    args = parser.parse_args()
    for path in make_samples(args.out):
        with Image.open(path) as image:
            size_kib = path.stat().st_size // 1024
            print(f"{path.name}: {image.width}x{image.height} {image.mode}, {size_kib} KiB")


if __name__ == "__main__":
    main()
