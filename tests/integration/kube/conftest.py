"""Fixtures: one real kube-apiserver per test session, a fresh namespace and a kubelet stand-in per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client as k8s
import pytest

from devkit.kube.apiserver import ApiServer
from devkit.kube.kubelet import KubeletStandIn


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """etcd + kube-apiserver, started once per session (builds the binary if it is missing)."""
    api = ApiServer(workdir=tmp_path_factory.mktemp("kube-api"))
    api.start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def kube_namespace(kube_api: ApiServer) -> Iterator[str]:
    """A fresh namespace ``t-<random>`` with its ``default`` ServiceAccount, deleted afterwards.

    There is no controller manager, so the ServiceAccount controller's job of creating
    ``default`` is done here.
    """
    name = f"t-{secrets.token_hex(4)}"
    with kube_api.api_client() as client:
        core = k8s.CoreV1Api(client)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        core.create_namespaced_service_account(
            name, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default")))
        try:
            yield name
        finally:
            core.delete_namespace(name)


@pytest.fixture
def kubelet(kube_api: ApiServer, kube_namespace: str, tmp_path: Path) -> Iterator[KubeletStandIn]:
    """Runs the Jobs of ``kube_namespace`` as local processes; logs under ``tmp_path/pod-logs``."""
    standin = KubeletStandIn(kube_api, kube_namespace, log_dir=tmp_path / "pod-logs",
                             root=tmp_path / "kubelet")
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()
