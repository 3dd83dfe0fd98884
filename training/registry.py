"""Load a registered expected-usage model as the raw :class:`ExpectedUsageModel`.

For live scoring and for comparing a new fit with the champion: the saved model directory is
taken from the version's logged artifacts, so no pyfunc wrapper (and no re-import of the
``models`` package from the model's code copy) is involved.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from sqlalchemy.engine import make_url

from models.expected_usage import ExpectedUsageModel
from models.pyfunc import ARTIFACT_KEY
from pipeline.errors import TrainingError
from training.tracking import CHAMPION_ALIAS, MODEL_NAME

logger = logging.getLogger(__name__)


def load_expected_usage(tracking_uri: str, version: str | int | None = None,
                        device: str = "cpu") -> tuple[ExpectedUsageModel, str] | None:
    """The registered ``expected-usage`` model and its version.

    ``version`` None means the version the ``champion`` alias points at. Returns None when
    no such model, version or alias is registered; raises :class:`TrainingError` when the
    store cannot be read or the version's files are not a model this code can load.
    """
    if _missing_sqlite_store(tracking_uri):
        return None  # nothing registered yet; touching the store would create and migrate it
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if version is None:
            found = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
        else:
            found = client.get_model_version(MODEL_NAME, str(version))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrainingError(f"cannot read the model registry at {tracking_uri}: {exc.message}") from exc
    found_version = str(found.version)
    with tempfile.TemporaryDirectory(prefix="expected-usage-") as folder:
        try:
            # The version's storage location, not a models:/ URI: that one would be resolved
            # against the process-wide registry, which need not be ``tracking_uri``.
            source = client.get_model_version_download_uri(MODEL_NAME, found_version).rstrip("/")
            mlmodel = _download(f"{source}/MLmodel", folder, tracking_uri)
            relative = Model.load(mlmodel).flavors["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
            model = ExpectedUsageModel.load(_download(f"{source}/{relative}", folder, tracking_uri),
                                            device=device)
        except (MlflowException, OSError, KeyError, ValueError) as exc:
            raise TrainingError(f"{MODEL_NAME} version {found_version} cannot be loaded: "
                                f"{exc.__class__.__name__}: {exc}") from exc
    logger.info("loaded model=%s version=%s", MODEL_NAME, found_version)
    return model, found_version


def _download(uri: str, folder: str, tracking_uri: str) -> Path:
    """A local path to ``uri``: read in place on a local store, downloaded from a remote one."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder,
                                                    tracking_uri=tracking_uri))


def _missing_sqlite_store(tracking_uri: str) -> bool:
    if not tracking_uri.startswith("sqlite:"):
        return False
    database = make_url(tracking_uri).database
    return bool(database) and database != ":memory:" and not Path(database).expanduser().exists()
