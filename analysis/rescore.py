"""``python -m monitor rescore ORDER_ID [--model VERSION]``: recompute an order's deviations
from its stored samples with any model version, so a new model can be judged on past orders."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from analysis.order_context import order_samples
from analysis.scoring import model_detector
from pipeline.db import connect, create_schema
from pipeline.db.retry import retrying
from pipeline.db.deviations import DeviationStore
from pipeline.errors import PipelineError
from pipeline.settings import Settings

logger = logging.getLogger(__name__)


class RescoreError(PipelineError):
    """Nothing to rescore with, or nothing to rescore."""

    exit_code = 2


@dataclass(frozen=True)
class RescoreResult:
    order_id: int
    model_version: str
    scored: int
    anomalies: Counter  # (task, position, resource) -> anomalous samples


def rescore(settings: Settings, order_id: int, version: str | None = None) -> RescoreResult:
    """Score every stored sample of ``order_id`` with ``version`` (default: the champion)."""
    from models.registry import load_expected_usage

    engine = connect(settings.database_url)
    patience = settings.db_retry_seconds
    retrying(lambda: create_schema(engine), "preparing the schema", patience)
    loaded = load_expected_usage(settings.mlflow_tracking_uri, version)
    if loaded is None:
        which = f"version {version}" if version else "a 'champion' version"
        raise RescoreError(f"expected-usage has no {which} in {settings.mlflow_tracking_uri}; "
                           "train one with `python -m training fit`")
    model, model_version = loaded
    samples = retrying(lambda: order_samples(engine, order_id), f"order {order_id}: reading its samples", patience)
    if not samples:
        raise RescoreError(f"order {order_id} has no stored samples in {settings.database_url.split('@')[-1]}")
    results = model_detector(model, settings, model_version).replay(samples)
    retrying(lambda: DeviationStore(engine).replace(order_id, results, model_version),
             f"order {order_id}: storing its deviations", patience)
    anomalies = Counter((r.task, r.index, r.resource) for r in results if r.anomaly)
    logger.info("order_id=%d rescored %d samples with version %s: %d anomalous",
                order_id, len(results), model_version, sum(anomalies.values()))
    return RescoreResult(order_id, model_version, len(results), anomalies)
