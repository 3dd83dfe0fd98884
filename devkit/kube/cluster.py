"""A namespace set up as ``python -m pipeline deploy`` would set it up, but pointing at the
local broker and database: the RBAC of ``k8s/rbac/``, the settings ConfigMap and the Secrets
of the roles. Shared by the Kubernetes tests and ``bench/k8s_order.py``."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import kubernetes.client as k8s
from kubernetes.utils import create_from_yaml

from devkit.kube.apiserver import ApiServer
from pipeline.cluster_roles import ALL_SECRETS, DATABASE_SECRET

REPO = Path(__file__).resolve().parents[2]
RBAC_FILES = [REPO / "k8s" / "rbac" / "serviceaccount.yaml", REPO / "k8s" / "rbac" / "role.yaml"]


def apply_rbac(api: ApiServer, namespace: str) -> None:
    """The orchestrator ServiceAccount, Role and RoleBinding, exactly as shipped."""
    with api.api_client() as client:
        for path in RBAC_FILES:
            create_from_yaml(client, str(path), namespace=namespace)


def prepare_namespace(api: ApiServer, namespace: str, kafka: str, database_url: str, folder: Path,
                      live_scoring: bool = False) -> Path:
    """RBAC, ConfigMap ``pipeline-settings`` and the Secrets of the roles in ``namespace``;
    returns an admin kubeconfig for the namespace's users (``submit``).

    The database's Secret holds ``database_url``. The local broker takes clients without
    credentials and MLflow is a local store, so the Kafka and MLflow users' Secrets exist (a
    pod cannot start without its Secrets) but hold nothing."""
    apply_rbac(api, namespace)
    with api.api_client() as client:
        core = k8s.CoreV1Api(client)
        core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name="pipeline-settings"),
            data={"KAFKA_BOOTSTRAP_SERVERS": kafka,
                  "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
                  "RUNTIME": "kubernetes", "ARTIFACT_DIR": "/artifacts",
                  "K8S_NAMESPACE": namespace, "LIVE_SCORING": "on" if live_scoring else "off",
                  "PIPELINE_STATE_DIR": str(folder / "pod-state")}))
        core.create_namespaced_secret(namespace, k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=DATABASE_SECRET),
            data={"DATABASE_URL": base64.b64encode(database_url.encode()).decode()}))
        for name in ALL_SECRETS:
            if name != DATABASE_SECRET:
                core.create_namespaced_secret(namespace, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name)))
    return api.kubeconfig(api.admin_token, folder / "admin.kubeconfig")


def submit(kubeconfig: Path, namespace: str, orders: list[Path], folder: Path,
           timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m orchestrator submit --wait ORDER...`` from outside the cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env.update(KUBECONFIG=str(kubeconfig), K8S_NAMESPACE=namespace, PYTHONPATH=str(REPO),
               PIPELINE_STATE_DIR=str(folder / "submit-state"))
    return subprocess.run([sys.executable, "-m", "orchestrator", "submit", "--wait", *map(str, orders)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
