"""The order file's JSON Schema (``orchestrator/order.schema.json``) and readable schema errors.

jsonschema's own messages quote whole sub-documents and schemas; a user needs one line: where
in the file (a JSON path such as ``$.tasks[1].fault_at``) and what is expected there.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

# Package data (pyproject.toml): the loader has it wherever the package is installed.
SCHEMA_PATH = Path(str(resources.files(__package__) / "order.schema.json"))

_JSON_TYPES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "null": "null",
}
_TASK_LISTS = ("tasks", "required_tasks")


@cache
def order_schema() -> dict[str, Any]:
    """Return the order schema, read once from :data:`SCHEMA_PATH`."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = order_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_problem(document: Any) -> str | None:
    """Return one line describing the most relevant schema violation, or None if valid."""
    error = best_match(_validator().iter_errors(document))
    if error is None:
        return None
    text = _describe(error)
    return text if error.json_path == "$" else f"{error.json_path}: {text}"


def _kind(value: Any) -> str:
    """The JSON type of a parsed value, in words."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"a number ({value!r})"


def _describe(error: ValidationError) -> str:
    keyword, expected, value = error.validator, error.validator_value, error.instance
    path = list(error.absolute_path)
    if keyword == "required":
        missing = [name for name in expected if name not in value]
        return f"missing required field {missing[0]!r}"
    if keyword == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(name for name in value if name not in allowed)
        return f"unknown field {unknown[0]!r}; allowed fields: {', '.join(allowed)}"
    if keyword == "type":
        if len(path) >= 2 and path[-2] in _TASK_LISTS and isinstance(path[-1], int):
            return f"expected a task name or a task object ({{\"name\": ...}}), got {_kind(value)}"
        types = [expected] if isinstance(expected, str) else expected
        return f"expected {' or '.join(_JSON_TYPES.get(t, t) for t in types)}, got {_kind(value)}"
    if keyword == "minItems":
        if path and path[-1] in _TASK_LISTS:
            return "the task list is empty; list at least one task"
        return f"expected at least {expected} items"
    if keyword == "minLength":
        return "must not be empty"
    if keyword == "pattern":
        wanted = error.schema.get("description") or f"text matching {expected}"
        return f"invalid value {value!r}: expected {wanted}"
    if keyword == "enum":
        return f"invalid value {value!r}: expected one of {', '.join(map(str, expected))}"
    if keyword in ("minimum", "exclusiveMinimum"):
        sign = ">=" if keyword == "minimum" else ">"
        noun = "an integer" if error.schema.get("type") == "integer" else "a number"
        return f"expected {noun} {sign} {expected}, got {value!r}"
    if keyword in ("maximum", "exclusiveMaximum"):
        sign = "<=" if keyword == "maximum" else "<"
        noun = "an integer" if error.schema.get("type") == "integer" else "a number"
        return f"expected {noun} {sign} {expected}, got {value!r}"
    if keyword == "dependentRequired":
        field = next(name for name in expected if name in value)
        return f"{field!r} needs {', '.join(repr(name) for name in expected[field])} as well"
    # Keywords the schema does not use on its own (oneOf between spellings is pre-checked).
    return error.message
