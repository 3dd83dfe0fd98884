"""A task opens only files under the artifact directory: the path check itself (inside, a
``..`` escape, a symlink escape, an absolute path outside, the first task's image), and the
task runtime's refusal: one line in a failed PROGRESS, exit status 1, no traceback, nothing
opened."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

import services.runtime.runner as runner
from pipeline.invocation import TaskInvocation
from pipeline.protocol import Key, Progress, TaskStatus
from pipeline.settings import Settings
from services.catalog import get_task
from services.runtime.confinement import PathRefused, check_paths, check_under, is_under

ORDER_ID = 42


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts"
    (folder / f"order-{ORDER_ID}").mkdir(parents=True)
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A readable image outside the artifact directory, next to it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "secret.png")
    return folder / "secret.png"


def invocation(progress: tuple[str, ...], image: Path, tasks=("grayscale", "blur", "flip")) -> TaskInvocation:
    return TaskInvocation(ORDER_ID, tasks, tasks[len(progress)], progress, image)


# --- the check ---------------------------------------------------------------------------


def test_a_path_inside_the_artifact_directory_is_accepted(artifacts):
    inside = artifacts / f"order-{ORDER_ID}" / "00-grayscale.png"
    assert is_under(inside, artifacts)
    assert is_under(artifacts / "not-yet" / "made" / "x.png", artifacts)  # need not exist
    check_under("input", inside, artifacts)  # no error


def test_a_dotdot_escape_is_refused(artifacts, outside):
    escape = artifacts / f"order-{ORDER_ID}" / ".." / ".." / "elsewhere" / "secret.png"
    assert escape.exists()
    with pytest.raises(PathRefused) as refused:
        check_under("input", escape, artifacts)
    assert str(refused.value) == f"refused: input {escape} is outside the artifact directory {artifacts}"


def test_a_symlink_escape_is_refused_and_says_where_it_leads(artifacts, outside):
    link = artifacts / f"order-{ORDER_ID}" / "00-grayscale.png"
    link.symlink_to(outside)
    with pytest.raises(PathRefused) as refused:
        check_under("input", link, artifacts)
    real = os.path.realpath(outside)
    assert str(refused.value) == (f"refused: input {link} (resolving to {real}) is outside the "
                                  f"artifact directory {artifacts}")
    # A symlinked folder inside leads out just the same.
    (artifacts / "order-7").symlink_to(outside.parent, target_is_directory=True)
    assert not is_under(artifacts / "order-7" / "secret.png", artifacts)


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/shadow", "/", "relative/../../x"])
def test_an_absolute_or_relative_path_outside_is_refused(artifacts, path):
    with pytest.raises(PathRefused, match=r"^refused: input .* is outside the artifact directory "):
        check_under("input", path, artifacts)


def test_the_artifact_directory_itself_is_not_a_file_under_it(artifacts):
    assert not is_under(artifacts, artifacts)
    assert not is_under(artifacts / ".", artifacts)


def test_an_artifact_directory_reached_through_a_symlink_holds_its_files(tmp_path, artifacts):
    alias = tmp_path / "alias"
    alias.symlink_to(artifacts, target_is_directory=True)
    assert is_under(artifacts / "a.png", alias) and is_under(alias / "a.png", artifacts)


def test_the_first_task_reads_the_orders_image_from_anywhere(artifacts, outside):
    first = invocation((), outside)
    check_paths(first, [artifacts / f"order-{ORDER_ID}" / "00-grayscale.png"], artifacts)  # no error
    assert first.input_path == outside


def test_a_later_task_never_gets_the_image_exception(artifacts, outside):
    """Past position 0 the input is an earlier output, checked like every other one; the
    image named with --image is not what such a task opens."""
    second = invocation((str(outside),), outside)
    with pytest.raises(PathRefused, match=f"^refused: input {outside} is outside"):
        check_paths(second, [], artifacts)


def test_every_earlier_output_is_checked_not_only_the_input(artifacts):
    good = str(artifacts / f"order-{ORDER_ID}" / "01-blur.png")
    third = invocation(("/etc/passwd", good), Path("/tmp/image.png"))
    with pytest.raises(PathRefused, match="^refused: input /etc/passwd is outside"):
        check_paths(third, [], artifacts)


def test_an_output_that_leads_out_is_refused(artifacts, outside):
    target = artifacts / f"order-{ORDER_ID}" / "00-grayscale.png"
    target.with_name(target.name + ".partial").symlink_to(outside)
    with pytest.raises(PathRefused, match=r"^refused: output .*00-grayscale\.png\.partial \(resolving to"):
        check_paths(invocation((), outside), [target, target.with_name(target.name + ".partial")], artifacts)


# --- the task runtime --------------------------------------------------------------------


class RecordingProducer:
    """Stands in for the Kafka producer: keeps what the task sends."""

    sent: list = []

    def __init__(self, settings, **overrides) -> None:
        RecordingProducer.sent = []

    def send(self, message) -> None:
        RecordingProducer.sent.append(message)

    def flush(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def task_runtime(monkeypatch, tmp_path, artifacts):
    """run_task with a recording producer and every image open recorded (and refused)."""
    opened: list = []

    def no_open(path, *args, **kwargs):
        opened.append(path)
        raise AssertionError(f"the task opened {path}")

    monkeypatch.setattr(runner, "Producer", RecordingProducer)
    monkeypatch.setattr(runner.Image, "open", no_open)
    monkeypatch.setattr(runner, "_UNTIL_EXIT", [])
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state"), "ARTIFACT_DIR": str(artifacts)})
    return settings, opened


def test_a_task_given_a_forged_input_fails_with_one_line_and_opens_nothing(task_runtime, caplog, outside):
    settings, opened = task_runtime
    inv = invocation((str(outside),), Path("/tmp/order-image.png"))
    with caplog.at_level(logging.INFO):
        status = runner.run_task(get_task("blur"), inv, settings, threading.Event())

    assert status == runner.EXIT_FAILED
    assert opened == []
    line = f"refused: input {outside} is outside the artifact directory {settings.artifact_dir}"
    progress = Progress.decode(next(m for m in RecordingProducer.sent if m.key == Key.PROGRESS.value))
    assert (progress.status, progress.error, progress.index) == (TaskStatus.FAILED, line, 1)
    assert [m.key for m in RecordingProducer.sent] == ["ORDER", "PROGRESS", "HALT"]  # no STOP: retried
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"order_id={ORDER_ID} task=blur index=1 {line}"]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback anywhere
    assert not any(settings.artifact_dir.rglob("*.png*"))  # nothing written either


def test_a_task_whose_output_folder_leads_out_writes_nothing_there(task_runtime, tmp_path, outside):
    settings, opened = task_runtime
    (settings.artifact_dir / f"order-{ORDER_ID}").rmdir()
    (settings.artifact_dir / f"order-{ORDER_ID}").symlink_to(outside.parent, target_is_directory=True)
    status = runner.run_task(get_task("grayscale"), invocation((), outside), settings, threading.Event())

    assert status == runner.EXIT_FAILED and opened == []
    progress = Progress.decode(next(m for m in RecordingProducer.sent if m.key == Key.PROGRESS.value))
    assert progress.error.startswith(f"refused: output {settings.artifact_dir / f'order-{ORDER_ID}'}")
    assert sorted(p.name for p in outside.parent.iterdir()) == ["secret.png"]


def test_the_first_task_still_reads_the_orders_image_from_outside(monkeypatch, tmp_path, artifacts, outside):
    monkeypatch.setattr(runner, "Producer", RecordingProducer)
    monkeypatch.setattr(runner, "_UNTIL_EXIT", [])
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path / "state"), "ARTIFACT_DIR": str(artifacts)})
    inv = invocation((), outside)
    status = runner.run_task(get_task("grayscale"), inv, settings, threading.Event())

    assert status == 0
    progress = Progress.decode(next(m for m in RecordingProducer.sent if m.key == Key.PROGRESS.value))
    assert progress.status is TaskStatus.SUCCEEDED
    assert Path(progress.outputs[-1]) == runner.output_path(settings, inv, get_task("grayscale"))
    assert os.path.realpath(progress.outputs[-1]).startswith(os.path.realpath(artifacts) + os.sep)
