"""MLflow bookkeeping of a fit: the experiment, the logged model, its version and the alias.

Works on the project's default local store (``sqlite:///<state_dir>/mlflow.db``) with no
server. On such a store MLflow would put artifacts in ``./mlruns`` of whatever folder the
command runs from, so a new experiment gets an artifact folder beside the database instead.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import ColSpec, Schema
from sqlalchemy.engine import make_url

import models
from models.expected_usage import ExpectedUsageModel
from models.features import CATEGORICAL, FEATURE_COLUMNS, OPTIONAL
from models.pyfunc import ARTIFACT_KEY
from training.registry_probe import CHAMPION_ALIAS, MODEL_NAME

logger = logging.getLogger(__name__)

_PACKAGE = Path(models.__file__).resolve().parent  # logged with the model as its code


def use_store(tracking_uri: str) -> None:
    """Point this process's MLflow (tracking and registry) at ``tracking_uri``."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with a local artifact folder) when missing."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(tracking_uri, name))


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """``<folder of the sqlite file>/mlartifacts/<experiment>`` for a SQLite store, else None
    (the server decides)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    database = make_url(tracking_uri).database
    if not database or database == ":memory:":
        return None
    folder = Path(database).expanduser().resolve().parent / "mlartifacts" / experiment
    return folder.as_uri()


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
    """``frame``'s feature columns with the types of the signature: categories as strings,
    every other feature a float (a feature the frame lacks, such as a pressure a node does not
    report, is missing: NaN)."""
    example = frame.reindex(columns=FEATURE_COLUMNS).reset_index(drop=True)
    return example.astype({c: object if c in CATEGORICAL else "float64" for c in FEATURE_COLUMNS})


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


def champion_version(client: MlflowClient) -> str | None:
    """The version the ``champion`` alias points at, or None."""
    try:
        return str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


def promote(client: MlflowClient, version: str) -> None:
    """Move the ``champion`` alias to ``version``."""
    client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)
    logger.info("model=%s version=%s is now %s", MODEL_NAME, version, CHAMPION_ALIAS)


def _missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
