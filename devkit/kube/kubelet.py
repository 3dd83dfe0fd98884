"""A stand-in for the kubelet (and the Job controller's pod bookkeeping): Jobs run as local processes.

There is no container runtime on a test machine, so this harness watches ``batch/v1`` Jobs
of one namespace on the real API server and runs each Job's pod template as local processes,
reporting back through the Job's status subresource the way the Job controller does. No Pod
objects are created: the pods exist only here (``pods()``, ``logs()``).

What a container sees, and how it differs from a real pod:

* ``command`` + ``args`` (required: there is no image entrypoint); a leading ``python`` or
  ``python3`` is this interpreter. cwd (``workingDir`` is ignored) and ``PYTHONPATH`` are the
  repository root. ``$(VAR)`` is expanded in args, and in env values from earlier entries, as
  the kubelet does. Each container is a process group of its own; its stdout and stderr go
  to ``<log_dir>/<namespace>/<pod>/<container>.log``.
* The environment is PATH/HOME/LANG of the test process, ``HOSTNAME`` (the invented pod name
  ``<job>-<5 chars>``), ``PYTHONUNBUFFERED=1``, ``PIPELINE_PARENT_PID`` (so the repository's
  entry points die with the test process), then ``envFrom`` and ``env`` (ConfigMap, Secret,
  fieldRef) resolved through the API. Nothing else of the test process leaks in: a Job that
  lacks a setting fails here as it would in a cluster.
* Service account: instead of a projected token and in-cluster config, the container gets
  ``KUBECONFIG`` pointing at a kubeconfig with a real TokenRequest token of the pod's service
  account (unless ``automountServiceAccountToken`` is false). Clients that load kubeconfig
  before in-cluster config (``kubernetes.config.load_config``) work unchanged.
* Volumes: absolute mount paths cannot be created, so ``configMap``/``secret`` volumes are
  files and ``emptyDir`` a folder in a per-pod dir, a ``persistentVolumeClaim`` is
  ``<root>/pvc/<claimName>`` shared by all pods; **every command/arg/env value that starts
  with a container's mountPath has that prefix rewritten to the local folder**.
* Readiness probe: a container with a ``readinessProbe`` is ready once it printed the stdout
  line ``READY`` (the repository's monitor services do so when they listen); one without a
  probe is ready once started.
* Native sidecars (init containers with ``restartPolicy: Always``) start before the main
  containers and get SIGTERM (SIGKILL after ``terminationGracePeriodSeconds``) once every main
  container has exited; they are not restarted. Plain init containers run to completion first.
* A pod that cannot start (a missing non-optional ConfigMap/Secret/key or service account, an
  unsupported volume) counts as a failed pod at once, with a log line; a real cluster would
  leave it pending or not create it.
* Job semantics: ``backoffLimit`` (retries start at once, without the controller's
  exponential delay; ``restartPolicy: OnFailure`` is treated as ``Never``), ``activeDeadlineSeconds``; ``completions``/``parallelism`` other than 1
  and Indexed Jobs are not supported (logged, the Job is left alone). ``ttlSecondsAfterFinished``
  is the TTL controller's business and is not implemented.

Processes are started *and reaped* by their Job's thread: the parent-death signal that
``PIPELINE_PARENT_PID`` arranges follows the thread that started a child, so that thread
outlives every process it starts.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes.client as k8s
from kubernetes import watch

from devkit.kube.apiserver import REPO, ApiServer
from pipeline.secret_files import write_secret

logger = logging.getLogger(__name__)
POLL = 0.05


class PodStartError(Exception):
    """The pod cannot start (what a kubelet would report as a pod event)."""


class _JobGone(Exception):
    """The Job was deleted while it ran."""


@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    has_probe: bool
    sidecar: bool = False
    process: subprocess.Popen | None = None
    ready: bool = False
    _seen: int = 0

    def poll_ready(self) -> bool:
        """Running, and started (no probe) or printed a line ``READY`` (with a readinessProbe)."""
        if self.process is None or self.process.poll() is not None:
            return False
        if not self.ready:
            if not self.has_probe:
                self.ready = True
            else:
                with open(self.log, "rb") as log:
                    log.seek(self._seen)
                    text = log.read()
                complete = text[:text.rfind(b"\n") + 1]
                self._seen += len(complete)
                self.ready = any(line.strip() == b"READY" for line in complete.splitlines())
        return self.ready


@dataclass
class PodRun:
    """One attempt at running a Job's pod template."""
    name: str
    job: str
    dir: Path
    log_dir: Path
    containers: dict[str, Container] = field(default_factory=dict)
    phase: str = "Pending"  # Running, Succeeded, Failed
    error: str | None = None
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))  # no Pod object exists: invented

    @property
    def logs(self) -> dict[str, Path]:
        return {name: c.log for name, c in self.containers.items()}

    @property
    def pids(self) -> dict[str, int]:
        return {name: c.process.pid for name, c in self.containers.items() if c.process}

    def exit_codes(self) -> dict[str, int | None]:
        return {name: c.process.poll() for name, c in self.containers.items() if c.process}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, reason: str, message: str) -> dict:
    now = _now()
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


