"""Orders: their typed shape and the loader that checks an order file.

An order file is JSON (format: ``orders/README.md``, schema: ``orchestrator/order.schema.json``).
Loading checks everything that can be checked before running anything, each rule in one
place: the file's shape, names, bounds and faults in the JSON Schema; the task names and
their parameters against the task catalog; the image by decoding it. A bad order fails before
any topic, process or database row exists. Loading only reads: it creates nothing. The
dataclasses trust what they are given: an :class:`Order` comes from :func:`load_order`.

Every problem raises :class:`OrderError` with one line that names the file, e.g.::

    orders/bad.json: task 2 ('blurr'): unknown task; known tasks: blur, edge_detect, ...
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image

from orchestrator.order_schema import schema_problem
from pipeline.errors import PipelineError
from pipeline.invocation import DEFAULT_FAULT_FACTOR, REGRESSION_FAULTS
from services import catalog
from services.runtime.spec import TaskParameterError

FAULT_TYPES = ("raise", "stall", "cpu_hog", "memory_leak", "io_storm", *REGRESSION_FAULTS)
_FAULT_FIELDS = ("fault", "fault_at", "fault_factor")

# The original system's field names, accepted in place of the current ones.
_ORIGINAL_NAMES = {"id": "orderID", "tasks": "required_tasks"}
PathLike = str | os.PathLike[str]


class OrderError(PipelineError):
    """An order file cannot be used; the message is one line naming the file and the problem."""

    exit_code = 2


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failing task runs again, how long to wait first, how long it may run."""

    max_attempts: int = 3
    backoff_seconds: float = 1.0
    task_timeout_seconds: float = 300.0


@dataclass(frozen=True)
class TaskSpec:
    """One step of an order: a task name, its full (resolved) parameters and an optional fault.

    ``fault`` is one of :data:`FAULT_TYPES`, injected by the task runtime ``fault_at``
    seconds after the task starts; ``None`` runs the task normally. A regression fault
    (:data:`~pipeline.invocation.REGRESSION_FAULTS`) starts with the work and scales it by
    ``fault_factor`` instead.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    fault: str | None = None
    fault_at: float = 0.0
    fault_factor: float = DEFAULT_FAULT_FACTOR
    # Kubernetes requests/limits over the task's defaults: {"requests": {"cpu": "500m"}, ...}.
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A plain dict (copied) rather than a read-only proxy: it must pickle and json.dumps.
        object.__setattr__(self, "params", dict(self.params))


@dataclass(frozen=True)
class Order:
    """An order: a name, an input image and the tasks to run on it, in order.

    ``image`` is absolute; ``source`` is the order file it was loaded from (None when the
    order was built in code).
    """

    name: str
    image: Path
    tasks: tuple[TaskSpec, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    source: Path | None = None
    description: str = ""
    image_size: tuple[int, int] | None = None  # (width, height), read when loaded from a file

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", Path(self.image))
        object.__setattr__(self, "tasks", tuple(self.tasks))

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names in running order; a task may appear more than once."""
        return tuple(task.name for task in self.tasks)

    @property
    def required_tasks(self) -> str:
        """The task names joined by ``,``: the protocol's ``required_tasks`` field."""
        return ",".join(self.task_names)

    def to_document(self, image: str | None = None) -> dict[str, Any]:
        """The order as an order file holds it, checked and resolved (every task parameter
        spelled out), its image given as ``image`` (default: the absolute path). What
        ``submit`` hands the in-cluster orchestrator: the order that was checked here."""
        tasks = []
        for task in self.tasks:
            item: dict[str, Any] = {"name": task.name, "params": dict(task.params)}
            if task.fault in REGRESSION_FAULTS:
                item.update(fault=task.fault, fault_factor=task.fault_factor)
            elif task.fault is not None:
                item.update(fault=task.fault, fault_at=task.fault_at)
            if task.resources:
                item["resources"] = {kind: dict(values) for kind, values in task.resources.items()}
            tasks.append(item)
        document = {"id": self.name, "image": image or str(self.image), "tasks": tasks,
                    "retry": dataclasses.asdict(self.retry)}
        if self.description:
            document["description"] = self.description
        return document


def load_orders(paths: Iterable[PathLike]) -> list[Order]:
    """Load several order files; the same file given twice (by any spelling) is an error."""
    paths = list(paths)
    seen: dict[Path, PathLike] = {}
    for path in paths:
        # resolve() follows symlinks, so "a.json", "./a.json" and a link to it all collide.
        key = Path(path).resolve()
        if key in seen:
            raise OrderError(f"{path}: given twice (the same file as {seen[key]})")
        seen[key] = path
    return [load_order(path) for path in paths]


def load_order(path: PathLike) -> Order:
    """Read and check one order file; raise :class:`OrderError` on the first problem."""
    path = Path(path)
    document = _read_json(path)
    for current, original in _ORIGINAL_NAMES.items():
        if current in document and original in document:
            _fail(path, f"both {current!r} and {original!r} given; they are two spellings "
                        f"of one field, keep one")
        if current not in document and original not in document:
            _fail(path, f"missing required field {current!r} (or its original spelling {original!r})")
    problem = schema_problem(document)
    if problem:
        _fail(path, problem)

    name = document.get("id", document.get("orderID"))
    tasks = document.get("tasks", document.get("required_tasks"))
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    source = path.resolve()
    retry_fields = document.get("retry", {})
    retry = RetryPolicy(**{name: int(value) if name == "max_attempts" else float(value)  # 3.0 is an integer to JSON Schema
                           for name, value in retry_fields.items()})
    image, image_size = _checked_image(path, source.parent, document["image"])
    return Order(
        name=str(name),
        image=image,
        image_size=image_size,
        tasks=tuple(_task_spec(path, number, item) for number, item in enumerate(tasks, start=1)),
        retry=retry,
        source=source,
        description=document.get("description", ""),
    )


