"""Live deviation scoring end to end: train on normal runs, inject faults, find them.

One module-wide set-up (it takes a few minutes on two cores): a fresh database and MLflow
store, a history of normal orders, one fitted model; then orders with an injected CPU hog and
memory leak, and a normal order, run with live scoring in the monitor-consumer.

The outcome must not depend on how busy the machine is, so the faults lie far outside what
the history can produce. The faulty task (a median filter) is single-threaded: it never
demands more than one core. The hog spins a child more than there are CPUs, so the tree
demands several: on a quiet machine that shows as cpu well above one core; where other work
keeps the cores busy, the kernel gives the task's session its share and the spinners wait,
which shows as cpu_wait far above anything the history had. The leak adds hundreds of MiB.
A consumer that scores loads its model before the order's first task starts, so healthy runs
are measured under the same conditions as the history. How fast a fault is flagged is a
figure of bench/detection.py, not a test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from pipeline.db import connect
from pipeline.db.deviations import DeviationStore
from pipeline.kafka import Consumer
from pipeline.protocol import ANOMALIES_TOPIC, Deviation
from pipeline.settings import Settings
from devkit.orders import REPO, child_env, run_orchestrator, stored_orders, write_order
from devkit.servers import fresh_database, settings_for

# About 7 s of one core on the colour image: long enough that the fault starts well inside
# the task's normal life, where the model has seen what to expect.
HEAVY = {"name": "median", "params": {"size": 9, "passes": 8}}
NORMAL_TASKS = [HEAVY, "grayscale", "sharpen"]
FAULT_AT = 2.0


@dataclass
class Trained:
    settings: Settings
    folder: Path
    orders: dict  # name -> StoredOrder of the scored orders
    run_began_ms: int
    scored: subprocess.CompletedProcess  # the orchestrator's run of the scored orders


def _python(settings: Settings, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(settings),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(infra_env, tmp_path_factory) -> Trained:
    folder = tmp_path_factory.mktemp("detection")
    with fresh_database(infra_env["DATABASE_URL"]) as database_url:
        settings = settings_for(infra_env, database_url, folder)
        normal = write_order(folder, "history", NORMAL_TASKS, image="scene-1024x768.jpg")
        collected = run_orchestrator(settings, str(normal), "--repeat", "10", "--max-concurrent", "1", timeout=900)
        assert collected.returncode == 0, collected.stderr[-3000:]
        fit = _python(settings, "-m", "training", "fit", "--min-orders", "6", "--no-progress", "--seed", "1")
        assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]

        import time

        began = int(time.time() * 1000)
        files = [
            write_order(folder, "cpu-hog", [{**HEAVY, "fault": "cpu_hog", "fault_at": FAULT_AT}, "grayscale", "sharpen"],
                        image="scene-1024x768.jpg", retry={"max_attempts": 1}),
            write_order(folder, "memory-leak", [{**HEAVY, "fault": "memory_leak", "fault_at": FAULT_AT}, "grayscale",
                                                "sharpen"], image="scene-1024x768.jpg", retry={"max_attempts": 1}),
            write_order(folder, "normal", NORMAL_TASKS, image="scene-1024x768.jpg"),
            # a release that holds far more memory, from the start: judged on the run's peak (the
            # rate at which 1.5x is caught is a figure of bench/detection.py, not of this test)
            write_order(folder, "extra-memory", [{**HEAVY, "fault": "extra_memory", "fault_factor": 2.5}, "grayscale",
                                                 "sharpen"], image="scene-1024x768.jpg", retry={"max_attempts": 1}),
            # a release whose light last task does its work 2.5 times over: most of that task's
            # CPU time is its process's fixed part, its operation's own time is what shows it
            write_order(folder, "extra-work", [HEAVY, "grayscale", {"name": "sharpen", "fault": "extra_work",
                                                                     "fault_factor": 2.5}],
                        image="scene-1024x768.jpg", retry={"max_attempts": 1}),
        ]
        scored = run_orchestrator(settings, *map(str, files), "--max-concurrent", "1", timeout=600)
        assert scored.returncode == 0, scored.stderr[-3000:]
        orders = {name: order for name, order in stored_orders(settings).items() if name != "history"}
        yield Trained(settings, folder, orders, began, scored)


def _deviations(trained: Trained, name: str, version: str = "1"):
    return DeviationStore(connect(trained.settings.database_url)).read(trained.orders[name].id, version)


# A CPU hog shows as CPU demand (cpu + cpu_wait: the spinners run or wait to run, however busy
# the machine), or as an overrun: the run's CPU time goes past what its work needs.
FAULT_RESOURCES = {"cpu-hog": {"cpu_demand", "cpu_seconds"}, "memory-leak": {"memory", "peak_memory"}}
RUN_TOTALS = ("cpu_seconds", "operation_seconds", "peak_memory", "bytes_read", "bytes_written")


@pytest.mark.parametrize("order", ["cpu-hog", "memory-leak"])
def test_an_injected_fault_is_flagged_on_the_faulty_task_and_resource_after_it_began(trained, order):
    stored = trained.orders[order]
    rows = _deviations(trained, order)
    assert rows, "live scoring stored no deviations"
    faulty_run = next(r for r in stored.runs if r["position"] == 0)
    fault_start_ms = faulty_run["started_at"].timestamp() * 1000 + FAULT_AT * 1000
    resources = FAULT_RESOURCES[order]
    flagged = [r for r in rows if r.anomaly and r.index == 0 and r.resource in resources]
    assert flagged, f"no anomaly on {resources} of the faulty task; scores: " + \
        str([(r.resource, round(r.score, 1)) for r in rows if r.index == 0 and r.resource in resources])
    # Flagged while the faulty run ran, and not before its fault began.
    first = min(r.timestamp_ms for r in flagged)
    assert fault_start_ms <= first <= faulty_run["finished_at"].timestamp() * 1000 + 1500
    # The healthy tasks after it raise nothing.
    assert not [r for r in rows if r.anomaly and r.index != 0]


def test_a_regression_of_a_runs_peak_memory_is_flagged_at_its_end(trained):
    """2.5 times the memory of a healthy run from the start: the run's peak, judged when its
    closing sample is stored, is an anomaly raised at the run's end."""
    rows = _deviations(trained, "extra-memory")
    faulty_run = next(r for r in trained.orders["extra-memory"].runs if r["position"] == 0)
    verdicts = {r.resource: r for r in rows if r.index == 0 and r.resource in RUN_TOTALS}
    assert verdicts["peak_memory"].anomaly, verdicts  # (whether it raised the episode is not stored)
    assert verdicts["peak_memory"].value > 1.8 * verdicts["peak_memory"].expected
    assert verdicts["peak_memory"].timestamp_ms <= faulty_run["finished_at"].timestamp() * 1000 + 1500
    assert not [r for r in rows if r.anomaly and r.index != 0]


