"""``python -m pipeline deploy``: the pipeline's services on a Kubernetes cluster.

It deploys what ``kubectl apply -k k8s/`` deploys, without needing kustomize: it reads
``k8s/kustomization.yaml`` (its ``namespace``, ``labels`` and ``resources``, the only
fields this module implements; anything else is refused rather than ignored) and the YAML
files it lists, sets the namespace and the common labels as kustomize does, sets
``K8S_NAMESPACE``, ``IMAGE_TAG``, ``IMAGE_REGISTRY`` and ``TOPIC_PREFIX`` of the ConfigMap
``pipeline-settings``, creates the Secrets of every role (:mod:`pipeline.cluster_roles`: the
database's ``pipeline-credentials``, ``kafka-<user>`` and ``mlflow-<user>``), each with a random
password, when it does not exist yet (never changing an existing one), and server-side applies
every object with field manager ``image-pipeline``, the Namespace first.

``--dry-run`` changes nothing: every object goes to the server with ``dryRun=All``, so the
API server validates and admits it without storing it. The server can only check
namespaced objects in a namespace that exists; when it does not exist yet, the dry run
checks the Namespace alone and says so (exit status 1), unless ``--create-namespace`` lets it
create the namespace for real first -- the only change such a dry run makes.

The Kubernetes client is imported lazily, so the other ``python -m pipeline`` commands do
not pay for it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import secrets
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.cluster_roles import (
    DATABASE_SECRET, KAFKA_PASSWORD_KEY, KAFKA_USERNAME_KEY, KAFKA_USERS, MLFLOW_ADMIN,
    MLFLOW_PASSWORD_KEY, MLFLOW_SERVER_KEY, MLFLOW_USERNAME_KEY, MLFLOW_USERS, kafka_secret,
    mlflow_secret,
)
from pipeline.errors import ClusterError, PipelineError, SettingsError
from pipeline.kube import api_message, load_api_client
from pipeline.settings import Settings

# The manifests of a source checkout; an installed package has none: --manifests names them.
K8S_DIR = Path(__file__).resolve().parents[1] / "k8s"
FIELD_MANAGER = "image-pipeline"
SETTINGS_CONFIGMAP = "pipeline-settings"
SECRET_NAME = DATABASE_SECRET
DATABASE_USER = "pipeline"
DATABASE_NAME = "pipeline"
DATABASE_SERVICE = "postgres:5432"

# Kinds without a namespace (kustomize keeps a list like this one too).
CLUSTER_SCOPED_KINDS = frozenset({
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService",
})
_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources"}
_LABEL_FIELDS = {"pairs", "includeSelectors"}


class DeployError(ClusterError):
    """The cluster cannot be reached or used (no kubeconfig, unreachable, 401/403), or the
    manifests cannot be read: nothing (more) is deployed."""

    exit_code = 2


class DeployIncomplete(PipelineError):
    """Some objects were refused by the server, or could not be checked."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class Kustomization:
    """The part of ``k8s/kustomization.yaml`` this module implements."""

    namespace: str
    labels: Mapping[str, str]
    resources: tuple[Path, ...]


def read_kustomization(k8s_dir: Path = K8S_DIR) -> Kustomization:
    """Read ``kustomization.yaml`` of ``k8s_dir``; refuse features this module lacks."""
    path = k8s_dir / "kustomization.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise DeployError(f"{path} does not exist; pass --manifests DIR, the repository's k8s/ folder") from None
    except (OSError, yaml.YAMLError) as exc:
        raise DeployError(f"cannot read {path}: {exc}") from None
    unknown = sorted(set(data) - _KUSTOMIZATION_FIELDS)
    if unknown:
        raise DeployError(f"{path} uses {', '.join(unknown)}, which python -m pipeline deploy "
                          "does not implement; use kubectl apply -k, or keep the file to "
                          "namespace, labels and resources")
    labels: dict[str, str] = {}
    for entry in data.get("labels") or []:
        if set(entry) - _LABEL_FIELDS or entry.get("includeSelectors", False):
            raise DeployError(f"{path}: only labels with includeSelectors: false are implemented")
        labels.update({str(k): str(v) for k, v in (entry.get("pairs") or {}).items()})
    resources = []
    for name in data.get("resources") or []:
        file = k8s_dir / name
        if not file.is_file():
            raise DeployError(f"{path} lists {name}, which is not a file in {k8s_dir}")
        resources.append(file)
    namespace = data.get("namespace")
    if not namespace:
        raise DeployError(f"{path} sets no namespace")
    return Kustomization(namespace=str(namespace), labels=labels, resources=tuple(resources))


