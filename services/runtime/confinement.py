"""A task opens only files under the artifact directory.

The paths a task reads arrive from outside it: the earlier outputs come from PROGRESS messages
(through the orchestrator, on the task's command line), and anyone who can write to the
broker can forge one whose output names ``/etc/shadow`` or ``../../x``. So before it opens
anything the task checks that every earlier output, and its own output (with the temporary
file written before it), resolves under ARTIFACT_DIR: after :func:`os.path.realpath`, so
neither ``..`` nor a symlink planted in the artifact directory leads out of it.

The order's own input image (``--image``) is the one path from elsewhere: the orchestrator
names it from the order file (the local runtime hands it over as it is, the Kubernetes runtime
first copies it onto the artifacts volume, ``Runtime.stage_input``), never from a message, and
only the first task (position 0) reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.invocation import TaskInvocation


class PathRefused(PipelineError):
    """A path a task was to open lies outside the artifact directory; the message is the one
    line the task reports (``refused: input ... is outside the artifact directory ...``)."""


def resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` with every symlink and ``..`` resolved, as the kernel would open it."""
    return Path(os.path.realpath(path))


def is_under(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` resolves to something strictly inside ``root`` (itself resolved)."""
    real, real_root = resolved(path), resolved(root)
    return real != real_root and real.is_relative_to(real_root)


def check_under(role: str, path: str | os.PathLike[str], artifact_dir: Path) -> None:
    """Raise :class:`PathRefused` unless ``path`` resolves under ``artifact_dir``."""
    if is_under(path, artifact_dir):
        return
    shown = str(path)
    real = str(resolved(path))
    if real != os.path.abspath(shown):  # a symlink led elsewhere: say where
        shown = f"{shown} (resolving to {real})"
    raise PathRefused(f"refused: {role} {shown} is outside the artifact directory {artifact_dir}")


def check_paths(inv: TaskInvocation, outputs: Iterable[Path], artifact_dir: Path) -> None:
    """Every path the task will open, checked before it opens any: each earlier output (the
    last is its input; all of them travel on in its PROGRESS), then what it writes. The
    order's image is not checked: the first task reads it, and later ones never open it."""
    for earlier in inv.progress:
        check_under("input", earlier, artifact_dir)
    for output in outputs:
        check_under("output", output, artifact_dir)
