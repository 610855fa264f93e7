"""`fast-gshare render -f stack.yml`: the Kubernetes objects of a stack's functions, without a
cluster (as `faas-cli generate` prints faas-netes' own). GPU-shared replicas are placed, with
the placement the provider uses, on the GPUs named by `--gpu NODE/UUID[/MEMORY]`, or on one
placeholder GPU."""

from __future__ import annotations

from typing import Any

import yaml

from faas_provider.backends.kubernetes.manifests import (
    function_deployment,
    function_service,
)
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.placement import Placer, spread
from faas_provider.gpu.share import gpu_share, parse_quantity
from faas_provider.models import FunctionDeployment

PLACEHOLDER_GPU = "gpu-node-1/GPU-00000000-0000-0000-0000-000000000000/80Gi"


def parse_gpu(text: str, index: int) -> GpuDevice:
    """A `NODE/UUID[/MEMORY]` flag as a GPU; ValueError saying what to write instead."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--gpu {text!r}: write NODE/UUID or NODE/UUID/MEMORY (e.g. 80Gi)")
    memory = parse_quantity(parts[2]) if len(parts) == 3 else parse_quantity("80Gi")
    return GpuDevice(index=index, uuid=parts[1], name="given", memory_bytes=memory, node=parts[0])


def stack_objects(
    stack: list[FunctionDeployment], gpus: list[GpuDevice], gate_image: str
) -> list[dict[str, Any]]:
    """Every object of the stack's functions: its Service, then its Deployment(s)."""
    placer = Placer(gpus, where="the given GPUs")
    objects = []
    for deployment in stack:
        share = gpu_share(deployment)
        replicas = deployment.min_replicas()
        objects.append(function_service(deployment, replicas))
        if share is None or share.exclusive:
            objects.append(function_deployment(deployment, replicas, share, None, gate_image))
            continue
        placer.check(share)
        key = f"{deployment.namespace}/{deployment.service}"
        placed, reason = spread(placer, key, share, replicas)
        if reason is not None:
            raise ValueError(
                f"{replicas - placed.total()} replica(s) of {deployment.service} fit no given "
                f"GPU: {reason}; give more GPUs with --gpu"
            )
        for device, count in placed.items():
            objects.append(function_deployment(deployment, count, share, device, gate_image))
    return objects


def dump(objects: list[dict[str, Any]]) -> str:
    """A YAML stream of `objects`, as kubectl apply -f reads it."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)
