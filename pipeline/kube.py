"""What the code that talks to the Kubernetes API shares (deploy, the runtime, submit): one
way to find the cluster's credentials, and the API server's own words in an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import ClusterError

IN_CLUSTER = "the in-cluster service account"


def credentials_source(kubeconfig: str | None = None) -> str:
    """Where the credentials come from, as kubectl finds them: ``kubeconfig`` when given, else
    ``$KUBECONFIG``; in a pod (``KUBERNETES_SERVICE_HOST``) without one, the pod's service account
    (:data:`IN_CLUSTER`); else ``~/.kube/config``."""
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        if not path.is_file():
            raise ClusterError(f"kubeconfig {path} does not exist")
        return str(path)
    source = os.environ.get("KUBECONFIG")
    if not source and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return IN_CLUSTER
    source = source or str(Path("~/.kube/config").expanduser())
    if not any(Path(p).expanduser().is_file() for p in source.split(os.pathsep) if p):
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return IN_CLUSTER
        raise ClusterError(f"no cluster credentials: kubeconfig {source} does not exist; run inside "
                           "a pod with a service account, set KUBECONFIG or pass --kubeconfig PATH")
    return source


def load_api_client(kubeconfig: str | None = None, retries: int | None = None):
    """A ``kubernetes.client.ApiClient`` with the credentials of :func:`credentials_source`;
    :class:`ClusterError` (one line) when there are none or they cannot be read. ``retries``:
    how often urllib3 tries a failed connection again (default: the client's)."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    source = credentials_source(kubeconfig)
    configuration = client.Configuration()
    try:
        if source == IN_CLUSTER:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=source, client_configuration=configuration,
                                    persist_config=False)
    except (ConfigException, OSError, yaml.YAMLError, ValueError, KeyError) as exc:
        raise ClusterError(f"kubeconfig {source}: {str(exc).strip() or type(exc).__name__}") from None
    if retries is not None:
        configuration.retries = retries  # read when the client builds its connection pool
    return client.ApiClient(configuration)


def api_message(exc) -> str:
    """The API server's own words in a client ``ApiException`` (the ``message`` of its Status
    body), else the HTTP reason."""
    try:
        body = json.loads(exc.body)
        return str(body.get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", "") or exc)
