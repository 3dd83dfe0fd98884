"""The special folds of ``training fit``: which orders the unseen-parameter fold tests on."""

from __future__ import annotations

import json

import pandas as pd

from training.folds import unseen_parameter_fold


def _frame(settings: list[dict]) -> pd.DataFrame:
    rows = [{"order_id": i, "position": 0, "attempt": 1, "task": "median", "params": json.dumps(params),
             "image_pixels": 640 * 480, "resource": "cpu", "value": 90.0}
            for i, params in enumerate(settings)]
    return pd.DataFrame(rows)


def test_the_unseen_parameter_fold_holds_out_each_varied_parameters_largest_value():
    """passes took 1, 2 and 3, size 3 and 5: the orders with 3 passes or size 5 are tested on,
    the others trained on (size never varies there: a setting the history always had the same,
    which a user may still change)."""
    settings = [{"passes": passes, "size": size} for passes in (1, 2, 3) for size in (3, 5)] * 3
    fold = unseen_parameter_fold(_frame(settings), 4, seed=0)
    tested = [json.loads(p) for p in fold.test.drop_duplicates("order_id")["params"]]
    learned = [json.loads(p) for p in fold.learning().drop_duplicates("order_id")["params"]]
    assert all(p["passes"] == 3 or p["size"] == 5 for p in tested) and len(tested) == 12
    assert {(p["passes"], p["size"]) for p in learned} == {(1, 3), (2, 3)}


def test_no_unseen_parameter_fold_when_no_parameter_varied():
    settings = [{"passes": 2, "size": 3}] * 12
    assert unseen_parameter_fold(_frame(settings), 4, seed=0) is None
