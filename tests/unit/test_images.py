"""The container images, checked without Docker: what each Dockerfile copies and runs.

For every Dockerfile (one per task in services/, monitor/, orchestrator/): each COPY source
exists and is not excluded by .dockerignore, the ENTRYPOINT's module exists, every
repository module that the entry module imports (followed statically, with ``ast``, through
every module it reaches, function-level imports included) is copied into the image at the
same path, and every third-party package they import is in the image's requirements file.
And build_service.sh knows every image, names them as the Kubernetes runtime does, and
tags them as the ConfigMap does.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import pipeline
from pipeline.settings import Settings
from services import catalog

REPO = Path(__file__).resolve().parents[2]
LOCAL_PACKAGES = sorted(p.name for p in REPO.iterdir()
                        if (p / "__init__.py").is_file() and p.name not in ("tests", "bench"))
DOCKERFILES = sorted([*REPO.glob("services/*/Dockerfile"), REPO / "monitor" / "Dockerfile",
                      REPO / "orchestrator" / "Dockerfile"])
# Import names whose distribution is called otherwise.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn",
                 "psycopg2": "psycopg2-binary", "confluent_kafka": "confluent-kafka"}
# Files read at run time by a module (not imports, so the walk cannot see them).
DATA_FILES = {
    "orchestrator.order_schema": ["orchestrator/order.schema.json"],
    "orchestrator.runtime.job_specs": ["orchestrator/runtime/jobs/task.yaml", "orchestrator/runtime/jobs/monitor.yaml",
                                       "orchestrator/runtime/jobs/orchestrator.yaml"],
    "ops.infra.kafka_broker": ["ops/infra/kafka-pom.xml"],
}
# The uid of the Job templates' securityContext (orchestrator/runtime/jobs/*.yaml).
POD_UID = 10001


# ------------------------------------------------------------------ Dockerfile parsing

@dataclass
class Dockerfile:
    path: Path
    base: str = ""
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # (sources, destination)
    entrypoint: list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = ""

    @property
    def name(self) -> str:
        return self.path.relative_to(REPO).as_posix()


def parse_dockerfile(path: Path) -> Dockerfile:
    result = Dockerfile(path)
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    for line in logical:
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            result.base = rest.split()[0]
        elif instruction in ("COPY", "ADD"):
            assert instruction == "COPY", f"{path}: use COPY, not ADD"
            words = rest[1:-1] if rest.startswith("[") else rest
            parts = json.loads(rest) if rest.startswith("[") else shlex.split(words)
            parts = [p for p in parts if not p.startswith("--")]
            result.copies.append((parts[:-1], parts[-1]))
        elif instruction in ("ENTRYPOINT", "CMD") and rest.startswith("["):
            if instruction == "ENTRYPOINT" or not result.entrypoint:
                result.entrypoint = json.loads(rest)
        elif instruction == "USER":
            result.user = rest
        elif instruction == "WORKDIR":
            result.workdir = rest
    return result


def copied_paths(dockerfile: Dockerfile) -> list[str]:
    """The repository paths (files or folders, no trailing /) the image holds at the same path."""
    paths = []
    for sources, destination in dockerfile.copies:
        for source in sources:
            if source.endswith("requirements.txt") and destination.startswith("/tmp/"):
                continue  # dependencies, installed and removed
            paths.append(source.rstrip("/"))
    return paths


def is_copied(path: str, dockerfile: Dockerfile) -> bool:
    return any(path == copied or path.startswith(copied + "/") for copied in copied_paths(dockerfile))


def requirements_of(dockerfile: Dockerfile) -> set[str]:
    names = set()
    for sources, _ in dockerfile.copies:
        for source in sources:
            if source.endswith("requirements.txt"):
                for line in (REPO / source).read_text().splitlines():
                    line = line.split("#", 1)[0].strip()
                    if line and not line.startswith("-"):
                        names.add(re.match(r"[A-Za-z0-9._-]+", line).group(0).lower().replace("_", "-"))
    return names


# ------------------------------------------------------------------ the import walk

def module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imports_of(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(repository modules, third-party top-level names) that ``module`` imports anywhere."""
    local, external = set(), set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def add(name: str) -> None:
        top = name.split(".")[0]
        if top in LOCAL_PACKAGES:
            local.add(name)
        elif top not in sys.stdlib_module_names:
            external.add(top)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            add(base)
            for alias in node.names:  # `from pkg import submodule`
                if module_file(f"{base}.{alias.name}"):
                    add(f"{base}.{alias.name}")
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            add(node.args[0].value)  # importlib.import_module("x") or run_main("x") (pipeline/entry.py)
    return local, external


