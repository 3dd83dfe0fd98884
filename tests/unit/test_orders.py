"""Order files: the examples load, good variants are understood, bad ones fail in one line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.order_schema import order_schema
from orchestrator.orders import (
    FAULT_TYPES,
    OrderError,
    RetryPolicy,
    TaskSpec,
    load_order,
    load_orders,
)
from services import catalog
from services.runtime.spec import TASK_NAME_PATTERN

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "orders").glob("example-*.json"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder holding ``images/small.png``, where tests write order files."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(tmp_path / "images" / "small.png")
    return tmp_path


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block as user 'nobody' when the tests run as root (as in CI), so that file
    permissions apply; a no-op for any other user."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """Like ``folder``, but reachable by 'nobody' (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="orders-perm-"))
    try:
        path.chmod(0o755)
        (path / "images").mkdir(mode=0o755)
        Image.new("RGB", (16, 12), (200, 30, 30)).save(path / "images" / "small.png")
        (path / "images" / "small.png").chmod(0o644)
        yield path
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def write_order(folder: Path, document: object, name: str = "order.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def minimal(**fields: object) -> dict:
    return {"id": "test-order", "image": "images/small.png", "tasks": ["grayscale"], **fields}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# --- the examples -------------------------------------------------------------------------


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_with_full_parameters(path: Path) -> None:
    order = load_order(path)

    assert order.source == path.resolve()
    assert order.image.is_absolute() and order.image.is_file()
    assert order.image.is_relative_to(REPO / "orders" / "images")
    for task in order.tasks:
        # Downstream sees every parameter of the task, defaults included.
        assert set(task.params) == set(catalog.get_task(task.name).params)


def test_examples_cover_the_documented_cases() -> None:
    orders = {path.name: load_order(path) for path in EXAMPLES}

    assert orders["example-simple.json"].task_names == ("resize", "grayscale", "edge_detect")
    assert orders["example-simple.json"].required_tasks == "resize,grayscale,edge_detect"
    assert orders["example-repeated.json"].task_names == ("blur", "blur", "sharpen")
    assert [t.params["radius"] for t in orders["example-repeated.json"].tasks[:2]] == [1.5, 3.0]
    assert {"denoise", "equalize", "rotate", "jpeg"} <= set(orders["example-heavy.json"].task_names)
    assert orders["example-heavy.json"].retry == RetryPolicy(2, 2.0, 900.0)
    assert orders["example-original-names.json"].name == "original-names"
    assert "watermark" in orders["example-watermark.json"].task_names
    blur = orders["example-fault.json"].tasks[1]
    assert (blur.name, blur.fault, blur.fault_at) == ("blur", "cpu_hog", 2.0)
    denoise = orders["example-regression.json"].tasks[1]
    assert (denoise.name, denoise.fault, denoise.fault_factor) == ("denoise", "double_write", 1.5)


def test_loading_the_examples_changes_nothing_in_the_repository() -> None:
    before = snapshot(REPO / "orders")
    load_orders(EXAMPLES)
    assert snapshot(REPO / "orders") == before


# --- good variants ------------------------------------------------------------------------


def test_relative_image_is_resolved_against_the_order_files_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder / "orders").mkdir()
    path = write_order(folder / "orders", minimal(image="../images/small.png"))
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    order = load_order(os.path.relpath(path))

    assert order.image == (folder / "images" / "small.png").resolve()
    assert order.source == path.resolve()