def test_every_run_gets_a_verdict_on_its_totals(trained):
    for name, order in trained.orders.items():
        rows = _deviations(trained, name)
        judged = {(r.index, r.resource) for r in rows if r.resource in RUN_TOTALS}
        for run in order.runs:
            assert {(run["position"], "cpu_seconds"), (run["position"], "operation_seconds"),
                    (run["position"], "peak_memory")} <= judged, (name, run)
            # the task reported its operation's CPU time, the orchestrator stored it
            assert run["operation_ns"] > 0, (name, run)


def test_a_light_tasks_work_done_over_is_flagged_on_its_operations_cpu_time(trained):
    rows = _deviations(trained, "extra-work")
    run = next(r for r in trained.orders["extra-work"].runs if r["position"] == 2)
    verdict = next(r for r in rows if r.index == 2 and r.resource == "operation_seconds")
    assert verdict.anomaly, verdict
    assert verdict.value > 1.8 * verdict.expected
    assert verdict.timestamp_ms <= run["finished_at"].timestamp() * 1000 + 1500
    assert not [r for r in rows if r.anomaly and r.index != 2]


def test_a_normal_order_raises_no_anomaly(trained):
    rows = _deviations(trained, "normal")
    assert rows and not [r for r in rows if r.anomaly]


def test_anomalies_are_published_with_order_task_and_resource(trained):
    ids = {str(o.id) for o in trained.orders.values()}
    found = []
    with Consumer(trained.settings) as consumer:
        consumer.assign([ANOMALIES_TOPIC])
        idle = 0
        while idle < 6:
            message = consumer.poll(0.5)
            if message is None:
                idle += 1
                continue
            if message.header("order_id") in ids and message.timestamp_ms >= trained.run_began_ms:
                found.append(Deviation.decode(message))
    raised = {(a.order_id, a.task, a.index, a.resource) for a in found}
    for order, resources in {**FAULT_RESOURCES, "extra-memory": {"peak_memory"}}.items():
        assert {(trained.orders[order].id, "median", 0, r) for r in resources} & raised, order
    assert all(a.model_version == "1" for a in found)


