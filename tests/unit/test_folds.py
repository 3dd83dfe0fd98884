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


def test_the_unseen_parameter_fold_holds_out_the_largest_value_of_a_parameter_seen_at_three_or_more():
    """passes took 1, 2 and 3: the orders with 3 are tested on, trained on 1 and 2. size took
    3 and 5 only: held out at 5, the training orders would all have size 3 and teach nothing
    of it, so size 5 alone does not put an order in the test part."""
    settings = [{"passes": passes, "size": size} for passes in (1, 2, 3) for size in (3, 5)] * 3
    fold = unseen_parameter_fold(_frame(settings), 4, seed=0)
    tested = [json.loads(p) for p in fold.test.drop_duplicates("order_id")["params"]]
    learned = [json.loads(p) for p in fold.learning().drop_duplicates("order_id")["params"]]
    assert {p["passes"] for p in tested} == {3} and {p["size"] for p in tested} == {3, 5}
    assert {p["passes"] for p in learned} == {1, 2} and {p["size"] for p in learned} == {3, 5}


def test_no_unseen_parameter_fold_when_no_parameter_took_three_values():
    settings = [{"passes": passes, "size": 3} for passes in (1, 2)] * 6
    assert unseen_parameter_fold(_frame(settings), 4, seed=0) is None
