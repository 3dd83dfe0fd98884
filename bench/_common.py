"""Helpers shared by the benchmark scripts in bench/ (not part of the pipeline)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, object]:
    """nproc, memory and the CPU model, for the report."""
    info: dict[str, object] = {"nproc": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["loadavg_1_5_15"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def loadavg() -> str:
    """The 1-minute load average now (other work on the machine skews the timings)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def median(values: list[float]) -> float:
    return statistics.median(values)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; numbers are printed as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"results written to {path}")


def du_bytes(path: Path) -> int:
    """Disk usage of ``path`` in bytes (``du -sb``)."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 1024 / 1024:.1f} MiB"
