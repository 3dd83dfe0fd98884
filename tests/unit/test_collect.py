"""``python -m training collect``: the plan it writes (no orders are run here: that is the
integration tests' and bench/detection.py's part)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.entry import exit_status
from training import cli
from training.collect import (DEFAULT_VARIANTS, CollectPlan, make_image, parse_levels, parse_modes, parse_sequences,
                              parse_sizes, write_orders)


def test_the_plan_varies_image_size_task_sequence_and_concurrency(tmp_path):
    plan = CollectPlan(sizes=((64, 48), (128, 96)), concurrency=(1, 4),
                       sequences=(("median", "grayscale"), ("denoise",)), orders=4, seed=3)
    files = write_orders(plan, tmp_path)
    assert sorted(files) == [1, 4] and all(len(f) == 4 for f in files.values())
    documents = [json.loads(path.read_text()) for level in files.values() for path in level]
    names = {tuple(t if isinstance(t, str) else t["name"] for t in d["tasks"]) for d in documents}
    assert names == {("median", "grayscale"), ("denoise",)}
    # a task with parameter settings to vary takes the next one each time it appears
    medians = [t["params"] for d in documents for t in d["tasks"] if isinstance(t, dict) and t["name"] == "median"]
    assert len({json.dumps(p, sort_keys=True) for p in medians}) == min(len(medians), len(DEFAULT_VARIANTS["median"]))
    inputs = set()
    for document in documents:
        with Image.open(document["image"]) as image:
            inputs.add((image.size, image.mode))
    # every size in colour and in grey: the work model learns what a channel costs from both
    assert inputs == {(size, mode) for size in ((64, 48), (128, 96)) for mode in ("RGB", "L")}
    assert {d["id"].split("-")[1] for d in documents} == {"c1", "c4"}  # the level is in the name


def test_generated_images_are_repeatable_and_differ_by_seed():
    first, again, other = make_image(96, 64, 1), make_image(96, 64, 1), make_image(96, 64, 2)
    assert first.tobytes() == again.tobytes() != other.tobytes()
    assert first.size == (96, 64) and first.mode == "RGB"


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "640by480"], "--sizes '640by480': expected WIDTHxHEIGHT"),
    (["--concurrency", "0,4"], "--concurrency: every level must be at least 1"),
    (["--modes", "RGB,CMYK"], "--modes 'RGB,CMYK': give RGB, L or both"),
    (["--sequences", "median,no-such-task"], "no-such-task"),
])
def test_bad_arguments_are_one_line_and_status_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path))
    assert exit_status(lambda: cli.main(["collect", *argv])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_parsers_read_what_the_help_shows():
    assert parse_sizes("640x480,1024X768") == ((640, 480), (1024, 768))
    assert parse_levels("1,4,8") == (1, 4, 8)
    assert parse_modes("RGB, L") == ("RGB", "L")
    assert parse_sequences("median,grayscale; denoise") == (("median", "grayscale"), ("denoise",))