def test_absolute_image_path_is_kept(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    image = (folder / "images" / "small.png").resolve()
    other = tmp_path_factory.mktemp("other")
    order = load_order(write_order(other, minimal(image=str(image))))
    assert order.image == image


def test_defaults(folder: Path) -> None:
    order = load_order(write_order(folder, minimal(tasks=["blur"])))

    assert order.name == "test-order"
    assert order.retry == RetryPolicy() == RetryPolicy(3, 1.0, 300.0)
    assert order.tasks == (TaskSpec("blur", catalog.get_task("blur").resolve_params({})),)
    assert order.tasks[0].fault is None and order.tasks[0].fault_at == 0.0
    assert order.description == ""


@pytest.mark.parametrize(
    "document",
    [
        {"orderID": "legacy", "image": "images/small.png", "required_tasks": ["blur", "grayscale"]},
        {"orderID": "legacy", "image": "images/small.png", "required_tasks": "blur,grayscale"},
    ],
    ids=["list", "comma-joined"],
)
def test_original_field_names_are_accepted(folder: Path, document: dict) -> None:
    order = load_order(write_order(folder, document))
    assert (order.name, order.required_tasks) == ("legacy", "blur,grayscale")


def test_numeric_original_order_id_becomes_the_name(folder: Path) -> None:
    document = {"orderID": 42, "image": "images/small.png", "required_tasks": ["grayscale"]}
    assert load_order(write_order(folder, document)).name == "42"


def test_fault_may_also_sit_in_params(folder: Path) -> None:
    task = {"name": "blur", "params": {"radius": 3, "fault": "stall", "fault_at": 1.5}}
    spec = load_order(write_order(folder, minimal(tasks=[task]))).tasks[0]
    assert (spec.fault, spec.fault_at) == ("stall", 1.5)
    assert "fault" not in spec.params and spec.params["radius"] == 3.0


def test_two_files_may_share_an_order_id(folder: Path) -> None:
    first = write_order(folder, minimal(), "a.json")
    second = write_order(folder, minimal(), "b.json")
    assert [order.name for order in load_orders([first, second])] == ["test-order"] * 2


# --- bad input: one line naming the file and the problem -----------------------------------


def assert_order_error(path: Path | str, *fragments: str) -> str:
    with pytest.raises(OrderError) as caught:
        load_order(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(folder: Path) -> None:
    assert_order_error(folder / "nope.json", "order file not found")


def test_folder_instead_of_file(folder: Path) -> None:
    assert_order_error(folder / "images", "is a folder")


def test_unreadable_file(open_folder: Path) -> None:
    path = write_order(open_folder, minimal())
    path.chmod(0)
    with unprivileged():
        assert_order_error(path, "cannot read the order file", "ermission denied")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('{"id": "x",\n  "image": "a.png"\n  "tasks": []}', ["not valid JSON", "line 3, column 3"]),
        ("", ["not valid JSON", "line 1, column 1"]),
        ('{"id": "x", "id": "y"}', ["'id' appears twice"]),
        ('{"id": NaN}', ["NaN is not valid JSON"]),
        ('["blur"]', ["must hold a JSON object", "found an array"]),
        ("42", ["must hold a JSON object"]),
    ],
    ids=["syntax", "empty", "duplicate-key", "nan", "array", "number"],
)
def test_not_an_order_object(folder: Path, text: str, fragments: list[str]) -> None:
    path = folder / "order.json"
    path.write_text(text, encoding="utf-8")
    assert_order_error(path, *fragments)


def test_not_utf8(folder: Path) -> None:
    path = folder / "order.json"
    path.write_bytes(b'{"id": "caf\xe9"}')
    assert_order_error(path, "not UTF-8 text")