def render(k8s_dir: Path = K8S_DIR, namespace: str | None = None,
           settings_values: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The objects of the kustomization, as ``kubectl kustomize`` makes them (in file order).

    ``namespace`` replaces the kustomization's; ``settings_values`` are set in the data of
    the ConfigMap ``pipeline-settings``.
    """
    kustomization = read_kustomization(k8s_dir)
    namespace = namespace or kustomization.namespace
    objects = []
    for file in kustomization.resources:
        try:
            documents = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError) as exc:
            raise DeployError(f"cannot read {file}: {exc}") from None
        for document in documents:
            if not document:
                continue
            if not isinstance(document, dict) or not document.get("kind") or \
                    not (document.get("metadata") or {}).get("name"):
                raise DeployError(f"{file}: every document needs a kind and metadata.name")
            objects.append(_kustomize(copy.deepcopy(document), namespace, kustomization.labels))
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == SETTINGS_CONFIGMAP:
            obj.setdefault("data", {}).update(settings_values or {})
    return objects


def _kustomize(obj: dict[str, Any], namespace: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """kustomize's namespace and label transformers (labels with includeSelectors: false)."""
    metadata = obj["metadata"]
    if labels:
        metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
    if obj["kind"] == "Namespace":
        metadata["name"] = namespace
    elif obj["kind"] not in CLUSTER_SCOPED_KINDS:
        metadata["namespace"] = namespace
    if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
        # As kustomize: ServiceAccount subjects without a namespace, or named "default", move.
        for subject in obj.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount" and \
                    (not subject.get("namespace") or subject.get("name") == "default"):
                subject["namespace"] = namespace
    return obj


def database_url(password: str) -> str:
    return f"postgresql+psycopg2://{DATABASE_USER}:{password}@{DATABASE_SERVICE}/{DATABASE_NAME}"


def _password() -> str:
    # URL-safe: goes into DATABASE_URL as is, and into Kafka's SCRAM and JAAS settings, which
    # cannot hold `,`, `]`, `"` or `\`.
    return secrets.token_urlsafe(24)


def _secret(name: str, namespace: str, labels: Mapping[str, str], data: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "stringData": dict(data),
    }


def credentials_secret(namespace: str, labels: Mapping[str, str],
                       password: str | None = None) -> dict[str, Any]:
    """The database's Secret ``pipeline-credentials``, with a new random password unless one
    is given."""
    password = password or _password()
    return _secret(SECRET_NAME, namespace, labels,
                   {"POSTGRES_PASSWORD": password, "DATABASE_URL": database_url(password)})


def role_secrets(namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every Secret of the pipeline, each with new random passwords: the database's, one per
    Kafka user and one per MLflow user (:mod:`pipeline.cluster_roles`)."""
    result = [credentials_secret(namespace, labels)]
    for user in KAFKA_USERS:
        result.append(_secret(kafka_secret(user), namespace, labels,
                              {KAFKA_USERNAME_KEY: user, KAFKA_PASSWORD_KEY: _password()}))
    for user in MLFLOW_USERS:
        data = {MLFLOW_USERNAME_KEY: user, MLFLOW_PASSWORD_KEY: _password()}
        if user == MLFLOW_ADMIN:
            data[MLFLOW_SERVER_KEY] = _password()
        result.append(_secret(mlflow_secret(user), namespace, labels, data))
    return result


def ref(obj: Mapping[str, Any]) -> str:
    """``kind/name`` as in kubectl's output, e.g. ``configmap/pipeline-settings``."""
    return f"{obj['kind'].lower()}/{obj['metadata']['name']}"


# ---------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Deploy the pipeline's services (k8s/kustomization.yaml) and the Secrets of "
                          "its roles (database, Kafka and MLflow users) to a Kubernetes cluster "
                          "with server-side apply.")
    parser.add_argument("--dry-run", action="store_true",
                        help="let the API server check every object (dryRun=All) and store nothing")
    parser.add_argument("--create-namespace", action="store_true",
                        help="with --dry-run: create the namespace for real when it does not "
                             "exist, so that the namespaced objects can be checked too")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="default: $KUBECONFIG; in a pod, its service account; else ~/.kube/config")
    parser.add_argument("--manifests", metavar="DIR", type=Path, default=K8S_DIR,
                        help="the folder with kustomization.yaml; default: this checkout's k8s/")
    parser.add_argument("--namespace", metavar="NS",
                        help="default: $K8S_NAMESPACE, else image-pipeline")
    parser.add_argument("--image-tag", metavar="TAG", help="default: $IMAGE_TAG, else the release's")
    parser.add_argument("--image-registry", metavar="REG",
                        help="default: $IMAGE_REGISTRY, else none (images by name only)")


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    namespace: str
    image_tag: str
    image_registry: str
    kubeconfig: str | None = None
    dry_run: bool = False
    create_namespace: bool = False
    topic_prefix: str = ""  # $TOPIC_PREFIX: the in-cluster services then use the same topics

    @classmethod
    def from_args(cls, args: argparse.Namespace, settings: Settings) -> "DeployOptions":
        """Flags first, then the settings (K8S_NAMESPACE, IMAGE_TAG, IMAGE_REGISTRY), checked
        by the same rules as the settings."""
        flags = {"K8S_NAMESPACE": ("--namespace", args.namespace),
                 "IMAGE_TAG": ("--image-tag", args.image_tag),
                 "IMAGE_REGISTRY": ("--image-registry", args.image_registry)}
        for variable, (flag, value) in flags.items():
            if value is None:
                continue
            try:
                Settings.from_env({"PIPELINE_STATE_DIR": str(settings.state_dir), variable: value})
            except SettingsError as exc:
                reason = str(exc).split(": ", 1)[-1]  # without the variable's name
                raise SettingsError(f"{flag} {value!r}: {reason}") from None
        return cls(
            namespace=args.namespace or settings.k8s_namespace,
            image_tag=args.image_tag or settings.image_tag,
            image_registry=(settings.image_registry if args.image_registry is None
                            else args.image_registry.strip().rstrip("/")),
            kubeconfig=args.kubeconfig,
            dry_run=args.dry_run,
            create_namespace=args.create_namespace,
            topic_prefix=settings.topic_prefix,
        )

    @property
    def settings_values(self) -> dict[str, str]:
        return {"K8S_NAMESPACE": self.namespace, "IMAGE_TAG": self.image_tag,
                "IMAGE_REGISTRY": self.image_registry, "TOPIC_PREFIX": self.topic_prefix}


