"""Logging a fit's model to MLflow: the pyfunc model with its code, signature and example.

The store, the experiment, the registered versions and the ``champion`` alias are the
registry's (:mod:`models.registry`), which scoring shares.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, Schema

import models
from models.expected_usage import ExpectedUsageModel
from models.features import CATEGORICAL, FEATURE_COLUMNS, OPTIONAL
from models.rows import NO_PARAMS
from models.pyfunc import ARTIFACT_KEY
from models.registry_probe import MODEL_NAME

logger = logging.getLogger(__name__)

_PACKAGE = Path(models.__file__).resolve().parent  # logged with the model as its code


def log_model(model: ExpectedUsageModel, example: pd.DataFrame) -> ModelInfo:
    """Log ``model`` as a pyfunc model in the active run and register a new version."""
    example = input_example(example)
    signature = model_signature(example, model.predict(example))
    with tempfile.TemporaryDirectory() as folder:
        saved = model.save(Path(folder) / "expected_usage")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_PACKAGE / "pyfunc_entry.py"),
            artifacts={ARTIFACT_KEY: str(saved)},
            code_paths=[str(_PACKAGE)],
            signature=signature,
            input_example=example,
            registered_model_name=MODEL_NAME,
            pip_requirements=_requirements(),
        )


def input_example(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s feature columns with the types of the signature: categories and the task
    parameters (JSON) as strings, every other feature a float (a feature the frame lacks, such
    as a pressure a node does not report, is missing: NaN; parameters not given are ``{}``)."""
    example = frame.reindex(columns=FEATURE_COLUMNS).reset_index(drop=True)
    example["params"] = example["params"].fillna(NO_PARAMS)
    return example.astype({c: object if c in TEXT else "float64" for c in FEATURE_COLUMNS})


TEXT = (*CATEGORICAL, "params")


def model_signature(example: pd.DataFrame, predicted: pd.DataFrame) -> ModelSignature:
    """The signature inferred from ``example``, with models.features.OPTIONAL optional: a node
    without PSI reports none, and the model then takes the training median (so a caller that
    does not send the column still gets an answer, as from the model itself)."""
    inferred = infer_signature(example, predicted)
    inputs = Schema([ColSpec(c.type, c.name, required=c.required and c.name not in OPTIONAL)
                     for c in inferred.inputs.inputs])
    return ModelSignature(inputs=inputs, outputs=inferred.outputs)


def _requirements() -> list[str]:
    # Given, not inferred: inference loads the model in a subprocess, slow and noisy.
    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"pandas=={pd.__version__}", f"numpy=={np.__version__}"]
