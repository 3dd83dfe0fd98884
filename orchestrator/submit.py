"""``python -m orchestrator submit``: run an order inside the cluster.

The order file and its input image travel in a ConfigMap (owned by the Job, so that it goes
when the Job does); an orchestrator Job, running as the ``orchestrator`` service account,
mounts it and runs the order with ``RUNTIME=kubernetes`` from inside the cluster.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from orchestrator.orders import Order, OrderError
from orchestrator.runtime.job_specs import COMPONENT, PART_OF, RUN_LABEL, JobTemplates, job_name
from orchestrator.runtime.job_watcher import JobWatcher, Phase
from pipeline.errors import ClusterError
from pipeline.kube import api_message, load_api_client
from pipeline.settings import Settings

ORDER_FILE = "order.json"
# A ConfigMap holds at most 1 MiB; leave room for the order file and the object's metadata.
MAX_IMAGE_BYTES = 900 * 1024


@dataclass(frozen=True)
class Submitted:
    order: Order
    job: str
    config_map: str


class Submitter:
    """Submits orders to ``settings.k8s_namespace`` with the caller's credentials."""

    def __init__(self, settings: Settings, api_client: client.ApiClient | None = None) -> None:
        self.settings = settings
        self.namespace = settings.k8s_namespace
        api_client = api_client or load_api_client()
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.run_id = secrets.token_hex(6)
        self.templates = JobTemplates(settings, self.run_id)

    def submit(self, order: Order) -> Submitted:
        """Upload a checked order (:func:`~orchestrator.orders.load_order`) with its image and
        start its orchestrator Job."""
        image = order.image.read_bytes()
        if len(image) > MAX_IMAGE_BYTES:
            raise OrderError(f"{order.source or order.name}: image {order.image.name} is "
                             f"{len(image) // 1024} KiB; a submitted order's image must be under "
                             f"{MAX_IMAGE_BYTES // 1024} KiB (it travels in a ConfigMap)")
        # The image lies next to the order file in the mounted ConfigMap.
        document = order.to_document(image=order.image.name)
        config_map = job_name("order", order.name)
        labels = {PART_OF: "image-pipeline", COMPONENT: "order", RUN_LABEL: self.run_id}
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=config_map, labels=labels),
            data={ORDER_FILE: json.dumps(document, indent=2)},
            binary_data={order.image.name: base64.b64encode(image).decode("ascii")},
        )
        self._call(f"create ConfigMap {config_map}", self.core.create_namespaced_config_map,
                   self.namespace, body)
        try:
            job = self.templates.orchestrator_job(order.name, config_map, ORDER_FILE)
            created = self._call(f"create Job {job['metadata']['name']}",
                                 self.batch.create_namespaced_job, self.namespace, job)
            owner = {"apiVersion": "batch/v1", "kind": "Job", "name": created.metadata.name,
                     "uid": created.metadata.uid}
            self._call(f"hand ConfigMap {config_map} to its Job",
                       self.core.patch_namespaced_config_map, config_map, self.namespace,
                       {"metadata": {"ownerReferences": [owner]}})
        except ClusterError:
            self._delete_quietly(config_map)
            raise
        return Submitted(order, created.metadata.name, config_map)

    def wait(self, submitted: list[Submitted], timeout: float) -> dict[str, str]:
        """Wait for the orchestrator Jobs to finish; each Job's outcome in words."""
        watcher = JobWatcher(self.batch, self.namespace, f"{RUN_LABEL}={self.run_id}").start()
        try:
            outcomes = {}
            for item in submitted:
                watcher.expect(item.job)
                state = watcher.wait_for(item.job, lambda s: s.finished, timeout)
                if state is None or not state.finished:
                    outcomes[item.job] = "still running"
                elif state.phase is Phase.SUCCEEDED:
                    outcomes[item.job] = "succeeded"
                elif state.phase is Phase.GONE:
                    outcomes[item.job] = "deleted before it finished"
                else:
                    outcomes[item.job] = f"failed ({state.reason}: {state.message})"
            return outcomes
        finally:
            watcher.stop()

    def _call(self, what: str, method, *args):
        try:
            return method(*args)
        except ApiException as exc:
            raise ClusterError(f"cannot {what} in namespace {self.namespace}: HTTP {exc.status} "
                               f"{api_message(exc)}") from None
        except HTTPError as exc:
            raise ClusterError(f"cannot {what}: the API server is unreachable ({exc})") from None

    def _delete_quietly(self, config_map: str) -> None:
        try:
            self.core.delete_namespaced_config_map(config_map, self.namespace)
        except (ApiException, HTTPError):
            pass
