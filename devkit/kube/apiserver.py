"""A real kube-apiserver on a private etcd, for tests of Kubernetes-facing code.

The binaries are upstream Kubernetes built from the Go module proxy by
``k8s/testenv/build-apiserver.sh`` (see k8s/testenv/README.md); the flags are the ones
``k8s/testenv/smoke-apiserver.sh`` proved, plus an audit log at level Metadata for every
request, so that a test can see who did what (user, verb, resource, subresource, namespace,
response code) without the request bodies.

There is no controller manager, scheduler or kubelet: nothing creates the ``default``
ServiceAccount of a namespace, nothing turns Jobs into Pods. ``kubelet.KubeletStandIn`` runs
Jobs as local processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes.client as k8s
import yaml

from devkit.servers import free_port
from pipeline.secret_files import write_secret

REPO = Path(__file__).resolve().parents[2]
DEFAULT_K8S_VERSION = "v1.37.2"
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # One event per request (ResponseComplete; long-running requests also ResponseStarted).
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


def _bin_cache() -> Path:
    return Path(os.environ.get("K8S_BIN_CACHE") or Path.home() / ".cache" / "image-pipeline" / "k8s")


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL when the test process goes, so no apiserver or etcd is left behind.

    (The signal follows the *thread* that started the child: start the server from a thread
    that lives as long as it, as the pytest main thread does.)
    """
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop_process(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ApiServer:
    """etcd plus kube-apiserver on free loopback ports, with a temp dir of their own.

    ``start()`` builds the binary if it is missing, waits for ``/readyz`` and returns self;
    ``stop()`` stops the apiserver before etcd (with etcd gone first the apiserver's shutdown
    hangs for minutes). Also a context manager.
    """

    def __init__(self, workdir: Path | None = None, version: str | None = None,
                 grace_seconds: float = 20.0) -> None:
        self.version = version or os.environ.get("K8S_VERSION") or DEFAULT_K8S_VERSION
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kube-api."))
        self.grace_seconds = grace_seconds
        self.admin_token = secrets.token_hex(16)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_cert = self.workdir / "certs" / "apiserver.crt"
        self.audit_log = self.workdir / "audit.log"
        self.startup_seconds: float | None = None
        self._etcd: subprocess.Popen | None = None
        self._apiserver: subprocess.Popen | None = None

    # -- binaries ---------------------------------------------------------------------------
    def apiserver_binary(self) -> Path:
        """``$KUBE_APISERVER_BIN``, else the build script's cache; built when missing."""
        if os.environ.get("KUBE_APISERVER_BIN"):
            return Path(os.environ["KUBE_APISERVER_BIN"])
        binary = _bin_cache() / self.version / "kube-apiserver"
        if not os.access(binary, os.X_OK):
            print(f"kube-apiserver {self.version} is not in {binary.parent}: building it with "
                  "k8s/testenv/build-apiserver.sh (about 5 min with cold Go caches)", flush=True)
            subprocess.run([str(REPO / "k8s/testenv/build-apiserver.sh"), self.version],
                           check=True, env={**os.environ, "K8S_COMPONENTS": "kube-apiserver"})
        return binary

    @staticmethod
    def etcd_binary() -> str:
        """``$ETCD_BIN``, else ``build-etcd.sh``'s cached etcd, else ``etcd`` on PATH."""
        if os.environ.get("ETCD_BIN"):
            return os.environ["ETCD_BIN"]
        cached = _bin_cache() / "etcd" / "etcd"
        if os.access(cached, os.X_OK):
            return str(cached)
        found = shutil.which("etcd")
        if not found:
            raise RuntimeError("no etcd: apt-get install etcd-server, or k8s/testenv/build-etcd.sh")
        return found

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> ApiServer:
        apiserver = self.apiserver_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            self._start_etcd()
            self._write_credentials()
            self._apiserver = self._spawn("apiserver", [
                str(apiserver),
                f"--etcd-servers=http://127.0.0.1:{self._etcd_port}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'certs'}",
                "--authorization-mode=Node,RBAC",
                f"--token-auth-file={self.workdir / 'tokens.csv'}",
                f"--service-account-key-file={self.workdir / 'sa.pub'}",
                f"--service-account-signing-key-file={self.workdir / 'sa.key'}",
                f"--service-account-issuer={ISSUER}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
            ])
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM (SIGKILL after the grace) the apiserver, then etcd; remove an own temp dir."""
        for attr in ("_apiserver", "_etcd"):
            proc = getattr(self, attr)
            if proc is not None:
                _stop_process(proc, self.grace_seconds)
                setattr(self, attr, None)
        if self._own_workdir and not os.environ.get("KEEP_TMP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _start_etcd(self) -> None:
        self._etcd_port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self._etcd_port}", f"http://127.0.0.1:{peer}"
        self._etcd = self._spawn("etcd", [
            self.etcd_binary(), "--name", "test", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}",
        ])
        self._poll(lambda: urllib.request.urlopen(f"{client_url}/health", timeout=1).status == 200,
                   self._etcd, "etcd", 30)

    def _write_credentials(self) -> None:
        # The signing key and the token file are 0600 from their first byte (write_secret),
        # whatever openssl's own defaults and the umask are.
        key, pub = self.workdir / "sa.key", self.workdir / "sa.pub"
        generated = subprocess.run(["openssl", "genrsa", "2048"], check=True, capture_output=True)
        write_secret(key, generated.stdout)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                       check=True, capture_output=True)
        write_secret(self.workdir / "tokens.csv", f"{self.admin_token},admin,admin-uid,system:masters\n")
        (self.workdir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))

    def _wait_ready(self) -> None:
        # The apiserver writes its self-signed apiserver.crt (serving cert + its own CA) before
        # it listens. Its SANs include the bind address 127.0.0.1, so clients verify TLS
        # against that file instead of skipping verification; the readiness poll below does
        # exactly that, so a cert that did not cover 127.0.0.1 would fail loudly here.
        def ready() -> bool:
            if not self.ca_cert.exists():
                return False
            request = urllib.request.Request(f"{self.url}/readyz",
                                             headers={"Authorization": f"Bearer {self.admin_token}"})
            context = ssl.create_default_context(cafile=str(self.ca_cert))
            try:
                return urllib.request.urlopen(request, timeout=2, context=context).status == 200
            except urllib.error.URLError as error:
                if isinstance(error.reason, ssl.SSLCertVerificationError):
                    raise RuntimeError(f"apiserver cert does not verify for 127.0.0.1: {error}") from error
                raise

        self._poll(ready, self._apiserver, "apiserver", 120)

    def _poll(self, check, proc: subprocess.Popen, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self._log_tail(name)}")
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after {timeout}s:\n{self._log_tail(name)}")

    def _log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clients ----------------------------------------------------------------------------
    def kubeconfig(self, token: str, path: Path) -> Path:
        """Write a kubeconfig for this server with ``token`` as bearer token; return ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_secret(path, yaml.safe_dump({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_cert)}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }))  # it holds the bearer token

    def api_client(self, token: str | None = None) -> k8s.ApiClient:
        """A client for this server, as admin (system:masters) unless ``token`` is given."""
        configuration = k8s.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.ca_cert)
        configuration.api_key = {"authorization": f"Bearer {token or self.admin_token}"}
        return k8s.ApiClient(configuration)

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A real signed token for ServiceAccount ``namespace/name`` (TokenRequest API)."""
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds))
        with self.api_client() as client:
            response = k8s.CoreV1Api(client).create_namespaced_service_account_token(
                name, namespace, request)
        return response.status.token

    def audit_events(self, username: str | None = None) -> list[dict]:
        """The audit log's events (dicts as the apiserver wrote them), optionally of one user.

        Useful keys: ``user.username``, ``verb``, ``objectRef`` (``resource``,
        ``subresource``, ``namespace``, ``name``), ``responseStatus.code``, ``stage``.
        """
        if not self.audit_log.exists():
            return []
        events = [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]
        if username is not None:
            events = [e for e in events if e.get("user", {}).get("username") == username]
        return events
