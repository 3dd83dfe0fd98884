"""The MLflow model registry of the expected-usage model: where the store is, which version is
the ``champion``, and loading a version as the raw :class:`ExpectedUsageModel`.

Training registers and promotes versions; live scoring, rescoring and plots read them. Loading
takes the saved model directory from the version's logged artifacts, so no pyfunc wrapper (and
no re-import of the ``models`` package from the model's code copy) is involved. Whether a
champion can exist at all, asked without importing MLflow, is :mod:`models.registry_probe`.

Works on the project's default local store (``sqlite:///<state_dir>/mlflow.db``) with no
server. On such a store MLflow would put artifacts in ``./mlruns`` of whatever folder the
command runs from, so a new experiment gets an artifact folder beside the database instead.
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
from models.registry_probe import CHAMPION_ALIAS, MODEL_NAME
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


class RegistryError(PipelineError):
    """The model registry cannot be read, or a registered version cannot be loaded."""

    exit_code = 2


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


def load_expected_usage(tracking_uri: str, version: str | int | None = None,
                        device: str = "cpu") -> tuple[ExpectedUsageModel, str] | None:
    """The registered ``expected-usage`` model and its version.

    ``version`` None means the version the ``champion`` alias points at. Returns None when
    no such model, version or alias is registered; raises :class:`RegistryError` when the
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
        if _missing(exc):
            return None
        raise RegistryError(f"cannot read the model registry at {tracking_uri}: {exc.message}") from exc
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
            raise RegistryError(f"{MODEL_NAME} version {found_version} cannot be loaded: "
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
