"""The MLflow ``python_function`` face of :class:`~models.expected_usage.ExpectedUsageModel`.

Logged with the ``models`` package as code and the saved model directory as an artifact, so
``mlflow.pyfunc.load_model("models:/expected-usage@champion")`` works in a fresh process and
predicts p10/p50/p90 from a frame with FEATURE_COLUMNS.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from models.expected_usage import ExpectedUsageModel

ARTIFACT_KEY = "expected_usage"


class ExpectedUsagePyfunc(mlflow.pyfunc.PythonModel):
    """Loads the saved model from the ``expected_usage`` artifact; predicts on the CPU."""

    def __init__(self) -> None:
        self.model: ExpectedUsageModel | None = None

    def load_context(self, context) -> None:
        self.model = ExpectedUsageModel.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """p10, p50 and p90 for every row of ``model_input`` (a DataFrame)."""
        return self.model.predict(pd.DataFrame(model_input))