def test_the_orchestrator_shows_an_anomaly_as_it_is_raised_and_in_the_orders_summary(trained):
    hog, normal = trained.orders["cpu-hog"].id, trained.orders["normal"].id
    progress, summary = trained.scored.stderr, trained.scored.stdout
    assert re.search(rf"^\[ *[0-9.]+s\] order {hog} cpu-hog: ANOMALY task 1/3 median [a-z_]+ [0-9.]+.*? against band ",
                     progress, re.MULTILINE), progress[-3000:]
    blocks = {int(b.split()[0]): b for b in re.split(r"^order ", summary, flags=re.MULTILINE) if b.strip()}
    assert re.match(rf"{hog} cpu-hog \(.*\): SUCCEEDED in .*, \d+ ANOMAL(Y|IES)$", blocks[hog].splitlines()[0])
    assert "  ANOMALY task 1 median: " in blocks[hog] and "ANOMALY task 2" not in blocks[hog], blocks[hog]
    assert "  no anomalies" in blocks[normal] and "ANOMALY" not in blocks[normal], blocks[normal]


def test_rescoring_with_two_model_versions_keeps_rows_for_both(trained):
    refit = _python(trained.settings, "-m", "training", "fit", "--min-orders", "6", "--no-progress", "--seed", "2")
    assert refit.returncode == 0, refit.stderr[-3000:]
    order_id = trained.orders["cpu-hog"].id
    for version in ("1", "2"):
        result = _python(trained.settings, "-m", "monitor", "rescore", str(order_id), "--model", version)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"version {version}" in result.stdout
    store = DeviationStore(connect(trained.settings.database_url))
    assert store.versions(order_id) == ["1", "2"]
    first, second = store.read(order_id, "1"), store.read(order_id, "2")
    # A deviation row per stored sample of the task's own usage (not the node's pressure), and
    # the derived cpu_demand and any overrun besides.
    own = [s for s in trained.orders["cpu-hog"].samples if s["resource"] != "node_cpu_pressure"]
    for rows in (first, second):
        assert len([r for r in rows if r.resource not in ("cpu_demand", *RUN_TOTALS)]) == len(own)
        assert {r.resource for r in rows} >= {"cpu", "memory", "cpu_wait", "cpu_demand"}
    missing = _python(trained.settings, "-m", "monitor", "rescore", str(order_id), "--model", "99")
    assert missing.returncode == 2 and "no version 99" in missing.stderr


FIVE = ("cpu", "memory", "disk_read", "disk_write", "cpu_wait")


def test_the_plot_command_draws_one_png_per_task_with_a_panel_per_resource(trained):
    order = trained.orders["cpu-hog"]
    out = trained.folder / "plots"
    result = _python(trained.settings, "-m", "monitor", "plot", str(order.id), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    # The five measured resources first, then whatever else the order has: derived resources
    # the model scores (cpu_demand) and context samples (node_cpu_pressure), each once.
    store = DeviationStore(connect(trained.settings.database_url))
    others = ({s["resource"] for s in order.samples}
              | {r.resource for v in store.versions(order.id) for r in store.read(order.id, v)}) - set(FIVE)
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 300
            panels = image.text["Panels"].split(",")
            assert panels[:5] == list(FIVE) and sorted(panels[5:]) == sorted(others), panels
    assert "deviated first: task 1 median" in result.stdout
    assert "logged to MLflow run" in result.stdout
    # Artifacts go beside the store, never into the working folder.
    assert not (REPO / "mlruns").exists()
    assert list((trained.folder / "mlartifacts" / "deviation-plots").rglob("*.png"))
