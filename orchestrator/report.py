"""What the user sees: live progress lines while orders run, a summary per order at the end."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from orchestrator.anomalies import OrderAnomalies, summary_lines
from pipeline.db.orders import RunStatus


@dataclass
class TaskResult:
    """How one task of an order ended (after its retries)."""

    position: int
    name: str
    status: RunStatus = RunStatus.PENDING
    attempts: int = 0
    seconds: float = 0.0
    output: str | None = None
    error: str | None = None


@dataclass
class OrderResult:
    """How one order ended."""

    name: str
    source: str
    order_id: int | None = None
    status: RunStatus = RunStatus.PENDING
    seconds: float = 0.0
    rows: int = 0
    tasks: list[TaskResult] = field(default_factory=list)
    error: str | None = None
    anomalies: OrderAnomalies | None = None  # None: live scoring did not judge the order
    warnings: list[str] = field(default_factory=list)  # what went wrong although it succeeded


class Reporter:
    """Thread-safe progress lines on stderr, each with the order and task k/n."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._began = time.monotonic()
        self._said: set[str] = set()

    def line(self, text: str) -> None:
        with self._lock:
            elapsed = time.monotonic() - self._began
            print(f"[{elapsed:7.1f}s] {text}", file=self.stream, flush=True)

    def once(self, key: str, text: str) -> None:
        """``text`` as a line, the first time ``key`` is given only: what holds for the whole
        run is said once, not once per order."""
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        self.line(text)


def format_summary(results: list[OrderResult]) -> str:
    """The end-of-run summary: status, duration per task, outputs, rows stored, and the
    anomalies live scoring raised (an order with one still SUCCEEDED: its first line says how
    many, so it cannot be missed, and one line each follows its tasks)."""
    lines = []
    for result in results:
        ident = f"order {result.order_id}" if result.order_id else "order (not started)"
        flagged = len(result.anomalies.flags) if result.anomalies else 0
        lines.append(f"{ident} {result.name} ({result.source}): {result.status} in {result.seconds:.1f}s, "
                     f"{result.rows} sample rows stored"
                     + (f", {flagged} ANOMAL{'Y' if flagged == 1 else 'IES'}" if flagged else ""))
        for task in result.tasks:
            retry = f", {task.attempts} attempts" if task.attempts > 1 else ""
            detail = task.output or task.error or ""
            lines.append(f"  {task.position + 1}. {task.name:<12} {task.status:<9} {task.seconds:6.1f}s{retry}  {detail}")
        if result.error:
            lines.append(f"  error: {result.error}")
        lines += [f"  warning: {warning}" for warning in result.warnings]
        lines += summary_lines(result.anomalies, result.order_id)
    return "\n".join(lines)
