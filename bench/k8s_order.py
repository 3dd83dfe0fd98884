"""How long an order of five tasks takes through the Kubernetes runtime vs the local runtime.

Kubernetes side: a real kube-apiserver (built from the Go module proxy, see k8s/testenv/),
the order submitted with ``python -m orchestrator submit --wait``, and devkit's
kubelet stand-in running the orchestrator, task and monitor Jobs as local processes. So the
figure contains everything the runtime itself adds (API calls, the watch, a Job per task,
the sampler sidecar per task pod), but no image pulls or pod scheduling, which depend on
the cluster. Local side: ``python -m orchestrator run`` on the same order.

Needs a broker and PostgreSQL (``python -m pipeline infra up --postgres`` and its infra.env):

    ./dev python bench/k8s_order.py --runs 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kubernetes.client as k8s  # noqa: E402

from bench._common import REPO_ROOT, loadavg, machine, markdown_table, median, write_json  # noqa: E402
from devkit.kube.apiserver import ApiServer  # noqa: E402
from devkit.kube.cluster import prepare_namespace, submit  # noqa: E402
from devkit.kube.kubelet import KubeletStandIn  # noqa: E402
from devkit.orders import child_env, stored_orders, write_order  # noqa: E402
from devkit.servers import fresh_database, settings_for  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

TASKS = ["grayscale", "resize", "blur", "sharpen", "edge_detect"]


def _order_seconds(settings: Settings, name: str) -> tuple[float, list[float]]:
    """The order's duration as the orchestrator recorded it, and each task's."""
    from sqlalchemy import select

    from pipeline.db import connect
    from pipeline.db.schema import orders

    with connect(settings.database_url).connect() as conn:
        row = conn.execute(select(orders).where(orders.c.name == name)).mappings().one()
    runs = stored_orders(settings)[name].runs
    tasks = [(r["finished_at"] - r["started_at"]).total_seconds() for r in runs]
    return (row["finished_at"] - row["created_at"]).total_seconds(), tasks


def run_local(infra: dict, folder: Path, index: int) -> dict:
    with fresh_database(infra["DATABASE_URL"]) as url:
        settings = settings_for(infra, url, folder / f"local-{index}")
        order = write_order(folder, f"bench-local-{index}", TASKS)
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(order)], cwd=REPO_ROOT,
                              env=child_env(settings), capture_output=True, text=True, timeout=300)
        wall = time.monotonic() - began
        if done.returncode != 0:
            raise SystemExit(f"local run failed:\n{done.stdout}\n{done.stderr}")
        order_s, tasks = _order_seconds(settings, f"bench-local-{index}")
    return {"wall_s": wall, "order_s": order_s, "task_s": tasks}


def run_kubernetes(api: ApiServer, infra: dict, folder: Path, index: int) -> dict:
    namespace = f"bench-{secrets.token_hex(3)}"
    run_dir = folder / f"k8s-{index}"
    run_dir.mkdir(parents=True)
    with api.api_client() as client:
        core = k8s.CoreV1Api(client)
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        core.create_namespaced_service_account(namespace, k8s.V1ServiceAccount(
            metadata=k8s.V1ObjectMeta(name="default")))
    try:
        with fresh_database(infra["DATABASE_URL"]) as url:
            kubeconfig = prepare_namespace(api, namespace, infra["KAFKA_BOOTSTRAP_SERVERS"], url, run_dir)
            order = write_order(folder, f"bench-k8s-{index}", TASKS)
            with KubeletStandIn(api, namespace, log_dir=run_dir / "pod-logs", root=run_dir / "kubelet"):
                began = time.monotonic()
                done = submit(kubeconfig, namespace, [order], run_dir, timeout=300)
                wall = time.monotonic() - began
            if done.returncode != 0:
                raise SystemExit(f"kubernetes run failed:\n{done.stdout}\n{done.stderr}")
            settings = settings_for(infra, url, run_dir)
            order_s, tasks = _order_seconds(settings, f"bench-k8s-{index}")
    finally:
        with api.api_client() as client:
            k8s.CoreV1Api(client).delete_namespace(namespace)
    return {"wall_s": wall, "order_s": order_s, "task_s": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    settings = Settings.from_env()
    if not settings.kafka_bootstrap_servers or not settings.database_url.startswith("postgresql"):
        raise SystemExit("start the broker and PostgreSQL first: ./dev python -m pipeline infra up --postgres")
    infra = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "DATABASE_URL": settings.database_url}
    os.environ.pop("RUNTIME", None)
    results: dict[str, list[dict]] = {"local": [], "kubernetes": []}
    with tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        api = ApiServer(workdir=folder / "apiserver").start()
        api_start = time.monotonic() - started
        try:
            for index in range(args.runs):
                # Alternate, so that drift in the machine's load hits both sides alike.
                results["local"].append(run_local(infra, folder, index))
                results["kubernetes"].append(run_kubernetes(api, infra, folder, index))
                print(f"run {index + 1}/{args.runs}: local {results['local'][-1]['wall_s']:.1f}s, "
                      f"kubernetes {results['kubernetes'][-1]['wall_s']:.1f}s (load {loadavg()})")
        finally:
            api.stop()
    rows = []
    for side, runs in results.items():
        rows.append([side, f"{median([r['order_s'] for r in runs]):.1f}",
                     f"{median([sum(r['task_s']) for r in runs]):.1f}",
                     f"{median([r['wall_s'] for r in runs]):.1f}",
                     ", ".join(f"{r['wall_s']:.1f}" for r in runs)])
    print(f"\napiserver start (etcd + kube-apiserver to /readyz): {api_start:.1f}s")
    print(markdown_table(["runtime", "order (created → finished), median s", "sum of task runs, median s",
                          "command wall clock, median s", "every run, s"], rows))
    write_json(args.json, {"machine": machine(), "tasks": TASKS, "apiserver_start_s": api_start, **results})


if __name__ == "__main__":
    main()