@dataclass(frozen=True)
class InputImage:
    """What a task's work scales with, read from the image it reads before it starts: its
    pixels, its channels (bands: 3 for RGB, 1 after grayscale) and its file's size in bytes
    (how much detail it holds: a smoothed image encodes smaller, and so does its output)."""

    pixels: int
    channels: int
    file_bytes: int


def input_image(path: str | Path) -> InputImage | None:
    """The :class:`InputImage` facts of ``path`` from its header alone; None when it cannot be
    read here (a path that only exists inside a cluster's volume)."""
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):  # a FIFO or a device would block or lie
            return None
        with Image.open(path) as opened:
            width, height = opened.size
            channels = len(opened.getbands())
    except Exception:  # noqa: BLE001 - a fact for the model, never a reason to fail a task
        return None
    return InputImage(width * height, channels, status.st_size)


def _fail(path: Path, problem: str, cause: BaseException | None = None) -> NoReturn:
    raise OrderError(f"{path}: {problem}") from cause


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json silently keeps the last of two equal keys; in an order that hides a mistake.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _read_json(path: Path) -> dict[str, Any]:
    """The file's top-level JSON object."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except FileNotFoundError as exc:
        _fail(path, "order file not found", exc)
    except IsADirectoryError as exc:
        _fail(path, "is a folder, not an order file", exc)
    except UnicodeDecodeError as exc:
        _fail(path, f"not UTF-8 text (byte {exc.start})", exc)
    except OSError as exc:
        _fail(path, f"cannot read the order file: {exc.strerror or exc}", exc)
    try:
        document = json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        _fail(path, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", exc)
    except _DuplicateKey as exc:
        _fail(path, f"not valid JSON for an order: key {exc.args[0]!r} appears twice in one object", exc)
    except ValueError as exc:
        _fail(path, f"not valid JSON: {exc}", exc)
    if not isinstance(document, dict):
        kind = "an array" if isinstance(document, list) else type(document).__name__
        _fail(path, f"must hold a JSON object ({{...}}), found {kind}")
    return document


def _task_spec(path: Path, number: int, item: str | dict[str, Any]) -> TaskSpec:
    """One schema-valid task entry (its shape, fault and bounds are the schema's to check),
    checked against the task catalog."""
    if isinstance(item, str):
        item = {"name": item}
    name = item["name"]
    where = f"task {number} ({name!r})"
    params = dict(item.get("params", {}))
    fault_fields = {}
    # The runtime reserves these names among a task's parameters, so they are accepted
    # inside "params" too; the documented place is the task object.
    for key in _FAULT_FIELDS:
        if key in params and key in item:
            _fail(path, f"{where}: {key!r} given both in the task and in its params; give it once")
        if key in params or key in item:
            fault_fields[key] = params.pop(key) if key in params else item[key]
    fault = fault_fields.get("fault")
    if fault in REGRESSION_FAULTS and "fault_at" in fault_fields:
        _fail(path, f"{where}: 'fault_at' does not apply to fault {fault!r}, a regression that starts "
                    f"with the work; remove it (the regression is scaled by 'fault_factor')")
    if fault not in REGRESSION_FAULTS and "fault_factor" in fault_fields:
        _fail(path, f"{where}: 'fault_factor' applies only to the regression faults "
                    f"{', '.join(REGRESSION_FAULTS)}, not to {fault!r}")
    fault_at = float(fault_fields.get("fault_at", 0.0))
    fault_factor = float(fault_fields.get("fault_factor", DEFAULT_FAULT_FACTOR))

    try:
        task = catalog.get_task(name)
    except catalog.UnknownTaskError as exc:
        known = ", ".join(sorted(catalog.all_tasks()))
        _fail(path, f"{where}: unknown task; known tasks: {known}", exc)
    try:
        resolved = task.resolve_params(params)
    except TaskParameterError as exc:
        # The catalog's message starts with "task 'blur': "; the prefix here says that.
        message = str(exc).removeprefix(f"task {name!r}: ")
        _fail(path, f"{where}: {message}", exc)
    return TaskSpec(name=name, params=resolved, fault=fault, fault_at=fault_at, fault_factor=fault_factor,
                    resources=item.get("resources", {}))


def _checked_image(path: Path, folder: Path, given: str) -> tuple[Path, tuple[int, int]]:
    """The image's absolute path and size, after checking that Pillow can decode it."""
    # Relative to the order file's real folder, so a symlinked order means the same thing.
    image = (folder / given).resolve()
    if not image.exists():
        _fail(path, f"image {given!r} not found (looked for {image})")
    if image.is_dir():
        _fail(path, f"image {given!r} is a folder, not an image file")
    try:
        # verify() checks structure and checksums but not every format's pixel data
        # (a truncated JPEG passes it), so the image is decoded in full as well.
        with Image.open(image) as opened:
            opened.verify()
        with Image.open(image) as opened:
            opened.load()
            size = opened.size
    except Image.UnidentifiedImageError as exc:
        _fail(path, f"image {given!r} is not an image file Pillow can read", exc)
    except PermissionError as exc:
        _fail(path, f"image {given!r} cannot be read: permission denied", exc)
    except Exception as exc:  # Pillow raises many types for damaged files
        _fail(path, f"image {given!r} is damaged or unreadable: {exc}", exc)
    return image, size