def command(args: argparse.Namespace, settings: Settings) -> int:
    """``python -m pipeline deploy``; raises :class:`PipelineError` (one line) on failure."""
    options = DeployOptions.from_args(args, settings)
    deploy(options, args.manifests)
    return 0


# ---------------------------------------------------------------------------- the cluster

def connect(kubeconfig: str | None):
    """An ``ApiClient`` for ``kubeconfig`` (or the defaults, :func:`pipeline.kube.credentials_source`),
    checked to answer."""
    from kubernetes import client

    try:  # a CLI: say at once that the cluster does not answer
        api = load_api_client(kubeconfig, retries=0)
    except ClusterError as exc:
        raise DeployError(str(exc)) from None
    configuration = api.configuration
    try:
        client.VersionApi(api).get_code(_request_timeout=(5, 30))
    except Exception as exc:  # noqa: BLE001 - turned into one line below
        raise _cluster_error(exc, configuration.host) from None
    return api


def _cluster_error(exc: BaseException, host: str, what: str = "") -> PipelineError:
    """One line for an exception of the Kubernetes client."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        message = api_message(exc)
        if exc.status == 401:
            return DeployError(f"the Kubernetes API at {host} rejected the credentials "
                               f"(401 Unauthorized): {message}")
        if exc.status == 403:
            return DeployError(f"{what + ': ' if what else ''}403 forbidden: {message}")
        return DeployIncomplete(f"{what or host}: {exc.status} {message}")
    if isinstance(exc, (HTTPError, OSError)):
        reason = getattr(exc, "reason", None) or exc
        return DeployError(f"cannot reach the Kubernetes API at {host}: {_short(reason)}")
    return DeployError(f"Kubernetes API at {host}: {type(exc).__name__}: {_short(exc)}")


def _short(reason: object) -> str:
    text = str(reason)
    # urllib3 wraps the useful part: "<...HTTPSConnection object at 0x..>: Failed to ... : [Errno 111] ..."
    if ">: " in text:
        text = text.split(">: ", 1)[1]
    return text.strip().rstrip(")").strip() or type(reason).__name__


class _Cluster:
    """The few operations a deploy needs, on a ``DynamicClient``."""

    def __init__(self, api, cache_dir: str) -> None:
        from kubernetes.dynamic import DynamicClient

        self.host = api.configuration.host
        self.client = DynamicClient(api, cache_file=os.path.join(cache_dir, "discovery.json"))

    def resource(self, obj: Mapping[str, Any]):
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            return self.client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        except ResourceNotFoundError:
            raise DeployIncomplete(f"{ref(obj)}: the cluster does not serve "
                                   f"{obj['apiVersion']} {obj['kind']}") from None

    def get(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        resource = self.resource(obj)
        try:
            found = self.client.get(resource, name=obj["metadata"]["name"],
                                    namespace=obj["metadata"].get("namespace") if resource.namespaced else None)
        except NotFoundError:
            return None
        return found.to_dict()

    def apply(self, obj: Mapping[str, Any], dry_run: bool) -> dict[str, Any]:
        resource = self.resource(obj)
        return self.client.server_side_apply(
            resource, body=dict(obj), name=obj["metadata"]["name"],
            namespace=obj["metadata"].get("namespace") if resource.namespaced else None,
            field_manager=FIELD_MANAGER, force_conflicts=True,
            dry_run="All" if dry_run else None,
        ).to_dict()

    def create(self, obj: Mapping[str, Any], dry_run: bool) -> dict[str, Any]:
        resource = self.resource(obj)
        return self.client.create(
            resource, body=dict(obj), namespace=obj["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER, dry_run="All" if dry_run else None,
        ).to_dict()


def _comparable(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An object without what changes on every write or by controllers."""
    if obj is None:
        return None
    result = {k: v for k, v in obj.items() if k != "status"}
    result["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items()
                          if k not in ("resourceVersion", "managedFields", "generation")}
    return result