def _expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: known names replaced, ``$$`` escapes, others kept."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def terminate(processes: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM each process group, SIGKILL what is left after ``grace`` seconds, reap all.

    Groups of processes that already exited get SIGKILL too: a container's stray children
    die with it, as with a container's cgroup.
    """
    running = [p for p in processes if p.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(POLL)
    for process in processes:
        _signal_group(process, signal.SIGKILL)
        process.wait()


class KubeletStandIn:
    """Runs the Jobs of ``namespace`` as local processes; ``start()``/``stop()`` or ``with``."""

    def __init__(self, api: ApiServer, namespace: str, log_dir: Path, root: Path | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.log_dir = Path(log_dir)
        self.root = Path(root or self.log_dir.parent / "kubelet-root")
        self._client = api.api_client()
        self._core = k8s.CoreV1Api(self._client)
        self._batch = k8s.BatchV1Api(self._client)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._jobs: dict[str, threading.Event] = {}  # Job uid -> "deleted" flag
        self._threads: list[threading.Thread] = []
        self._pods: dict[str, list[PodRun]] = {}
        self._watch: watch.Watch | None = None
        self._watch_response = None
        self._watcher = threading.Thread(target=self._watch_jobs, name=f"kubelet-{namespace}", daemon=True)

    # -- public --------------------------------------------------------------------------
    def start(self) -> KubeletStandIn:
        self._watcher.start()
        return self

    def stop(self) -> None:
        """Stop watching, kill every process started (SIGTERM, then SIGKILL), join threads."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
        with contextlib.suppress(Exception):  # unblocks the watch thread's read
            self._watch_response.shutdown()
        self._watcher.join()
        for thread in list(self._threads):
            thread.join()
        self._client.close()

    def __enter__(self) -> KubeletStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pods(self, job_name: str) -> list[PodRun]:
        """The pods run for ``job_name`` so far, oldest first."""
        with self._lock:
            return list(self._pods.get(job_name, []))

    def logs(self, job_name: str) -> dict[str, Path]:
        """Log file per container of the Job's latest pod (stdout and stderr together)."""
        pods = self.pods(job_name)
        return pods[-1].logs if pods else {}

    def pvc_dir(self, claim: str) -> Path:
        return self.root / "pvc" / claim

    # -- watching ------------------------------------------------------------------------
    def _watch_jobs(self) -> None:
        """List, then watch from the list's resourceVersion; list again after a 410 or error."""
        client = self.api.api_client()
        batch = k8s.BatchV1Api(client)

        def list_jobs(**kwargs):
            self._watch_response = batch.list_namespaced_job(self.namespace, **kwargs)
            return self._watch_response

        try:
            while not self._stopping.is_set():
                try:
                    listing = batch.list_namespaced_job(self.namespace)
                    seen = {job.metadata.uid for job in listing.items}
                    with self._lock:
                        for uid, deleted in self._jobs.items():
                            if uid not in seen:
                                deleted.set()
                    for job in listing.items:
                        self._consider(client.sanitize_for_serialization(job))
                    self._watch = watch.Watch(return_type="V1Job")
                    for event in self._watch.stream(list_jobs, resource_version=listing.metadata.resource_version):
                        if event["type"] == "DELETED":
                            with self._lock:
                                self._jobs.get(event["raw_object"]["metadata"]["uid"], threading.Event()).set()
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self._consider(event["raw_object"])
                except Exception as error:  # 410 Gone, connection trouble, or stop()'s shutdown
                    if not self._stopping.is_set():
                        logger.info("kubelet stand-in: watch ended (%s), listing again", error)
                        time.sleep(0.5)
        finally:
            client.close()

    def _consider(self, job: dict) -> None:
        """Start a thread for a Job not seen before, unless it is finished or suspended."""
        meta, spec, status = job["metadata"], job["spec"], job.get("status") or {}
        finished = any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                       for c in status.get("conditions") or [])
        with self._lock:
            if meta["uid"] in self._jobs or finished or spec.get("suspend") or self._stopping.is_set():
                return
            self._jobs[meta["uid"]] = deleted = threading.Event()
            if spec.get("completions", 1) != 1 or spec.get("parallelism", 1) != 1 \
                    or spec.get("completionMode", "NonIndexed") != "NonIndexed":
                logger.error("kubelet stand-in: Job %s: only completions=parallelism=1, NonIndexed "
                             "is supported; leaving it alone", meta["name"])
                return
            thread = threading.Thread(target=self._run_job, args=(job, deleted),
                                      name=f"job-{meta['name']}", daemon=True)
            self._threads.append(thread)
        thread.start()

    # -- the Job ---------------------------------------------------------------------------
    def _run_job(self, job: dict, deleted: threading.Event) -> None:
        name, spec = job["metadata"]["name"], job["spec"]
        grace = float(spec["template"]["spec"].get("terminationGracePeriodSeconds", 30))
        deadline = None
        if spec.get("activeDeadlineSeconds") is not None:
            deadline = time.monotonic() + spec["activeDeadlineSeconds"]
        start, failed = {"startTime": _now()}, 0
        pod: PodRun | None = None
        try:
            while True:
                pod = self._new_pod(job)
                self._patch(name, {**start, "active": 1, "ready": 0, "failed": failed})
                start = {}
                outcome = self._run_pod(pod, job, deadline, deleted)
                if outcome == "Stopped":
                    break
                if outcome == "Succeeded":
                    self._patch(name, {"active": 0, "ready": 0, "succeeded": 1, "completionTime": _now(),
                                       "conditions": [
                                           _condition("SuccessCriteriaMet", "CompletionsReached",
                                                      "Reached expected number of succeeded pods"),
                                           _condition("Complete", "CompletionsReached",
                                                      "Reached expected number of succeeded pods")]})
                    break
                failed += 1
                if outcome == "DeadlineExceeded":
                    reason, message = "DeadlineExceeded", "Job was active longer than specified deadline"
                elif failed > spec.get("backoffLimit", 6):
                    reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                else:
                    continue  # a new pod at once (the controller would wait 10 s, 20 s, ...)
                # As the Job controller: FailureTarget while the pod terminates, then Failed.
                target = _condition("FailureTarget", reason, message)
                self._patch(name, {"active": 0, "ready": 0, "conditions": [target]})
                terminate(self._processes(pod), grace)
                if pod.phase == "Running":  # the pod has failed before its Job is marked Failed
                    pod.phase = "Failed"
                self._patch(name, {"failed": failed,
                                   "conditions": [target, _condition("Failed", reason, message)]})
                break
        except _JobGone:
            pass
        except Exception:
            logger.exception("kubelet stand-in: Job %s", name)
        finally:
            if pod is not None:
                terminate(self._processes(pod), grace)
                if pod.phase == "Running":
                    pod.phase = "Failed"

    def _patch(self, job_name: str, status: dict) -> None:
        try:
            self._batch.patch_namespaced_job_status(job_name, self.namespace, {"status": status})
        except k8s.ApiException as error:
            if error.status == 404:
                raise _JobGone(job_name) from error
            raise

    @staticmethod
    def _processes(pod: PodRun) -> list[subprocess.Popen]:
        return [c.process for c in pod.containers.values() if c.process is not None]

    # -- the pod ---------------------------------------------------------------------------
    def _new_pod(self, job: dict) -> PodRun:
        job_name = job["metadata"]["name"]
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        pod = PodRun(name=f"{job_name}-{suffix}", job=job_name,
                     dir=self.root / "pods" / f"{job_name}-{suffix}",
                     log_dir=self.log_dir / self.namespace / f"{job_name}-{suffix}")
        with self._lock:
            self._pods.setdefault(job_name, []).append(pod)
        return pod

    def _run_pod(self, pod: PodRun, job: dict, deadline: float | None, deleted: threading.Event) -> str:
        """Run one pod to its end; returns Succeeded, Failed, DeadlineExceeded or Stopped.

        Stopped: the Job was deleted or the harness stops. On DeadlineExceeded and Stopped
        processes may still run: the caller terminates them.
        """
        pod_spec = job["spec"]["template"]["spec"]
        grace = float(pod_spec.get("terminationGracePeriodSeconds", 30))
        try:
            self._prepare(pod, job)
        except PodStartError as error:
            pod.phase, pod.error = "Failed", str(error)
            logger.warning("kubelet stand-in: pod %s cannot start: %s", pod.name, error)
            return "Failed"
        pod.phase = "Running"
        ready = False

        def interrupted() -> str | None:
            if deleted.is_set() or self._stopping.is_set():
                return "Stopped"
            if deadline is not None and time.monotonic() >= deadline:
                return "DeadlineExceeded"
            return None

        sidecars = [c for c in pod.containers.values() if c.sidecar]
        for spec in pod_spec.get("initContainers") or []:
            container = pod.containers[spec["name"]]
            self._spawn(container)
            while not container.sidecar and container.process.poll() is None:
                if (stop := interrupted()):
                    return stop
                time.sleep(POLL)
            if not container.sidecar and container.process.returncode != 0:
                terminate([c.process for c in sidecars if c.process], grace)
                pod.phase = "Failed"
                return "Failed"
        mains = [pod.containers[spec["name"]] for spec in pod_spec["containers"]]
        for container in mains:
            self._spawn(container)
        while any(c.process.poll() is None for c in mains):
            if (stop := interrupted()):
                return stop
            now_ready = all(c.poll_ready() for c in sidecars + mains)
            if now_ready != ready:
                ready = now_ready
                self._patch(pod.job, {"ready": int(ready)})
            time.sleep(POLL)
        terminate([c.process for c in sidecars + mains if c.process], grace)
        pod.phase = "Succeeded" if all(c.process.returncode == 0 for c in mains) else "Failed"
        return pod.phase

    def _spawn(self, container: Container) -> None:
        container.log.parent.mkdir(parents=True, exist_ok=True)
        with open(container.log, "wb") as log:
            container.process = subprocess.Popen(
                container.argv, env=container.env, cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _prepare(self, pod: PodRun, job: dict) -> None:
        """Resolve service account, volumes and environment; PodStartError if impossible."""
        template = job["spec"]["template"]
        spec = template["spec"]
        sa_name = spec.get("serviceAccountName") or "default"
        labels = {**(template.get("metadata") or {}).get("labels", {}),
                  "batch.kubernetes.io/job-name": pod.job, "job-name": pod.job,
                  "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                  "controller-uid": job["metadata"]["uid"]}
        fields = {"metadata.name": pod.name, "metadata.uid": pod.uid, "metadata.namespace": self.namespace,
                  "spec.serviceAccountName": sa_name, "spec.nodeName": "kubelet-stand-in",
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
                  **{f"metadata.labels['{k}']": v for k, v in labels.items()},
                  **{f"metadata.annotations['{k}']": v
                     for k, v in ((template.get("metadata") or {}).get("annotations") or {}).items()}}
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ") if k in os.environ}
        base.update(HOSTNAME=pod.name, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                    PIPELINE_PARENT_PID=str(os.getpid()))
        try:
            account = self._core.read_namespaced_service_account(sa_name, self.namespace)
        except k8s.ApiException as error:
            raise PodStartError(f"service account {sa_name!r}: {error.reason}") from error
        automount = spec.get("automountServiceAccountToken", account.automount_service_account_token)
        if automount is not False:
            token = self.api.service_account_token(self.namespace, sa_name)
            base["KUBECONFIG"] = str(self.api.kubeconfig(token, pod.dir / "serviceaccount.kubeconfig"))
        volumes = {v["name"]: self._volume(v, pod) for v in spec.get("volumes") or []}
        for spec_c in (spec.get("initContainers") or []) + spec["containers"]:
            mounts = sorted(((m["mountPath"].rstrip("/"), volumes[m["name"]] / m.get("subPath", ""))
                             for m in spec_c.get("volumeMounts") or []), key=lambda m: -len(m[0]))

            def local(value: str) -> str:
                for mount_path, folder in mounts:
                    if value == mount_path or value.startswith(mount_path + "/"):
                        return str(folder) + value[len(mount_path):]
                return value

            env = {**base, **{k: local(v) for k, v in self._env(spec_c, fields).items()}}
            if not spec_c.get("command"):
                raise PodStartError(f"container {spec_c['name']!r} has no command "
                                    "(there is no image entrypoint here)")
            argv = [local(_expand(a, env)) for a in spec_c["command"] + (spec_c.get("args") or [])]
            if argv[0] in ("python", "python3"):
                argv[0] = sys.executable
            pod.containers[spec_c["name"]] = Container(
                name=spec_c["name"], argv=argv, env=env, log=pod.log_dir / f"{spec_c['name']}.log",
                has_probe="readinessProbe" in spec_c, sidecar=spec_c.get("restartPolicy") == "Always")

    def _env(self, container: dict, fields: dict[str, str]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            kind = "configMapRef" if "configMapRef" in source else "secretRef"
            ref = source[kind]
            data = self._data(kind, ref["name"], ref.get("optional", False)) or {}
            env.update({source.get("prefix", "") + k: v for k, v in data.items()})
        for entry in container.get("env") or []:
            source = entry.get("valueFrom")
            if source is None:
                env[entry["name"]] = _expand(entry.get("value", ""), env)
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                if path not in fields and not path.startswith("metadata.labels[") \
                        and not path.startswith("metadata.annotations["):
                    raise PodStartError(f"env {entry['name']}: fieldPath {path!r} not supported")
                env[entry["name"]] = fields.get(path, "")
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "configMapKeyRef" if "configMapKeyRef" in source else "secretKeyRef"
                ref = source[kind]
                data = self._data(kind, ref["name"], ref.get("optional", False))
                if data is not None and ref["key"] in data:
                    env[entry["name"]] = data[ref["key"]]
                elif data is not None and not ref.get("optional", False):
                    raise PodStartError(f"env {entry['name']}: key {ref['key']!r} not in {ref['name']!r}")
            else:
                raise PodStartError(f"env {entry['name']}: {list(source)} not supported")
        return env

    def _data(self, kind: str, name: str, optional: bool, binary: bool = False) -> dict | None:
        """A ConfigMap's or Secret's data (str, or bytes if ``binary``); None if optional and missing."""
        secret = kind.startswith("secret")
        try:
            if secret:
                obj = self._core.read_namespaced_secret(name, self.namespace)
                data = {k: base64.b64decode(v) for k, v in (obj.data or {}).items()}
            else:
                obj = self._core.read_namespaced_config_map(name, self.namespace)
                data = {k: v.encode() for k, v in (obj.data or {}).items()}
                data.update({k: base64.b64decode(v) for k, v in (obj.binary_data or {}).items()})
        except k8s.ApiException as error:
            if error.status == 404 and optional:
                return None
            raise PodStartError(f"{'Secret' if secret else 'ConfigMap'} {name!r}: {error.reason}") from error
        return data if binary else {k: v.decode(errors="replace") for k, v in data.items()}

    def _volume(self, volume: dict, pod: PodRun) -> Path:
        """The local folder that stands in for ``volume``, filled where it has content."""
        folder = pod.dir / "volumes" / volume["name"]
        if "persistentVolumeClaim" in volume:
            folder = self.pvc_dir(volume["persistentVolumeClaim"]["claimName"])
        elif "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            source = volume[kind]
            name = source.get("name") or source.get("secretName")
            data = self._data(kind, name, source.get("optional", False), binary=True) or {}
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    raise PodStartError(f"volume {volume['name']}: key {item['key']!r} not in {name!r}")
                target = folder / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                if kind == "secret":  # private from the first byte, then the mode asked for
                    write_secret(target, data[item["key"]])
                else:
                    target.write_bytes(data[item["key"]])
                target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
        elif "emptyDir" not in volume:
            raise PodStartError(f"volume {volume['name']}: only configMap, secret, emptyDir and "
                                "persistentVolumeClaim volumes are supported")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
