"""`python -m monitor plot`: a panel per resource, the five measured ones first and then any
other the order has (scored, such as cpu_demand, or context, such as node_cpu_pressure), and
one legend outside every panel, so that it never hides a sample."""

from __future__ import annotations

from datetime import datetime, timezone

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from analysis.plots import draw_run, plot_order
from pipeline.db import MeasurementWriter, connect, create_schema
from pipeline.db.deviations import DeviationStore
from pipeline.protocol import Deviation, Sample
from pipeline.db.orders import OrderStore, RunStatus
from pipeline.settings import Settings

T0 = 1_700_000_000_000
FIVE = ("cpu", "memory", "disk_read", "disk_write", "cpu_wait")


def _rows(order_id: int, resources, seconds: int = 6) -> list[Deviation]:
    # A CPU hog from second 3 on: high values right where a legend inside a panel would sit.
    return [Deviation(order_id, "median", 0, resource, T0 + s * 1000, 400.0 if s >= 3 else 95.0, 95.0, 85.0,
                      110.0, 25.0 if s >= 3 else 0.0, "1", s >= 5)
            for s in range(1, seconds + 1) for resource in resources]


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'plots.db'}")
    monkeypatch.setenv("PIPELINE_STATE_DIR", str(tmp_path / "state"))
    return Settings.from_env()


def _scored_order(settings: Settings, resources, context=()) -> int:
    engine = connect(settings.database_url)
    create_schema(engine)
    store = OrderStore(engine)
    order_id = store.create("hog", "a.jpg", "median")
    store.set_status(order_id, RunStatus.RUNNING)
    store.start_task(order_id, 0, 1, "median", started=datetime.fromtimestamp(T0 / 1000, tz=timezone.utc))
    rows = _rows(order_id, resources)
    measured = [r for r in rows if r.resource in FIVE]
    MeasurementWriter(engine).write(
        [Sample((), r.task, order_id, r.resource, r.value, r.timestamp_ms, 0, 1) for r in measured]
        + [Sample((), "median", order_id, resource, 30.0, T0 + s * 1000, 0, 1)
           for resource in context for s in range(1, 7)])
    DeviationStore(engine).write(rows)
    return order_id


def test_the_five_resources_are_the_panels_in_order(settings, tmp_path):
    order_id = _scored_order(settings, FIVE)
    result = plot_order(settings, order_id, tmp_path / "plots")
    assert len(result.files) == 1
    with Image.open(result.files[0]) as image:
        assert image.text["Panels"] == "cpu,memory,disk_read,disk_write,cpu_wait"


def test_scored_and_context_resources_beyond_the_five_get_panels_after_them(settings, tmp_path):
    order_id = _scored_order(settings, (*FIVE, "cpu_demand"), context=("node_cpu_pressure",))
    result = plot_order(settings, order_id, tmp_path / "plots")
    with Image.open(result.files[0]) as image:
        assert image.text["Panels"] == "cpu,memory,disk_read,disk_write,cpu_wait,cpu_demand,node_cpu_pressure"
    assert "12 anomalous samples of 36" in result.summary  # context samples are not scored


def test_the_legend_lies_outside_every_panel_and_inside_the_figure():
    rows = _rows(1, (*FIVE, "cpu_demand"))
    figure = draw_run(1, 0, rows, [*FIVE, "cpu_demand"], set(FIVE) | {"cpu_demand"}, "1", T0)
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        assert len(figure.legends) == 1
        legend = figure.legends[0]
        box = legend.get_window_extent(renderer)
        assert [t.get_text() for t in legend.get_texts()] == [
            "expected band (P10-P90)", "expected (P50)", "actual", "anomaly"]
        for ax in figure.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_ylabel()
            assert ax.get_legend() is None
        assert figure.bbox.contains(box.x0, box.y0) and figure.bbox.contains(box.x1, box.y1)
    finally:
        plt.close(figure)