BAD_DOCUMENTS = {
    "both-id-spellings": (minimal(orderID="x"), ["both 'id' and 'orderID'"]),
    "both-task-spellings": (minimal(required_tasks=["blur"]), ["both 'tasks' and 'required_tasks'"]),
    "no-id": ({"image": "images/small.png", "tasks": ["blur"]}, ["missing required field 'id'", "'orderID'"]),
    "no-tasks": ({"id": "x", "image": "images/small.png"}, ["missing required field 'tasks'"]),
    "no-image": ({"id": "x", "tasks": ["blur"]}, ["missing required field 'image'"]),
    "unknown-field": (minimal(colour="red"), ["unknown field 'colour'", "allowed fields:"]),
    "empty-tasks": (minimal(tasks=[]), ["$.tasks", "task list is empty"]),
    "empty-required-tasks": (
        {"orderID": "x", "image": "images/small.png", "required_tasks": []},
        ["$.required_tasks", "task list is empty"],
    ),
    "bad-id": (minimal(id="my order"), ["$.id", "'my order'", "letters, digits"]),
    "id-not-string": (minimal(id=["x"]), ["$.id", "expected a string, got an array"]),
    "empty-image": (minimal(image=""), ["$.image", "must not be empty"]),
    "task-not-name-or-object": (minimal(tasks=["blur", 5]), ["$.tasks[1]", "task name or a task object"]),
    "task-name-case": (minimal(tasks=["Blur"]), ["$.tasks[0]", "'Blur'", "lowercase"]),
    "task-unknown-key": (
        minimal(tasks=[{"name": "blur", "parms": {}}]), ["$.tasks[0]", "unknown field 'parms'"]
    ),
    "task-without-name": (minimal(tasks=[{"params": {}}]), ["$.tasks[0]", "missing required field 'name'"]),
    "params-not-object": (
        minimal(tasks=[{"name": "blur", "params": [1]}]), ["$.tasks[0].params", "expected an object"]
    ),
    "unknown-task": (
        minimal(tasks=["grayscale", "blurr"]),
        ["task 2 ('blurr'): unknown task; known tasks:", "blur, ", "edge_detect"],
    ),
    "unknown-param": (
        minimal(tasks=[{"name": "blur", "params": {"radiuss": 2}}]),
        ["task 1 ('blur'):", "'radiuss'", "radius"],
    ),
    "bad-param-value": (
        minimal(tasks=[{"name": "blur", "params": {"radius": "big"}}]),
        ["task 1 ('blur'):", "'radius'", "'big'"],
    ),
    "bad-fault": (
        minimal(tasks=[{"name": "blur", "fault": "explode"}]),
        ["$.tasks[0].fault", "'explode'", ", ".join(FAULT_TYPES)],
    ),
    "bad-fault-in-params": (
        minimal(tasks=[{"name": "blur", "params": {"fault": "explode"}}]),
        ["$.tasks[0].params.fault", "'explode'", ", ".join(FAULT_TYPES)],
    ),
    "negative-fault-at": (
        minimal(tasks=[{"name": "blur", "fault": "stall", "fault_at": -1}]),
        ["$.tasks[0].fault_at", ">= 0"],
    ),
    "negative-fault-at-in-params": (
        minimal(tasks=[{"name": "blur", "params": {"fault": "stall", "fault_at": -1}}]),
        ["$.tasks[0].params.fault_at", ">= 0"],
    ),
    "fault-at-without-fault": (
        minimal(tasks=[{"name": "blur", "fault_at": 3}]),
        ["$.tasks[0]", "'fault_at' needs 'fault'"],
    ),
    "fault-at-without-fault-in-params": (
        minimal(tasks=[{"name": "blur", "params": {"fault_at": 3}}]),
        ["$.tasks[0].params", "'fault_at' needs 'fault'"],
    ),
    "fault-twice": (
        minimal(tasks=[{"name": "blur", "fault": "raise", "params": {"fault": "raise"}}]),
        ["task 1 ('blur'): 'fault' given both in the task and in its params"],
    ),
    "retry-zero-attempts": (minimal(retry={"max_attempts": 0}), ["$.retry.max_attempts", ">= 1"]),
    "retry-zero-timeout": (
        minimal(retry={"task_timeout_seconds": 0}), ["$.retry.task_timeout_seconds", "> 0"]
    ),
    "retry-unknown-key": (minimal(retry={"attempts": 2}), ["$.retry", "unknown field 'attempts'"]),
    "missing-image": (minimal(image="images/none.png"), ["image 'images/none.png' not found"]),
    "image-is-folder": (minimal(image="images"), ["image 'images' is a folder"]),
}


@pytest.mark.parametrize(("document", "fragments"), BAD_DOCUMENTS.values(), ids=BAD_DOCUMENTS.keys())
def test_bad_order(folder: Path, document: dict, fragments: list[str]) -> None:
    assert_order_error(write_order(folder, document, "bad.json"), *fragments)


