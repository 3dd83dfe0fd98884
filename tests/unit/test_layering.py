"""The packages import each other only as README.md's layout says (devkit/import_graph.py)."""

from devkit.import_graph import ALLOWED, edges, violations


def test_no_package_imports_against_the_layering() -> None:
    found = edges()
    assert violations(found) == [], {edge: sorted(found[edge]) for edge in violations(found)}


def test_the_check_sees_imports_inside_functions_too(tmp_path) -> None:
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "hidden.py").write_text("def f():\n    from training import fit\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "fit.py").write_text("")
    found = edges(tmp_path)
    assert found[("pipeline", "training")] == {"pipeline.hidden"}
    assert violations(found) == [("pipeline", "training")] and not ALLOWED["pipeline"]
