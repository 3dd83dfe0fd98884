"""The catalog of image tasks: every ``services/<folder>/main.py`` that defines ``TASK``.

A task named ``edge-detect`` or ``edge_detect`` lives in ``services/edge_detect`` (folder
names must be Python identifiers); its process is started with ``python -m`` on
:func:`task_module`.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from pipeline.errors import PipelineError
from services.runtime.spec import ImageTask

SERVICES_DIR = Path(__file__).resolve().parent

TASK_ENVIRONMENT = {"OPENBLAS_NUM_THREADS": "1"}
"""Set for every task process, locally and in a task Job (a value the orchestrator's own
environment gives wins). A task is one of many on a shared node and its operations are
single-threaded but for a few small matrix products; numpy's OpenBLAS would start a worker
thread per core that spins for tens of ms after it starts and after each call. Measured on this
2-vCPU node: ``sepia`` on 480x360 took 60 ms either way, and the spinning worker added 50 ms of
CPU; ``flip``'s operation used 75 ms of CPU on a quiet node and 40 ms on a busy one, where the
worker gets no idle core to spin on, so a task's CPU time depended on how idle the node was."""


class UnknownTaskError(PipelineError, KeyError):
    """No task of that name exists; the message lists the known ones."""

    exit_code = 2

    def __str__(self) -> str:
        # KeyError would print the message quoted, as if it were a key.
        return str(self.args[0]) if self.args else ""


def folder_for(task_name: str) -> str:
    """Return the folder under ``services/`` that holds the task ``task_name``."""
    return task_name.replace("-", "_")


@functools.cache
def _discover() -> dict[str, tuple[ImageTask, str]]:
    found: dict[str, tuple[ImageTask, str]] = {}
    for main in sorted(SERVICES_DIR.glob("*/main.py")):
        folder = main.parent.name
        if not folder.isidentifier() or folder.startswith("_"):
            continue
        module_name = f"services.{folder}.main"
        task = getattr(importlib.import_module(module_name), "TASK", None)
        if not isinstance(task, ImageTask):
            continue
        # A mismatch would make the task unreachable by name, so fail at discovery.
        if folder_for(task.name) != folder:
            raise RuntimeError(
                f"{module_name} defines task {task.name!r}; "
                f"it belongs in services/{folder_for(task.name)}"
            )
        found[task.name] = (task, module_name)
    return dict(sorted(found.items()))


def all_tasks() -> dict[str, ImageTask]:
    """Return every task by name, sorted by name (discovered once, then cached)."""
    return {name: task for name, (task, _) in _discover().items()}


def get_task(name: str) -> ImageTask:
    """Return the task called ``name`` or raise :class:`UnknownTaskError`."""
    try:
        return _discover()[name][0]
    except KeyError:
        known = ", ".join(_discover())
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}") from None


def task_module(name: str) -> str:
    """Return the module that runs task ``name`` with ``python -m``, e.g. ``services.blur.main``."""
    get_task(name)
    return _discover()[name][1]


def work_powers() -> dict[str, dict[str, float]]:
    """Per task, the parameters whose effect on the CPU work its author declared
    (:attr:`services.runtime.spec.Param.work`): the powers the expected-usage model starts from."""
    return {name: powers for name, task in all_tasks().items()
            if (powers := {param: float(spec.work) for param, spec in task.params.items() if spec.work is not None})}