def deploy(options: DeployOptions, k8s_dir: Path = K8S_DIR,
           out: Callable[[str], None] = print) -> None:
    """Deploy (or with ``options.dry_run`` check) every object; see the module's doc."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError, InsecureRequestWarning

    kustomization = read_kustomization(k8s_dir)
    objects = render(k8s_dir, options.namespace, options.settings_values)
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    others = [o for o in objects if o["kind"] != "Namespace"]

    api = connect(options.kubeconfig)
    if not api.configuration.verify_ssl:
        warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        out("warning: not verifying the API server's certificate (insecure-skip-tls-verify)")
    registry = f"{options.image_registry}/" if options.image_registry else ""
    out(f"{'checking (dry run)' if options.dry_run else 'deploying'} on {api.configuration.host}: "
        f"namespace {options.namespace}, images {registry}image-pipeline-<name>:{options.image_tag}")

    failures: list[str] = []

    def attempt(obj: Mapping[str, Any], action: Callable[[], str]) -> bool:
        try:
            out(f"{ref(obj)} {action()}")
            return True
        except DeployIncomplete as exc:
            reason = str(exc).removeprefix(f"{ref(obj)}: ")
        except ApiException as exc:
            error = _cluster_error(exc, api.configuration.host, ref(obj))
            if isinstance(error, DeployError):  # 401, 403: nothing else will work either
                raise error from None
            reason = f"{exc.status} {api_message(exc)}"
        failures.append(f"{ref(obj)}: {reason}")
        out(f"{ref(obj)} FAILED: {reason}")
        return False

    with tempfile.TemporaryDirectory(prefix="pipeline-deploy-") as cache_dir:
        try:
            cluster = _Cluster(api, cache_dir)

            def apply(obj: Mapping[str, Any], dry_run: bool = options.dry_run) -> str:
                before = cluster.get(obj)
                after = cluster.apply(obj, dry_run)
                if before is None:
                    word = "created"
                elif _comparable(before) == _comparable(after):
                    word = "unchanged"
                else:
                    word = "configured"
                return word + (" (dry run)" if dry_run else "")

            namespace_exists = True
            for namespace in namespaces:
                try:
                    namespace_exists = cluster.get(namespace) is not None
                except ApiException as exc:
                    raise _cluster_error(exc, api.configuration.host, ref(namespace)) from None
                for_real = not options.dry_run or (options.create_namespace and not namespace_exists)
                if not attempt(namespace, lambda: apply(namespace, dry_run=not for_real) + (
                        " (for real: --create-namespace; the dry run's only change)"
                        if for_real and options.dry_run else "")):
                    raise DeployIncomplete(f"{failures[-1]}; nothing else was applied")
                namespace_exists = namespace_exists or for_real
            if not namespace_exists:
                # The server refuses even a dry run of an object in a missing namespace.
                for obj in [*role_secrets(options.namespace, kustomization.labels), *others]:
                    out(f"{ref(obj)} not checked: namespace {options.namespace} does not exist yet")
                raise DeployIncomplete(
                    f"dry run incomplete: the API server checks namespaced objects only in an "
                    f"existing namespace, and {options.namespace} does not exist; run again with "
                    f"--create-namespace (creates that namespace, nothing else) or deploy "
                    f"without --dry-run")

            for secret in role_secrets(options.namespace, kustomization.labels):
                attempt(secret, lambda: _ensure_secret(cluster, secret, options.dry_run))
            for obj in others:
                attempt(obj, lambda: apply(obj))
        except (HTTPError, ApiException) as exc:  # discovery, or the connection lost
            raise _cluster_error(exc, api.configuration.host) from None
        finally:
            api.close()

    if failures:
        raise DeployIncomplete(f"{len(failures)} object(s) failed; the first: {failures[0]}")
    if options.dry_run:
        out("dry run: the API server accepted every object; nothing was stored. Deploy with "
            "the same command without --dry-run.")
        return
    if options.image_registry:
        build = (f"IMAGE_REGISTRY={options.image_registry} IMAGE_TAG={options.image_tag} "
                 "./build_service.sh --all")
    else:
        build = (f"IMAGE_TAG={options.image_tag} ./build_service.sh --all --no-push, then load "
                 "the images into the nodes")
    out(f"deployed. Next: build the images ({build}), then submit an order:")
    namespace_env = f"K8S_NAMESPACE={options.namespace} " if options.namespace != "image-pipeline" else ""
    out(f"  {namespace_env}python -m orchestrator submit orders/example-simple.json")
    out(f"and follow it: kubectl -n {options.namespace} get jobs -l "
        f"app.kubernetes.io/part-of=image-pipeline (docs/kubernetes.md)")


def _ensure_secret(cluster: _Cluster, secret: Mapping[str, Any], dry_run: bool) -> str:
    """Create the Secret unless it exists; an existing Secret is never changed."""
    from kubernetes.dynamic.exceptions import ConflictError

    suffix = " (dry run)" if dry_run else ""
    existing = cluster.get(secret)
    if existing is None:
        try:
            cluster.create(secret, dry_run)
            return f"created with a random password{suffix}"
        except ConflictError:  # created meanwhile by someone else: theirs stays
            existing = cluster.get(secret) or {}
    missing = sorted(set(secret["stringData"]) - set(existing.get("data") or {}))
    if missing:
        return (f"unchanged{suffix}, but it lacks {', '.join(missing)}: delete it to have a "
                "new one made, or add them (docs/kubernetes.md)")
    return f"unchanged{suffix} (exists; its password is kept)"
