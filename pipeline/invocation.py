"""How a task is started: the protocol's "required tasks, its own task name, the orderID and the
progress so far", plus the order's input image, the task's parameters and any injected fault.

One type serves both sides: the orchestrator's runtimes turn it into a command line with
:meth:`TaskInvocation.to_args`, the task runtime reads it back with
:meth:`TaskInvocation.from_args`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ProtocolError
from pipeline.protocol import decode_output, decode_required_tasks, encode_output, encode_required_tasks

# Faults that model a worse release rather than a breakdown: they start with the work (no
# ``fault_at``) and scale what the task does by ``fault_factor`` (services/runtime/faults.py).
REGRESSION_FAULTS = ("extra_work", "extra_memory", "double_write")
DEFAULT_FAULT_FACTOR = 1.5


@dataclass(frozen=True)
class TaskInvocation:
    """One attempt of one task of an order."""

    order_id: int
    required_tasks: tuple[str, ...]
    task_name: str
    progress: tuple[str, ...]
    image: Path
    params: dict = field(default_factory=dict)
    fault: str | None = None
    fault_at: float = 0.0
    attempt: int = 1
    fault_factor: float = DEFAULT_FAULT_FACTOR

    @property
    def position(self) -> int:
        """The task's position in its order: the number of earlier outputs."""
        return len(self.progress)

    @property
    def is_last(self) -> bool:
        return self.position == len(self.required_tasks) - 1

    @property
    def input_path(self) -> Path:
        """The image this task works on: the previous output, or the order's image."""
        return Path(self.progress[-1]) if self.progress else self.image

    def to_args(self) -> list[str]:
        """The task's command-line arguments."""
        args = [
            "--order-id", str(self.order_id),
            "--required-tasks", encode_required_tasks(self.required_tasks),
            "--task-name", self.task_name,
            "--progress", ":".join(encode_output(p) for p in self.progress),
            "--image", str(self.image),
            "--params", json.dumps(self.params, sort_keys=True),
            "--attempt", str(self.attempt),
        ]
        if self.fault in REGRESSION_FAULTS:
            args += ["--fault", self.fault, "--fault-factor", str(self.fault_factor)]
        elif self.fault:
            args += ["--fault", self.fault, "--fault-at", str(self.fault_at)]
        return args

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "TaskInvocation":
        """Parse :meth:`to_args`' output; wire formats are checked by the protocol module."""
        args = _parser().parse_args(argv)
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise ProtocolError(f"--params is not JSON: {exc}") from None
        return cls(
            order_id=args.order_id,
            required_tasks=decode_required_tasks(args.required_tasks),
            task_name=args.task_name,
            progress=tuple(decode_output(p) for p in args.progress.split(":")) if args.progress else (),
            image=Path(args.image),
            params=params,
            fault=args.fault,
            fault_at=args.fault_at,
            attempt=args.attempt,
            fault_factor=args.fault_factor,
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run one image task of an order.")
    parser.add_argument("--order-id", type=int, required=True)
    parser.add_argument("--required-tasks", required=True, help="task names joined with ','")
    parser.add_argument("--task-name", required=True)
    parser.add_argument("--progress", default="", help="earlier outputs, as in PROGRESS's value")
    parser.add_argument("--image", required=True, help="the order's input image")
    parser.add_argument("--params", default="{}", help="the task's parameters as JSON")
    parser.add_argument("--fault", default=None)
    parser.add_argument("--fault-at", type=float, default=0.0)
    parser.add_argument("--fault-factor", type=float, default=DEFAULT_FAULT_FACTOR)
    parser.add_argument("--attempt", type=int, default=1)
    return parser