def test_message_names_the_file_as_given(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_order(folder, minimal(tasks=["blurr"]), "bad.json")
    monkeypatch.chdir(folder)
    message = assert_order_error("bad.json", "unknown task")
    assert message.startswith("bad.json: task 1 ('blurr'): unknown task; known tasks: ")


def test_image_that_is_not_an_image(folder: Path) -> None:
    (folder / "images" / "fake.png").write_text("not a picture", encoding="utf-8")
    path = write_order(folder, minimal(image="images/fake.png"))
    assert_order_error(path, "image 'images/fake.png' is not an image file")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(folder: Path, fmt: str) -> None:
    whole = folder / "images" / "whole.img"
    Image.effect_noise((64, 64), 40).convert("RGB").save(whole, fmt)
    data = whole.read_bytes()
    (folder / "images" / "cut.img").write_bytes(data[: len(data) // 2])
    path = write_order(folder, minimal(image="images/cut.img"))
    assert_order_error(path, "image 'images/cut.img' is damaged or unreadable")


def test_unreadable_image(open_folder: Path) -> None:
    path = write_order(open_folder, minimal())
    path.chmod(0o644)
    (open_folder / "images" / "small.png").chmod(0)
    with unprivileged():
        assert_order_error(path, "cannot be read: permission denied")


# --- several files ------------------------------------------------------------------------


def test_same_file_twice_is_rejected(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_order(folder, minimal())
    with pytest.raises(OrderError, match="given twice"):
        load_orders([path, path])

    (folder / "sub").mkdir()
    monkeypatch.chdir(folder / "sub")
    expected = r"^\.\./order\.json: given twice \(the same file as .*order\.json\)$"
    with pytest.raises(OrderError, match=expected):
        load_orders([path, "../order.json"])


def test_same_file_through_a_symlink_is_rejected(folder: Path) -> None:
    path = write_order(folder, minimal())
    link = folder / "link.json"
    link.symlink_to(path)
    with pytest.raises(OrderError, match="link.json: given twice"):
        load_orders([path, link])


def test_load_orders_stops_at_the_first_bad_file(folder: Path) -> None:
    good = write_order(folder, minimal(), "good.json")
    bad = write_order(folder, minimal(tasks=[]), "bad.json")
    with pytest.raises(OrderError, match="bad.json: "):
        load_orders([good, bad])


def test_loading_creates_nothing(folder: Path) -> None:
    good = write_order(folder, minimal(tasks=["resize", "blur"]), "good.json")
    bad = write_order(folder, minimal(image="images/none.png"), "bad.json")
    before = snapshot(folder)

    load_orders([good])
    with pytest.raises(OrderError):
        load_order(bad)

    assert snapshot(folder) == before


# --- the dataclasses and the schema agree with the code ------------------------------------


def test_a_loaded_order_is_its_own_order_file(folder: Path) -> None:
    """What submit uploads: the checked order, written out, loads as the same order."""
    task = {"name": "blur", "params": {"radius": 3, "fault": "stall", "fault_at": 1.5},
            "resources": {"limits": {"cpu": "500m"}}}
    order = load_order(write_order(folder, minimal(tasks=[task, "grayscale"], description="two steps",
                                                   retry={"max_attempts": 2.0, "backoff_seconds": 0})))
    again = load_order(write_order(folder, order.to_document(), "again.json"))
    assert dataclasses.replace(again, source=order.source) == order
    assert order.retry == RetryPolicy(2, 0.0, 300.0) and isinstance(order.retry.max_attempts, int)
    assert order.to_document(image="small.png")["image"] == "small.png"
    every_task = load_order(write_order(folder, minimal(tasks=sorted(catalog.all_tasks())), "all.json"))
    assert load_order(write_order(folder, every_task.to_document(), "all-again.json")).tasks == every_task.tasks


def test_schema_matches_the_code() -> None:
    schema = order_schema()
    defs = schema["$defs"]

    assert tuple(defs["faultType"]["enum"]) == FAULT_TYPES
    assert defs["taskName"]["pattern"] == f"^{TASK_NAME_PATTERN.pattern}$"
    defaults = {name: spec["default"] for name, spec in defs["retry"]["properties"].items()}
    assert RetryPolicy(**defaults) == RetryPolicy()