def _dynamic_import(call: ast.Call) -> bool:
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    return name in ("import_module", "run_main") and bool(call.args) and \
        isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


def closure(entry: str) -> tuple[dict[str, Path], set[str]]:
    """Every repository module ``python -m entry`` can import (with the packages that hold
    them), and the third-party names they import."""
    found: dict[str, Path] = {}
    external: set[str] = set()
    pending = [entry]
    if module_file(f"{entry}.__main__"):
        pending.append(f"{entry}.__main__")
    while pending:
        module = pending.pop()
        if module in found:
            continue
        path = module_file(module)
        if path is None:
            continue  # a name imported from a module, not a module
        found[module] = path
        parts = module.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        local, names = imports_of(module, path)
        pending.extend(local)
        external |= names
        if module == "services.catalog":
            # The catalog discovers the tasks by importing every services/<task>/main.py.
            pending.extend(f"services.{main.parent.name}.main" for main in REPO.glob("services/*/main.py"))
    return found, external


def entry_module(dockerfile: Dockerfile) -> str:
    command = dockerfile.entrypoint
    assert command[:2] == ["python", "-m"] and len(command) == 3, \
        f"{dockerfile.name}: ENTRYPOINT must be [\"python\", \"-m\", MODULE], is {command}"
    return command[2]


# ------------------------------------------------------------------ .dockerignore

def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    parts = path.split("/")
    for pattern in dockerignore_patterns():
        assert not pattern.startswith("!"), "negated .dockerignore patterns are not checked here"
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if pattern.startswith("**/"):
                if fnmatch.fnmatchcase(parts[i - 1], pattern[3:]):
                    return True
            elif fnmatch.fnmatchcase(prefix, pattern) and pattern.count("/") == prefix.count("/"):
                return True
    return False


# ------------------------------------------------------------------ tests

def test_every_image_has_a_dockerfile():
    folders = {p.parent.name for p in REPO.glob("services/*/Dockerfile")}
    assert folders == {catalog.folder_for(name) for name in catalog.all_tasks()}
    assert len(DOCKERFILES) == len(catalog.all_tasks()) + 2


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(REPO).parent.as_posix())
def test_dockerfile_copies_what_its_entry_module_imports(path):
    dockerfile = parse_dockerfile(path)
    name = dockerfile.name
    base, _, tag = dockerfile.base.rpartition(":")
    assert base and tag and tag != "latest", f"{name}: FROM needs an explicit tag"
    assert dockerfile.workdir == "/app"
    assert dockerfile.user == str(POD_UID), f"{name}: USER must be {POD_UID}, the Job templates' runAsUser"

    for sources, destination in dockerfile.copies:
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source}: no such file in the repository"
            assert not ignored(source.rstrip("/")), f"{name}: COPY {source} is excluded by .dockerignore"
            if not (source.endswith("requirements.txt") and destination.startswith("/tmp/")):
                # The repository's layout is the image's (/app/<path>): the code finds its
                # files relative to itself.
                expected = source if len(sources) == 1 else str(Path(source).parent) + "/"
                assert destination.rstrip("/") == expected.rstrip("/"), \
                    f"{name}: COPY {source} {destination}: copy to the same path"

    entry = entry_module(dockerfile)
    assert module_file(entry) or module_file(f"{entry}.__main__"), f"{name}: no module {entry}"
    modules, external = closure(entry)
    missing = sorted(f"{module} ({file.relative_to(REPO)})" for module, file in modules.items()
                     if not is_copied(file.relative_to(REPO).as_posix(), dockerfile))
    assert not missing, f"{name}: {entry} imports modules the image does not copy: {missing}"
    for module, files in DATA_FILES.items():
        if module in modules:
            for data in files:
                assert is_copied(data, dockerfile), f"{name}: {module} reads {data}, which is not copied"
                assert not ignored(data), f"{name}: {data} is excluded by .dockerignore"

    requirements = requirements_of(dockerfile)
    assert requirements, f"{name}: installs no requirements file"
    unlisted = sorted(n for n in external
                      if DISTRIBUTIONS.get(n, n).lower().replace("_", "-") not in requirements)
    assert not unlisted, f"{name}: imports {unlisted}, which its requirements file does not list"


