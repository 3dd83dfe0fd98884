"""What a new user does (issue 25): with the shared monitors running and no model registered,
run orders (they are not scored, and the run says so once), fit, and at once run more: these
are scored, from their first samples on, with the model the fit registered (and so is an
order with monitors of its own, whose consumer starts after the fit).

The shared consumer starts before any model exists; it takes the first champion in use for
the first order created after the fit (monitor/live_scoring.py), not on a timer.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from sqlalchemy import func, select

from devkit.orders import REPO, child_env, ran_orders, run_orchestrator, write_order
from devkit.waiting import wait_for
from models.registry import champion_version
from ops.infra.shared_monitors import SharedMonitors
from pipeline.db import connect
from pipeline.db.deviations import DeviationStore
from pipeline.db.schema import deviations, measurements
from pipeline.settings import Monitors

NOTE = ("note: orders are not scored: no expected-usage model is registered yet "
        "(train one with `python -m training fit`)")


@pytest.fixture()
def shared(settings):
    """The shared services for this test's broker, database and (empty) model store."""
    services = SharedMonitors(settings)
    services.start(consumers=1)
    yield services
    services.stop()


def _first_ts(engine, table, order_id: int):
    with engine.connect() as conn:
        return conn.execute(select(func.min(table.c.ts)).where(table.c.order_id == order_id)).scalar()


def test_an_order_started_right_after_a_fit_is_scored_with_the_model_it_registered(settings, shared, tmp_path):
    settings = dataclasses.replace(settings, monitors=Monitors.SHARED)
    files = [write_order(tmp_path, "soften", ["blur", "sharpen"]),
             write_order(tmp_path, "edges", [{"name": "resize", "params": {"width": 320}}, "grayscale",
                                             "edge_detect"], image="china.jpg")]
    history = run_orchestrator(settings, *map(str, files), "--repeat", "4", timeout=600)
    assert history.returncode == 0, history.stderr[-3000:]
    assert "(shared monitors)" in history.stderr
    assert history.stderr.count(NOTE) == 1, history.stderr[-3000:]  # once for the run, not per order
    engine = connect(settings.database_url)
    unscored = ran_orders(settings)
    assert len(unscored) == 8
    store = DeviationStore(engine)
    assert not [o.id for o in unscored if store.versions(o.id)]

    fit = subprocess.run([sys.executable, "-m", "training", "fit", "--min-orders", "6", "--epochs", "20",
                          "--no-progress"], cwd=REPO, env=child_env(settings), capture_output=True, text=True,
                         timeout=600)
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    uri = settings.mlflow_tracking_uri
    version = champion_version(MlflowClient(tracking_uri=uri, registry_uri=uri))
    assert version is not None, fit.stdout[-2000:]

    # At once, several at a time, as the user did.
    after = run_orchestrator(settings, *map(str, files), "--repeat", "2", timeout=600)
    assert after.returncode == 0, after.stderr[-3000:]
    assert NOTE not in after.stderr and "not scored so far" not in after.stdout, after.stdout[-3000:]
    scored = [o for o in ran_orders(settings) if o.id not in {u.id for u in unscored}]
    assert len(scored) == 4
    for order in scored:
        wait_for(lambda: store.versions(order.id), f"deviation rows of order {order.id}")
        assert store.versions(order.id) == [version]
        # Scored from its first sample on: the model was in use before its samples were scored.
        assert _first_ts(engine, deviations, order.id) == _first_ts(engine, measurements, order.id)

    # An order with monitors of its own: its consumer starts after the fit and loads that model.
    own = run_orchestrator(dataclasses.replace(settings, monitors=Monitors.PER_ORDER), str(files[0]), timeout=600)
    assert own.returncode == 0, own.stderr[-3000:]
    [order] = [o for o in ran_orders(settings) if o.id not in {u.id for u in unscored + scored}]
    assert store.versions(order.id) == [version]  # its consumer scores before it confirms the samples
    assert _first_ts(engine, deviations, order.id) == _first_ts(engine, measurements, order.id)
