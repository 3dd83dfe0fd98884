"""Bad input to ``python -m orchestrator run``: exit status 2, one clear line, nothing started.

Every case runs the real command line against the real broker and a fresh PostgreSQL
database, so "nothing created" is checked where it would show: no topic on the broker, no
table in the database, no monitor or task process, no artifact, log or state folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine, text

from pipeline.kafka import TopicAdmin
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "orders" / "images" / "scene-640x480.jpg"
CLI_TIMEOUT = 120.0


@dataclass(frozen=True)
class Case:
    """One bad command line: ``make(folder)`` writes its files and returns the arguments."""

    make: Callable[[Path], list[str]]
    names: str  # the file the error line must name
    says: tuple[str, ...]  # fragments the error line must contain


def _order(folder: Path, file_name: str, **fields: object) -> Path:
    document = {"id": "bad-order", "image": str(SCENE), "tasks": ["grayscale"], **fields}
    path = folder / file_name
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _file(folder: Path, file_name: str, content: str | bytes) -> Path:
    path = folder / file_name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _folder(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    return path


def _not_an_image(folder: Path) -> list[str]:
    _file(folder, "x.png", "this is text, not a PNG\n")
    return [str(_order(folder, "text-image.json", image="x.png"))]


def _same_file_twice(folder: Path) -> list[str]:
    path = _order(folder, "twice.json")
    return [str(path), str(path)]


def _same_file_via_dot(folder: Path) -> list[str]:
    path = _order(folder, "twice.json")
    return [str(path), f"{folder}/./twice.json"]


def _good_and_bad(folder: Path) -> list[str]:
    good = _order(folder, "good.json", id="good-order", tasks=["grayscale", "blur"])
    bad = _order(folder, "bad.json", tasks=["grayscale", "blurr"])
    return [str(good), str(bad)]


CASES = {
    "missing file": Case(lambda f: [str(f / "absent.json")], "absent.json", ("not found",)),
    "a folder, not a file": Case(lambda f: [str(_folder(f, "folder.json"))], "folder.json", ("folder",)),
    "not UTF-8 text": Case(lambda f: [str(_file(f, "binary.json", b"\xff\xfe\x00{"))], "binary.json",
                           ("not UTF-8",)),
    "not JSON": Case(lambda f: [str(_file(f, "broken.json", '{"id": "x", tasks: [}'))], "broken.json",
                     ("not valid JSON", "line 1")),
    "JSON array, not an object": Case(lambda f: [str(_file(f, "array.json", '["blur"]'))], "array.json",
                                      ("JSON object", "array")),
    "missing tasks": Case(lambda f: [str(_file(f, "no-tasks.json", json.dumps(
        {"id": "x", "image": str(SCENE)})))], "no-tasks.json", ("missing", "'tasks'")),
    "tasks is a number": Case(lambda f: [str(_order(f, "tasks-number.json", tasks=5))],
                              "tasks-number.json", ("$.tasks", "array")),
    "id is a list": Case(lambda f: [str(_order(f, "id-list.json", id=["a", "b"]))],
                         "id-list.json", ("$.id", "string")),
    "empty task list": Case(lambda f: [str(_order(f, "empty.json", tasks=[]))], "empty.json",
                            ("task list is empty",)),
    "unknown task": Case(lambda f: [str(_order(f, "unknown.json", tasks=["grayscale", "blurr"]))],
                         "unknown.json", ("task 2", "'blurr'", "unknown task")),
    "blur radius not a number": Case(
        lambda f: [str(_order(f, "radius-text.json", tasks=[{"name": "blur", "params": {"radius": "abc"}}]))],
        "radius-text.json", ("'radius'", "'abc'")),
    "blur radius out of range": Case(
        lambda f: [str(_order(f, "radius-huge.json", tasks=[{"name": "blur", "params": {"radius": 999}}]))],
        "radius-huge.json", ("'radius'", "999", "between")),
    "missing input image": Case(lambda f: [str(_order(f, "no-image.json", image="nope.png"))],
                                "no-image.json", ("'nope.png'", "not found")),
    "text file named .png": Case(_not_an_image, "text-image.json", ("'x.png'", "not an image")),
    "same file twice": Case(_same_file_twice, "twice.json", ("given twice",)),
    "same file twice, once as ./": Case(_same_file_via_dot, "twice.json", ("given twice",)),
    "a good file and a bad one": Case(_good_and_bad, "bad.json", ("'blurr'", "unknown task")),
}


def _env(settings: Settings) -> dict[str, str]:
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(REPO)
    return env


def _is_pipeline_service(cmdline: list[str]) -> bool:
    return "monitor" in cmdline or any(part.startswith("services.") for part in cmdline)


def _run_watching_children(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the command line; also return every monitor or task process it started meanwhile."""
    command = [sys.executable, "-m", "orchestrator", "run", *args]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    watched = psutil.Process(process.pid)
    started: set[str] = set()
    deadline = time.monotonic() + CLI_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        try:
            for child in watched.children(recursive=True):
                cmdline = child.cmdline()
                if _is_pipeline_service(cmdline):
                    started.add(" ".join(cmdline))
        except psutil.Error:
            pass  # the orchestrator or a child ended while being looked at
        time.sleep(0.01)
    stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), sorted(started)


def _services_of(database_url: str) -> list[str]:
    """Monitor or task processes still alive that were started for this test's database."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if _is_pipeline_service(process.info["cmdline"] or []) and \
                    process.environ().get("DATABASE_URL") == database_url:
                found.append(" ".join(process.info["cmdline"]))
        except psutil.Error:
            continue
    return found


def _tables(database_url: str) -> list[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT table_schema || '.' || table_name FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            )).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_with_one_line_and_nothing_is_created(case: Case, settings: Settings,
                                                                   tmp_path: Path):
    folder = tmp_path / "orders"
    folder.mkdir()
    args = case.make(folder)
    admin = TopicAdmin(settings)
    topics_before = admin.existing()

    result, started = _run_watching_children(args, _env(settings))

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert case.names in line, f"the error does not name {case.names}: {line}"
    for fragment in case.says:
        assert fragment in line, f"{fragment!r} missing from: {line}"
    assert "Traceback" not in result.stderr
    assert result.stdout == "", "no summary: nothing ran"

    assert started == [], "a monitor or task was started"
    assert _services_of(settings.database_url) == []
    assert admin.existing() == topics_before, "topics were created"
    assert _tables(settings.database_url) == [], "the database schema was created"
    assert not settings.artifact_dir.exists(), "ARTIFACT_DIR was created"
    assert not settings.state_dir.exists(), "the state folder (logs) was created"
