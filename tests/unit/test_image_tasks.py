"""The image tasks and their catalog: every task on every kind of input, and parameter checks."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from services.catalog import SERVICES_DIR, UnknownTaskError, all_tasks, get_task, task_module, work_powers
from services.runtime.spec import TASK_NAME_PATTERN, ImageTask, Param, TaskParameterError

TASKS = all_tasks()
MODES = ("RGB", "RGBA", "L", "P")
WIDTH, HEIGHT = 64, 48


def noise(seed: int = 0, mean: float = 128, spread: float = 30, bands: int = 3) -> np.ndarray:
    """Gaussian noise as uint8, shape (HEIGHT, WIDTH, bands), kept clear of clipping."""
    values = np.random.default_rng(seed).normal(mean, spread, (HEIGHT, WIDTH, bands))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def gradient() -> np.ndarray:
    """A smooth colour ramp, shape (HEIGHT, WIDTH, 3), float."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, (x + y) * 255 / (WIDTH + HEIGHT)], axis=2)


def make_image(mode: str) -> Image.Image:
    """A small test image in ``mode``: noisy ramp, with a varying alpha for RGBA."""
    ramp = np.clip(gradient() + noise(spread=25).astype(float) - 128, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(ramp)
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        rgba = rgb.copy()
        rgba.putalpha(Image.linear_gradient("L").resize((WIDTH, HEIGHT)))
        return rgba
    if mode == "L":
        return rgb.convert("L")
    return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)


def expected_mode(task_name: str, input_mode: str) -> str:
    """The mode a task's output has for an input of ``input_mode`` (palette works as RGB)."""
    if task_name in ("grayscale", "edge_detect"):
        return "L"
    working = "RGB" if input_mode == "P" else input_mode
    if task_name == "jpeg" and working == "RGBA":
        return "RGB"
    if task_name == "sepia" and working == "L":
        return "RGB"
    return working


