"""Which of the project's packages import which: ``./dev python -m devkit.import_graph``.

Every ``import`` and ``from ... import`` in a package's modules counts, at module level or
inside a function (a function-level import is a dependency too, only a hidden one); each edge
is printed with how many modules make it and, with ``--why``, which ones. ``--check`` exits 1
when an edge goes against the layering in :data:`ALLOWED` (the ground floor ``pipeline``
imports none of the others; analysis never reaches into training; tests and benchmarks share
devkit, never each other).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "ops", "models", "services", "analysis", "monitor", "orchestrator", "training",
            "devkit", "bench", "tests")

# Who may import whom (beside itself).
ALLOWED = {
    "pipeline": set(),
    "models": {"pipeline"},
    "services": {"pipeline"},
    "ops": {"pipeline"},
    "analysis": {"pipeline", "models"},
    "monitor": {"pipeline", "models", "analysis"},
    "orchestrator": {"pipeline", "models", "services", "ops"},
    # training knows the task catalog: `training collect` writes orders of known tasks
    "training": {"pipeline", "models", "services"},
}
_PRODUCT = {"pipeline", "ops", "models", "services", "analysis", "monitor", "orchestrator", "training"}
# What tests and benchmarks share lives in devkit: neither imports the other.
ALLOWED.update(devkit=_PRODUCT, bench=_PRODUCT | {"devkit"}, tests=_PRODUCT | {"devkit"})

# Entry points that only name another package's command line: `python -m pipeline` (the name
# the design gives the operator's commands) runs ops/cli.py without the core importing it.
ALIASES = {("pipeline.__main__", "ops")}


def edges(repo: Path = REPO) -> dict[tuple[str, str], set[str]]:
    """(importer package, imported package) -> the importing modules."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            module = ".".join(path.relative_to(repo).with_suffix("").parts)
            for target in _imports(path):
                top = target.split(".")[0]
                if top in PACKAGES and top != package:
                    found[(package, top)].add(module)
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and _dynamic(node):
            names.add(node.args[0].value)
    return names


def _dynamic(call: ast.Call) -> bool:
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    return name in ("import_module", "run_main") and bool(call.args) and \
        isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


def violations(found: dict[tuple[str, str], set[str]]) -> list[tuple[str, str]]:
    return sorted(edge for edge, modules in found.items()
                  if edge[0] in ALLOWED and edge[1] not in ALLOWED[edge[0]]
                  and any((module, edge[1]) not in ALIASES for module in modules))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.import_graph", description=__doc__.splitlines()[0])
    parser.add_argument("--why", action="store_true", help="list the importing modules of each edge")
    parser.add_argument("--check", action="store_true", help="exit 1 when an edge breaks the layering")
    args = parser.parse_args(argv)
    found = edges()
    bad = set(violations(found))
    for (source, target), modules in sorted(found.items()):
        mark = "  <- against the layering" if (source, target) in bad else ""
        print(f"{source:<13} -> {target:<13} {len(modules):>3} module(s){mark}")
        if args.why:
            for module in sorted(modules):
                print(f"    {module}")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