def test_the_walk_sees_function_level_and_dynamic_imports():
    # The monitor imports its producer inside a function; the orchestrator's catalog imports
    # every task. A walk that missed them would pass images that cannot run.
    monitor_modules, monitor_external = closure("monitor")
    assert "monitor.producer" in monitor_modules and "torch" in monitor_external
    orchestrator_modules, _ = closure("orchestrator")
    assert "services.blur.main" in orchestrator_modules


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for wanted in (".git", "tests", "docs", "bench", "**/__pycache__", "**/*.pyc"):
        assert wanted in patterns
    assert ignored("tests/unit/test_images.py") and ignored("pipeline/__pycache__/x.pyc")
    assert not ignored("pipeline/settings.py")


def run_build_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("IMAGE_TAG", "IMAGE_REGISTRY")}
    environ.update(env)
    return subprocess.run([str(REPO / "build_service.sh"), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_build_script_knows_every_image():
    listed = run_build_script("--list")
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.split()
    assert sorted(names) == sorted([*(catalog.folder_for(t) for t in catalog.all_tasks()),
                                    "monitor", "orchestrator"])


def test_build_script_builds_from_the_root_and_pushes_the_runtimes_references():
    # DOCKER=echo prints the commands instead of running them.
    result = run_build_script("--all", DOCKER="echo", IMAGE_REGISTRY="registry.example.com/team/")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith(">>")]
    settings = Settings.from_env({"IMAGE_REGISTRY": "registry.example.com/team"})
    for name in [*catalog.all_tasks(), "monitor", "orchestrator"]:
        image = settings.image(name)  # what the Kubernetes runtime starts
        dockerfile = f"{name}/Dockerfile" if name in ("monitor", "orchestrator") \
            else f"services/{catalog.folder_for(name)}/Dockerfile"
        assert f"build -f {dockerfile} -t {image} ." in commands
        assert f"push {image}" in commands
    assert len(commands) == 2 * (len(catalog.all_tasks()) + 2)

    no_push = run_build_script("blur", "--no-push", DOCKER="echo", IMAGE_TAG="1.2.3")
    assert no_push.returncode == 0, no_push.stderr
    assert [line for line in no_push.stdout.splitlines() if not line.startswith(">>")] == \
        ["build -f services/blur/Dockerfile -t image-pipeline-blur:1.2.3 ."]


def test_build_script_errors():
    unknown = run_build_script("nope", DOCKER="echo")
    assert unknown.returncode == 2 and "unknown image 'nope'" in unknown.stderr and "blur" in unknown.stderr
    assert unknown.stdout == ""
    latest = run_build_script("blur", DOCKER="echo", IMAGE_TAG="latest")
    assert latest.returncode == 2 and "latest" in latest.stderr and latest.stdout == ""
    nothing = run_build_script(DOCKER="echo")
    assert nothing.returncode == 2 and "--all" in nothing.stderr


def test_default_image_tag_is_the_release_everywhere():
    script = (REPO / "build_service.sh").read_text()
    assert re.search(r"^DEFAULT_TAG=(\S+)$", script, re.M).group(1) == pipeline.__version__
    config_map = yaml.safe_load((REPO / "k8s" / "settings.yaml").read_text())
    assert config_map["data"]["IMAGE_TAG"] == pipeline.__version__
    assert Settings.from_env({}).image_tag == pipeline.__version__