def expected_size(task_name: str) -> tuple[int, int]:
    """The output size of a task with default parameters on a WIDTH x HEIGHT input."""
    return {
        "resize": (WIDTH // 2, HEIGHT // 2),
        "rotate": (HEIGHT, WIDTH),
        "upscale": (WIDTH * 2, HEIGHT * 2),
    }.get(task_name, (WIDTH, HEIGHT))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


# --- the catalog -------------------------------------------------------------------------


def test_catalog_has_at_least_ten_tasks_sorted_by_name():
    assert len(TASKS) >= 10
    assert list(TASKS) == sorted(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_task_names_follow_the_protocol_and_match_their_key(name):
    assert TASK_NAME_PATTERN.fullmatch(name)
    assert TASKS[name].name == name
    assert get_task(name) is TASKS[name]


def test_unknown_task_error_lists_the_known_tasks():
    with pytest.raises(UnknownTaskError) as caught:
        get_task("blurr")
    message = str(caught.value)
    assert "'blurr'" in message
    assert all(name in message for name in TASKS)
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, PipelineError)
    with pytest.raises(UnknownTaskError):
        task_module("blurr")


@pytest.mark.parametrize("name", TASKS)
def test_every_task_folder_is_a_buildable_service(name):
    folder = SERVICES_DIR / name.replace("-", "_")
    module = task_module(name)
    assert module == f"services.{folder.name}.main"
    assert importlib.util.find_spec(module) is not None
    for file in ("__init__.py", "main.py", "Dockerfile", "requirements.txt"):
        assert (folder / file).is_file(), f"{folder / file} is missing"
    dockerfile = (folder / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert f'ENTRYPOINT ["python", "-m", "{module}"]' in dockerfile
    assert f"COPY services/{folder.name}/requirements.txt" in dockerfile
    assert "COPY pipeline/" in dockerfile and "COPY services/" in dockerfile
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    requirements = (folder / "requirements.txt").read_text().lower()
    for package in ("pillow", "numpy", "confluent-kafka", "psutil"):
        assert package in requirements
    assert 'raise SystemExit(main(TASK))' in (folder / "main.py").read_text()


# --- every task on every kind of input ----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TASKS)
def test_task_runs_on_each_input_mode(name, mode):
    task = TASKS[name]
    image = make_image(mode)
    before = image.tobytes()
    output = task.run(image, None)
    assert isinstance(output, Image.Image)
    assert output.mode == expected_mode(name, mode)
    assert output.size == expected_size(name)
    assert image.tobytes() == before, "the input image must not be modified"
    # The runtime saves the output in the task's format; that must work for this mode.
    output.save(io.BytesIO(), task.output_format)


@pytest.mark.parametrize("name", TASKS)
def test_task_is_deterministic(name):
    first = TASKS[name].run(make_image("RGBA"), {})
    second = TASKS[name].run(make_image("RGBA"), {})
    assert first.mode == second.mode and first.tobytes() == second.tobytes()


# --- what each task does to pixels --------------------------------------------------------


def test_resize_to_width_and_height():
    image = make_image("RGB")
    assert get_task("resize").run(image, {"width": 32, "height": 24}).size == (32, 24)
    assert get_task("resize").run(image, {"width": 32}).size == (32, 24)
    assert get_task("resize").run(image, {"height": 96}).size == (128, 96)
    assert get_task("resize").run(image, {"scale": 0.25}).size == (16, 12)


def test_resize_rejects_scale_with_width():
    with pytest.raises(TaskParameterError, match="scale"):
        get_task("resize").resolve_params({"scale": 2, "width": 10})


def test_grayscale_gives_luminance():
    image = make_image("RGB")
    output = get_task("grayscale").run(image)
    assert output.mode == "L"
    assert output.tobytes() == image.convert("L").tobytes()


def test_blur_lowers_variance_more_with_a_larger_radius():
    image = Image.fromarray(noise())
    original = pixels(image).std()
    light = pixels(get_task("blur").run(image, {"radius": 1})).std()
    strong = pixels(get_task("blur").run(image, {"radius": 5})).std()
    assert strong < light < original * 0.7


def test_sharpen_raises_variance():
    smooth = Image.fromarray(noise(spread=15))
    output = get_task("sharpen").run(smooth, {"radius": 2, "percent": 200, "threshold": 0})
    assert pixels(output).std() > pixels(smooth).std() * 1.3


def test_rotate_by_right_angles_is_exact():
    image = make_image("RGB")
    turned = get_task("rotate").run(image, {"degrees": 90, "expand": True})
    assert turned.size == (HEIGHT, WIDTH)
    assert turned.tobytes() == image.transpose(Image.Transpose.ROTATE_90).tobytes()
    assert get_task("rotate").run(image, {"degrees": 180}).tobytes() == image.rotate(180).tobytes()


def test_rotate_expand_controls_the_canvas():
    image = make_image("RGBA")
    kept = get_task("rotate").run(image, {"degrees": 30, "expand": False})
    grown = get_task("rotate").run(image, {"degrees": 30, "expand": True})
    assert kept.size == (WIDTH, HEIGHT)
    assert grown.width > WIDTH and grown.height > HEIGHT
    assert grown.getpixel((0, 0))[3] == 0, "uncovered corners are transparent"


def test_edge_detect_finds_edges_and_nothing_in_flat_areas():
    flat = Image.new("RGB", (WIDTH, HEIGHT), (90, 140, 200))
    assert pixels(get_task("edge_detect").run(flat)).max() == 0
    step = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    step[:, WIDTH // 2 :] = 255
    edges = pixels(get_task("edge_detect").run(Image.fromarray(step)))
    assert edges[:, WIDTH // 2 - 1 : WIDTH // 2 + 1].min() == 255
    assert edges[:, : WIDTH // 2 - 2].max() == 0 and edges[:, WIDTH // 2 + 2 :].max() == 0


def test_equalize_spreads_a_narrow_histogram():
    narrow = Image.fromarray(np.clip(noise(mean=110, spread=4), 100, 120)).convert("L")
    for image in (narrow, narrow.convert("RGB")):
        output = pixels(get_task("equalize").run(image))
        assert output.max() - output.min() > 200


def test_denoise_brings_a_noisy_image_closer_to_the_clean_one():
    clean = gradient()
    noisy = np.clip(clean + noise(spread=20).astype(float) - 128, 0, 255).astype(np.uint8)
    output = pixels(get_task("denoise").run(Image.fromarray(noisy), {"strength": 20}))
    before = np.mean((noisy - clean) ** 2)
    after = np.mean((output - clean) ** 2)
    assert after < before * 0.2


def test_denoise_keeps_edges_sharp():
    step = np.where(np.arange(WIDTH) < WIDTH // 2, 40.0, 215.0)[None, :, None]
    noisy = np.clip(step + noise(spread=10).astype(float) - 128, 0, 255).astype(np.uint8)
    output = pixels(get_task("denoise").run(Image.fromarray(noisy), {"strength": 10}))
    assert output[:, : WIDTH // 2].max() < 90 and output[:, WIDTH // 2 :].min() > 165


def test_jpeg_error_grows_as_quality_drops():
    image = make_image("RGB")
    task = get_task("jpeg")
    assert task.output_format == "JPEG"

    def error(quality):
        return np.abs(pixels(task.run(image, {"quality": quality})) - pixels(image)).mean()

    assert 0 < error(95) < error(40) < error(5)


def test_watermark_marks_its_corner_only():
    image = Image.new("RGB", (WIDTH * 4, HEIGHT * 4), (30, 60, 90))
    marked = pixels(get_task("watermark").run(image, {"position": "bottom-right", "size": 0.2}))
    untouched = pixels(image)
    half_h, half_w = image.height // 2, image.width // 2
    assert (marked[half_h:, half_w:] != untouched[half_h:, half_w:]).any()
    assert (marked[:half_h, :half_w] == untouched[:half_h, :half_w]).all()
    invisible = get_task("watermark").run(image, {"opacity": 0})
    assert invisible.tobytes() == image.tobytes()


def test_upscale_shrinks_back_to_the_original():
    image = make_image("RGB")
    output = get_task("upscale").run(image, {"factor": 2, "iterations": 10})
    assert output.size == (WIDTH * 2, HEIGHT * 2)
    plain = image.resize(output.size, Image.Resampling.BICUBIC)

    def round_trip_error(large):
        return np.abs(pixels(large.resize(image.size, Image.Resampling.BOX)) - pixels(image)).mean()

    assert round_trip_error(output) < round_trip_error(plain) * 0.5


def test_median_removes_salt_and_pepper():
    values = np.full((HEIGHT, WIDTH), 128, dtype=np.uint8)
    spots = np.random.default_rng(1).random((HEIGHT, WIDTH))
    values[spots < 0.05] = 0
    values[spots > 0.95] = 255
    output = pixels(get_task("median").run(Image.fromarray(values), {"size": 3, "passes": 1}))
    assert np.count_nonzero(output != 128) < np.count_nonzero(values != 128) * 0.1


def test_flip_mirrors_and_twice_restores():
    image = make_image("RGB")
    flipped = get_task("flip").run(image, {"direction": "horizontal"})
    assert flipped.tobytes() == image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    assert get_task("flip").run(flipped).tobytes() == image.tobytes()
    upside = get_task("flip").run(image, {"direction": "vertical"})
    assert upside.tobytes() == image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).tobytes()


def test_contrast_factor_flattens_or_boosts():
    image = Image.fromarray(noise())
    assert pixels(get_task("contrast").run(image, {"factor": 0})).std() < 1
    assert pixels(get_task("contrast").run(image, {"factor": 2})).std() > pixels(image).std() * 1.5
    assert get_task("contrast").run(image, {"factor": 1}).tobytes() == image.tobytes()


def test_sepia_tones_grey_brown():
    grey = Image.new("L", (WIDTH, HEIGHT), 120)
    red, green, blue = get_task("sepia").run(grey).getpixel((0, 0))
    assert red > green > blue


# --- parameters ---------------------------------------------------------------------------


def test_defaults_are_filled():
    assert get_task("blur").resolve_params(None) == {"radius": 2.0}
    assert get_task("rotate").resolve_params({"degrees": 45}) == {"degrees": 45.0, "expand": True}
    assert get_task("grayscale").resolve_params({}) == {}


@pytest.mark.parametrize("name", TASKS)
def test_every_task_resolves_its_own_defaults(name):
    task = TASKS[name]
    defaults = {key: p.default for key, p in task.params.items() if p.default is not None}
    assert task.resolve_params(defaults) == task.resolve_params(None)


def test_int_is_accepted_for_float_and_returned_as_float():
    value = get_task("blur").resolve_params({"radius": 3})["radius"]
    assert value == 3.0 and isinstance(value, float)


@pytest.mark.parametrize(
    ("task", "params", "words"),
    [
        ("blur", {"radious": 2}, ["'blur'", "unknown parameter 'radious'", "radius"]),
        ("grayscale", {"level": 1}, ["'level'", "no parameters"]),
        ("blur", {"radius": "abc"}, ["'blur'", "'radius'", "a number between 0.1 and 50", "'abc'"]),
        ("blur", {"radius": "3"}, ["'radius'", "'3'"]),
        ("blur", {"radius": 80}, ["'radius'", "between 0.1 and 50", "80"]),
        ("blur", {"radius": float("nan")}, ["'radius'", "nan"]),
        ("blur", {"radius": True}, ["'radius'", "True"]),
        ("sharpen", {"percent": True}, ["'sharpen'", "'percent'", "an integer", "True"]),
        ("sharpen", {"percent": 1.5}, ["'percent'", "an integer", "1.5"]),
        ("rotate", {"expand": "yes"}, ["'expand'", "true or false", "'yes'"]),
        ("rotate", {"expand": 1}, ["'expand'", "true or false"]),
        ("flip", {"direction": "diagonal"}, ["'direction'", "'horizontal'", "'diagonal'"]),
        ("watermark", {"text": ""}, ["'text'", "1 to 200 characters"]),
        ("jpeg", {"quality": 0}, ["'quality'", "between 1 and 95", "0"]),
        ("blur", {"fault": "crash"}, ["'fault'", "reserved"]),
        ("blur", {"fault_at": 0.5}, ["'fault_at'", "reserved"]),
    ],
)
def test_bad_parameters_raise_one_clear_line(task, params, words):
    with pytest.raises(TaskParameterError) as caught:
        get_task(task).resolve_params(params)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PipelineError)


def test_run_validates_before_touching_the_image():
    with pytest.raises(TaskParameterError, match="'radius'"):
        get_task("blur").run(make_image("RGB"), {"radius": -1})


def test_definitions_are_checked():
    with pytest.raises(TypeError):
        Param(int, "ten")
    with pytest.raises(TypeError):
        Param(list, [])
    with pytest.raises(TypeError, match="work"):
        Param(str, "a", work=1.0)  # a name has no magnitude for work to grow with
    with pytest.raises(TypeError, match="work"):
        Param(int, 1, work=-1.0)
    with pytest.raises(ValueError):
        ImageTask(name="Blur", summary="x", params={}, apply=lambda image, params: image)
    with pytest.raises(ValueError):
        ImageTask(name="x", summary="x", params={"fault": Param(str, "")}, apply=lambda i, p: i)


def test_the_catalog_declares_how_the_heavy_tasks_work_grows_with_their_settings():
    powers = work_powers()
    assert powers["median"] == {"size": 1.8, "passes": 0.6}
    assert powers["upscale"]["factor"] == 2.0 and powers["denoise"]["patch"] == 0.0
    assert "jpeg" not in powers  # its quality's cost is not a power: not declared, learnt where it varies
