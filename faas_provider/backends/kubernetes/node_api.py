"""What a node agent does through the Kubernetes API, and what the provider reads of it.

The GPUs a node shares are published on its Node, in the annotation `fastgshare/gpus`: a JSON
list of `{"index", "uuid", "name", "memory_bytes", "sm_count", "cpu_cores"}`, which placement
and the Deployments' thread counts read. When a GPU's MPS clients lose their server, the agent
deletes that GPU's function pods on its node: their CUDA contexts are of no more use, and their
Deployments start new ones, clients of the daemon the agent has started again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubernetes_asyncio import client

from faas_provider.backends.kubernetes.manifests import GPU_LABEL
from faas_provider.gpu.discovery import GpuDevice

log = logging.getLogger("fast_gshare.kubernetes")

GPUS_ANNOTATION = "fastgshare/gpus"


async def publish_gpus(api: client.ApiClient, node: str, devices: list[GpuDevice]) -> None:
    """Write `devices` (the real GPUs among them) on Node `node`."""
    listed = [
        {
            "index": d.index,
            "uuid": d.uuid,
            "name": d.name,
            "memory_bytes": d.memory_bytes,
            "sm_count": d.sm_count,
            "cpu_cores": d.cpu_cores,
        }
        for d in devices
        if not d.virtual
    ]
    patch = {"metadata": {"annotations": {GPUS_ANNOTATION: json.dumps(listed)}}}
    await client.CoreV1Api(api).patch_node(node, patch)
    log.info("published %d GPU(s) on node %s", len(listed), node)


async def recycle_pods(api: client.ApiClient, node: str, gpu_uuid: str) -> int:
    """Delete the function pods of GPU `gpu_uuid` on `node`; how many there were."""
    core = client.CoreV1Api(api)
    pods = await core.list_pod_for_all_namespaces(
        label_selector=f"{GPU_LABEL}={gpu_uuid}", field_selector=f"spec.nodeName={node}"
    )
    for pod in pods.items:
        try:
            await core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
        except client.exceptions.ApiException as error:
            if error.status != 404:
                raise
    names = ", ".join(pod.metadata.name for pod in pods.items) or "none"
    log.warning(
        "GPU %s of node %s lost its MPS server: deleted its pods (%s)", gpu_uuid, node, names
    )
    return len(pods.items)


def node_gpus(node: dict[str, Any]) -> list[GpuDevice]:
    """The GPUs a Node's agent published; [] for none, or for an annotation that cannot be
    read (one log line says so)."""
    meta = node["metadata"]
    text = meta.get("annotations", {}).get(GPUS_ANNOTATION)
    if not text:
        return []
    try:
        return [
            GpuDevice(
                index=int(gpu["index"]),
                uuid=str(gpu["uuid"]),
                name=str(gpu.get("name") or "GPU"),
                memory_bytes=int(gpu["memory_bytes"]),
                sm_count=gpu.get("sm_count"),
                node=meta["name"],
                cpu_cores=gpu.get("cpu_cores"),
            )
            for gpu in json.loads(text)
        ]
    except (ValueError, TypeError, KeyError) as error:
        log.warning("node %s: annotation %s unreadable: %s", meta["name"], GPUS_ANNOTATION, error)
        return []
