"""One way to find a cluster's credentials, for deploy, submit and the Kubernetes runtime."""

import pytest

from pipeline.errors import ClusterError
from pipeline.kube import IN_CLUSTER, credentials_source, load_api_client


@pytest.fixture
def no_cluster_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def _kubeconfig(path, server="https://127.0.0.1:6443"):
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}"}}}}]
users: [{{name: u, user: {{token: secret}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    return path


def test_a_given_kubeconfig_wins_and_must_exist(no_cluster_env, tmp_path):
    given = _kubeconfig(tmp_path / "given")
    no_cluster_env.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert credentials_source(str(given)) == str(given)
    with pytest.raises(ClusterError, match="does not exist"):
        credentials_source(str(tmp_path / "missing"))


def test_in_a_pod_the_service_account_unless_kubeconfig_is_set(no_cluster_env, tmp_path):
    no_cluster_env.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert credentials_source() == IN_CLUSTER
    env_config = _kubeconfig(tmp_path / "env")
    no_cluster_env.setenv("KUBECONFIG", str(env_config))
    assert credentials_source() == str(env_config)


def test_outside_a_pod_without_a_kubeconfig_is_one_clear_error(no_cluster_env):
    with pytest.raises(ClusterError, match="no cluster credentials"):
        load_api_client()


def test_the_client_talks_to_the_kubeconfigs_server(no_cluster_env, tmp_path):
    (tmp_path / ".kube").mkdir()
    _kubeconfig(tmp_path / ".kube" / "config", server="https://10.1.2.3:6443")
    api = load_api_client()
    assert api.configuration.host == "https://10.1.2.3:6443"
    broken = tmp_path / "broken"
    broken.write_text("clusters: [")
    with pytest.raises(ClusterError, match=f"kubeconfig {broken}"):
        load_api_client(str(broken))


def test_a_command_line_may_ask_for_no_retries(no_cluster_env, tmp_path):
    (tmp_path / ".kube").mkdir()
    _kubeconfig(tmp_path / ".kube" / "config")
    assert load_api_client(retries=0).rest_client.pool_manager.connection_pool_kw["retries"].total == 0
