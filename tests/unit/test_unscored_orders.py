"""An order that will not be scored says so, and a consumer with nothing to score stays light
(issue 25: orders started right after a fit were silently not scored)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

from orchestrator.anomalies import unscored_reason, wait_for_scoring
from orchestrator.cli import add_anomalies
from orchestrator.report import OrderResult, format_summary
from pipeline.db import MeasurementWriter, connect, create_schema
from pipeline.db.orders import OrderStore, RunStatus
from pipeline.protocol import Sample
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_the_run_can_tell_when_its_orders_are_not_scored(tmp_path):
    base = {"PIPELINE_STATE_DIR": str(tmp_path)}
    assert unscored_reason(Settings.from_env({**base, "LIVE_SCORING": "off"})) == \
        "live scoring is off (LIVE_SCORING=off)"
    assert unscored_reason(Settings.from_env(base)) == \
        "no expected-usage model is registered yet (train one with `python -m training fit`)"
    # A store that cannot be asked cheaply: the monitor-consumer finds out.
    assert unscored_reason(Settings.from_env({**base, "MLFLOW_TRACKING_URI": "http://mlflow:5000"})) is None


def test_an_order_with_samples_but_no_deviation_row_where_scoring_was_expected_says_so(tmp_path):
    engine = connect(f"sqlite:///{tmp_path / 'pipeline.db'}")
    create_schema(engine)
    order_id = OrderStore(engine).create("plain", "a.jpg", "blur")
    MeasurementWriter(engine).write([Sample((), "blur", order_id, "cpu", 50.0, 1_700_000_000_000 + s * 1000, 0, 1)
                                     for s in range(4)])
    assert wait_for_scoring(engine, [order_id], timeout=0.2) == set()  # unscored: not waited for
    assert wait_for_scoring(engine, [order_id], timeout=0.2, expected=True) == {order_id}

    feed = SimpleNamespace(received=lambda _order_id: [])
    stop = threading.Event()
    stop.set()  # no waiting here
    quiet = OrderResult("plain", "p.json", order_id, RunStatus.SUCCEEDED, rows=4)
    add_anomalies(engine, [quiet], feed, stop, expected=False)
    assert quiet.anomalies is None and quiet.warnings == []
    said = OrderResult("plain", "p.json", order_id, RunStatus.SUCCEEDED, rows=4)
    add_anomalies(engine, [said], feed, stop, expected=True)
    assert "  warning: not scored so far: no deviation row is stored for its samples" in format_summary([said])
    assert f"python -m monitor rescore {order_id}" in format_summary([said])


LIGHT_CONSUMERS = """
import sys
from monitor.consumer import MonitorConsumer
from pipeline.db import connect, create_schema
from pipeline.db.orders import OrderStore
from pipeline.protocol import Sample
from pipeline.settings import Settings

settings = Settings.from_env()
engine = connect(settings.database_url)
create_schema(engine)
shared = MonitorConsumer(settings, None)
shared._start_scoring(engine, None)
own = MonitorConsumer(settings, None, order_id=1)
own._start_scoring(engine, None)
order_id = OrderStore(engine).create("new", "a.jpg", "blur")
shared.scorer._follow_new_orders([Sample((), "blur", order_id, "cpu", 1.0, 0, 0, 1)])
print(shared.scorer is not None, shared.scorer.detector is None, own.scorer is None,
      "mlflow" in sys.modules, "torch" in sys.modules)
shared.scorer.close()
"""


def test_a_shared_consumer_without_a_champion_keeps_a_scorer_that_imports_neither_mlflow_nor_torch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MLFLOW_TRACKING_URI",
                                                           "KAFKA_BOOTSTRAP_SERVERS", "LIVE_SCORING")}
    env.update(PIPELINE_STATE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", LIGHT_CONSUMERS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # The shared one waits for the first champion; a per-order one has none to wait for.
    assert done.stdout.split() == ["True", "True", "True", "False", "False"]
    assert "orders started after it are scored with it" in done.stderr
