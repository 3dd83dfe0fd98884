"""A monitoring service tells the runtime that started it that it is listening."""

from __future__ import annotations

import os


def announce_ready() -> None:
    """Tell the runtime that started this service that it is listening: one stdout line for
    the local runtime, and the file ``READY_FILE`` names (if set) for a Kubernetes readiness
    probe."""
    print("READY", flush=True)
    ready_file = os.environ.get("READY_FILE")
    if ready_file:
        with open(ready_file, "w", encoding="utf-8") as marker:
            marker.write("READY\n")
