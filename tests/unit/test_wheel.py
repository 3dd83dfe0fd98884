"""The installed package stands on its own: a wheel built from this checkout carries the
files its modules read at run time (the order schema, the Job templates, the broker's POM),
and loads an order and fills in a Job from another folder, without the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel unpacked into a folder of its own: what pip installs of a pure-Python wheel."""
    build = tmp_path_factory.mktemp("wheel")
    source = build / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(build / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (build / "dist").glob("image_pipeline-*.whl")
    site = build / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_wheel_carries_the_data_files_its_modules_read(installed: Path) -> None:
    for data in ("orchestrator/order.schema.json", "orchestrator/runtime/jobs/task.yaml",
                 "orchestrator/runtime/jobs/monitor.yaml", "orchestrator/runtime/jobs/orchestrator.yaml",
                 "ops/infra/kafka-pom.xml"):
        assert (installed / data).is_file(), data
    assert not (installed / "tests").exists() and not (installed / "bench").exists()


def test_an_installed_orchestrator_checks_an_order_and_fills_in_its_job(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(REPO / "orders" / "images" / "scene-640x480.jpg", elsewhere / "scene.jpg")
    (elsewhere / "order.json").write_text(json.dumps(
        {"id": "away", "image": "scene.jpg", "tasks": ["resize", {"name": "blur", "fault": "stall"}]}))
    (elsewhere / "bad.json").write_text(json.dumps({"id": "bad", "image": "scene.jpg", "tasks": [{"name": "blur", "fault": "x"}]}))
    script = """
import json, sys
import orchestrator
from orchestrator.orders import OrderError, load_order
from orchestrator.runtime.job_specs import JobTemplates
from pipeline.settings import Settings
assert orchestrator.__file__.startswith(sys.argv[1]), orchestrator.__file__
order = load_order("order.json")
try:
    load_order("bad.json")
except OrderError as exc:
    print("bad:", exc)
job = JobTemplates(Settings.from_env(), "run1").orchestrator_job(order.name, "cm", "order.json")
print(json.dumps({"tasks": order.required_tasks, "kind": job["kind"]}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIPELINE_STATE_DIR")}
    env.update(PYTHONPATH=str(installed), PIPELINE_STATE_DIR=str(tmp_path / "state"))
    result = subprocess.run([sys.executable, "-c", script, str(installed)], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bad: bad.json: $.tasks[0].fault: invalid value 'x'")
    assert json.loads(lines[1]) == {"tasks": "resize,blur", "kind": "Job"}
