"""The contract every image task fulfils: its parameters and its operation.

A task is an :class:`ImageTask`: a name, typed :class:`Param` definitions and a plain
function ``apply(image, params)``. Parameters arrive from order files (JSON), so they are
checked strictly here, once, and the operation only ever sees validated values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from PIL import Image

from pipeline.errors import PipelineError

TASK_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")

# Names the task runtime uses for fault injection; a task may never define them.
RESERVED_PARAMS = frozenset({"fault", "fault_at", "fault_factor"})

_KINDS = (int, float, str, bool)


class TaskParameterError(PipelineError, ValueError):
    """A task was given parameters it cannot use; the message is one line naming them."""

    exit_code = 2


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Param:
    """One parameter of a task: its type, default and allowed values.

    ``default=None`` makes the parameter optional: when not given its value is ``None``.
    For ``str`` parameters ``minimum``/``maximum`` bound the length of the string.

    ``work`` says how the task's CPU work grows with a number: as ``value ** work`` (1: twice
    the passes, twice the work; 2: a window side's square; 0: the work does not depend on it),
    or None where the task's author cannot say. The expected-usage model (models/work.py)
    starts from it and lets the history correct it where the parameter varied: a user who
    sets a value no run had gets the band the work says, not the history's usual one.
    ``bench/param_work.py`` measures every declared power against the CPU time it predicts.
    """

    kind: type
    default: object = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    help: str = ""
    work: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TypeError(f"Param kind must be one of int, float, str, bool, got {self.kind!r}")
        if self.work is not None and (self.kind not in (int, float) or not 0 <= self.work <= 4):
            raise TypeError(f"Param work must be a power between 0 and 4 of a number parameter, got {self.work!r}")
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.default is not None:
            # A definition whose own default is invalid is a programming error.
            try:
                self.coerce("<definition>", "<default>", self.default)
            except TaskParameterError as exc:
                raise TypeError(f"invalid Param default: {exc}") from exc

    def describe(self) -> str:
        """Say in words which values are accepted, e.g. ``a number between 0.1 and 50``."""
        if self.choices:
            return "one of " + ", ".join(repr(choice) for choice in self.choices)
        if self.kind is bool:
            return "true or false"
        noun = {int: "an integer", float: "a number", str: "a string"}[self.kind]
        low, high = self.minimum, self.maximum
        if self.kind is str:
            if low is not None and high is not None:
                return f"{noun} of {_number(low)} to {_number(high)} characters"
            if low is not None:
                return f"{noun} of at least {_number(low)} characters"
            if high is not None:
                return f"{noun} of at most {_number(high)} characters"
            return noun
        if low is not None and high is not None:
            return f"{noun} between {_number(low)} and {_number(high)}"
        if low is not None:
            return f"{noun} of at least {_number(low)}"
        if high is not None:
            return f"{noun} of at most {_number(high)}"
        return noun

    def coerce(self, task_name: str, param_name: str, value: object) -> object:
        """Return ``value`` checked against this definition, or raise TaskParameterError.

        Ints are accepted for floats (and returned as floats); bools are never numbers and
        strings are never converted to numbers, so ``"3"`` or ``true`` fail loudly.
        """
        if value is None and self.default is None:
            return None
        if not self._accepts(value):
            raise TaskParameterError(
                f"task {task_name!r}: parameter {param_name!r} must be "
                f"{self.describe()}, got {value!r}"
            )
        return float(value) if self.kind is float else value

    def _accepts(self, value: object) -> bool:
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        else:
            ok = isinstance(value, str)
        if not ok:
            return False
        if self.choices and value not in self.choices:
            return False
        measure = len(value) if self.kind is str else value
        if self.kind is not bool:
            if self.minimum is not None and measure < self.minimum:
                return False
            if self.maximum is not None and measure > self.maximum:
                return False
        return True


@dataclass(frozen=True)
class ImageTask:
    """An image task: a name, its parameters and the operation that applies it.

    ``apply`` receives an image and the parameters as returned by :meth:`resolve_params`
    (every name present, every value valid) and returns a new image. ``check``, when given,
    validates combinations of parameters (e.g. "scale or width/height, not both") and
    raises :class:`TaskParameterError`. ``output_format`` is the file format (a Pillow
    format name) the runtime saves the output in.
    """

    name: str
    summary: str
    params: Mapping[str, Param]
    apply: Callable[[Image.Image, Mapping[str, object]], Image.Image]
    output_format: str = "PNG"
    check: Callable[[str, Mapping[str, object]], None] | None = field(default=None, repr=False)
    # Kubernetes requests/limits for this task's container, over orchestrator/runtime/jobs/task.yaml's defaults,
    # e.g. {"requests": {"cpu": "1"}}; an order can override them again per task.
    resources: Mapping[str, Mapping[str, str]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TASK_NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"task name must match [a-z][a-z0-9_-]*, got {self.name!r}")
        if "\n" in self.summary:
            raise ValueError(f"task {self.name!r}: summary must be one line")
        reserved = RESERVED_PARAMS.intersection(self.params)
        if reserved:
            raise ValueError(
                f"task {self.name!r}: parameter names {sorted(reserved)} "
                "are reserved for the runtime"
            )
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def resolve_params(self, given: Mapping[str, object] | None) -> dict[str, object]:
        """Return every parameter's value: the given ones validated, defaults for the rest.

        Unknown names raise :class:`TaskParameterError` listing the known ones. The names
        ``fault``, ``fault_at`` and ``fault_factor`` are reserved for the runtime's fault
        injection and are rejected here like any unknown name: the runtime strips them before
        calling this.
        """
        given = dict(given or {})
        for name in given:
            if name in RESERVED_PARAMS:
                raise TaskParameterError(
                    f"task {self.name!r}: parameter {name!r} is reserved for the runtime's "
                    f"fault injection and must be removed before resolving parameters"
                )
            if name not in self.params:
                known = ", ".join(sorted(self.params)) or "none (this task takes no parameters)"
                raise TaskParameterError(
                    f"task {self.name!r}: unknown parameter {name!r}; known parameters: {known}"
                )
        resolved = {
            name: param.coerce(self.name, name, given[name]) if name in given else param.default
            for name, param in self.params.items()
        }
        if self.check is not None:
            self.check(self.name, resolved)
        return resolved

    def run(self, image: Image.Image, params: Mapping[str, object] | None = None) -> Image.Image:
        """Apply this task to ``image`` with ``params`` (validated first)."""
        return self.apply(image, self.resolve_params(params))
