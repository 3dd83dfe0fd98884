"""`python -m orchestrator status`: where orders stand, read from an SQLite database."""

from __future__ import annotations

import json

import pytest

from orchestrator import cli
from pipeline.db import MeasurementWriter, connect, create_schema
from pipeline.db.deviations import DeviationStore
from pipeline.db.orders import OrderStore, RunStatus
from pipeline.entry import exit_status
from pipeline.protocol import Deviation, Sample


@pytest.fixture()
def database(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'status.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path / "state"))
    engine = connect(url)
    create_schema(engine)
    store = OrderStore(engine)
    done = store.create("done", "a.jpg", "resize,blur")
    store.set_status(done, RunStatus.RUNNING)
    for position, task in enumerate(("resize", "blur")):
        store.start_task(done, position, 1, task)
        store.finish_task(done, position, 1, "SUCCEEDED", output=f"/out/{position}.png")
    MeasurementWriter(engine).write([Sample((), "resize", done, "cpu", 90.0, 1_700_000_000_000 + i * 1000, 0, 1)
                                     for i in range(3)])
    DeviationStore(engine).write([Deviation(done, "resize", 0, "cpu", 1_700_000_000_000 + i * 1000, 90.0, 50.0,
                                            40.0, 60.0, 4.0, "1", i > 0) for i in range(3)])
    store.set_status(done, RunStatus.SUCCEEDED)
    failing = store.create("failing", "b.jpg", "sharpen")
    store.set_status(failing, RunStatus.RUNNING)
    store.start_task(failing, 0, 1, "sharpen")
    store.finish_task(failing, 0, 1, "FAILED", error="RuntimeError: boom")
    store.set_status(failing, RunStatus.FAILED, "task 1 (sharpen) failed: RuntimeError: boom")
    return done, failing


def test_status_lists_orders_newest_first_with_runs_samples_and_anomalies(database, capsys):
    done, failing = database
    assert cli.main(["status", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["order_id"] for r in reports] == [failing, done]
    first, second = reports
    assert (first["status"], first["samples"], first["anomalies"]) == ("FAILED", 0, 0)
    assert first["runs"][0]["error"] == "RuntimeError: boom"
    assert (second["status"], second["samples"], second["anomalies"]) == ("SUCCEEDED", 3, 2)
    assert [(r["task"], r["status"]) for r in second["runs"]] == [("resize", "SUCCEEDED"), ("blur", "SUCCEEDED")]
    assert second["seconds"] is not None and second["seconds"] >= 0

    assert cli.main(["status", str(done)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith(f"order {done} done: SUCCEEDED")
    assert "3 samples, 2 anomalies" in text and "2. blur" in text


def test_an_unknown_order_or_a_bad_limit_is_one_line_and_status_2(database, capsys):
    assert exit_status(lambda: cli.main(["status", "424242"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no order 424242") and len(err.strip().splitlines()) == 1
    assert exit_status(lambda: cli.main(["status", "--limit", "0"])) == 2


def test_an_order_whose_orchestrator_is_gone_says_so(database, capsys, tmp_path):
    import subprocess
    import sys

    from pipeline.db.owners import Owner

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    engine = connect(f"sqlite:///{tmp_path / 'status.db'}")
    orphan = OrderStore(engine, owner=Owner(Owner.me().host, child.pid, 1)).create("orphan", "c.jpg", "blur")
    OrderStore(engine, owner=Owner.me()).create("live", "d.jpg", "blur")

    assert cli.main(["status", "--json"]) == 0
    reports = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert reports["orphan"]["orchestrator_gone"] is True
    assert reports["orphan"]["orchestrator"] == f"pid {child.pid} on {Owner.me().host}"
    assert reports["live"]["orchestrator_gone"] is False
    assert reports["done"]["orchestrator_gone"] is False  # finished: nothing to mark
    assert cli.main(["status", str(orphan)]) == 0
    assert "PENDING (its orchestrator, pid" in capsys.readouterr().out
