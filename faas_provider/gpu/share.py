"""A function's GPU request, read from its `fastgshare/*` annotations and `nvidia.com/gpu` limit.

- fastgshare/gpu_sm_partition: percent of the GPU's SMs, 1..100 (default 100)
- fastgshare/gpu_quota_request: guaranteed fraction of each window, 0 < r <= 1 (default: limit)
- fastgshare/gpu_quota_limit: most of each window it may use, r <= l <= 1 (default 1)
- fastgshare/gpu_mem: GPU memory cap, bytes or a quantity such as 4Gi or 500M (default: none)
- fastgshare/latency_slo_ms: the p99 latency target the autoscaler holds it to (not a share)

Any other `fastgshare/` key is refused (a misspelt one would otherwise deploy a plain
function). A function with none of them and no `nvidia.com/gpu` limit is a plain function. A
limit of `nvidia.com/gpu: 1` means a whole GPU, alone. Its footprint on a GPU is its SM share
times its guaranteed time share (`sm_percent * quota_request`): what placement packs up to 100
per GPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from faas_provider.errors import InvalidRequest
from faas_provider.gate.registration import Registration
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.models import FunctionDeployment

SM_PARTITION = "fastgshare/gpu_sm_partition"
QUOTA_REQUEST = "fastgshare/gpu_quota_request"
QUOTA_LIMIT = "fastgshare/gpu_quota_limit"
GPU_MEMORY = "fastgshare/gpu_mem"
ANNOTATIONS = (SM_PARTITION, QUOTA_REQUEST, QUOTA_LIMIT, GPU_MEMORY)
LATENCY_SLO = "fastgshare/latency_slo_ms"
PREFIX = "fastgshare/"
THREADS_VARIABLE = "OMP_NUM_THREADS"  # torch's CPU threads: read by OpenMP at torch's import

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?\s*$")
_UNITS = {
    None: 1,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
}


@dataclass(frozen=True)
class GpuShare:
    """What one replica of a function asks of a GPU."""

    sm_percent: int
    quota_request: float
    quota_limit: float
    memory_bytes: int | None
    exclusive: bool = False

    @property
    def footprint(self) -> float:
        """SM-percent times guaranteed time share: a whole GPU is 100."""
        return self.sm_percent * self.quota_request

    def thread_env(self, device: GpuDevice, env: Mapping[str, str]) -> dict[str, str]:
        """OMP_NUM_THREADS for one replica on `device`, unless `env` (the function's) sets it:
        this share (SMs x quota) of the cores that go with that GPU, at least one; nothing when
        those cores are not known. Left to itself, torch starts a thread per core in every
        replica, and a replica that is starting (model load, warm-up) slows the running ones."""
        if device.cpu_cores is None or THREADS_VARIABLE in env:
            return {}
        return {THREADS_VARIABLE: str(max(1, round(device.cpu_cores * self.footprint / 100)))}

    def registration(self, gpu: str, client: str, function: str) -> Registration:
        """What the gate of replica `client` of `function` (`name.namespace`) on GPU `gpu`
        tells that GPU's token scheduler."""
        return Registration(
            gpu,
            client,
            self.sm_percent,
            self.quota_request,
            self.quota_limit,
            function,
            self.memory_bytes,
        )


def parse_quantity(text: str) -> int:
    """Bytes in `text`: a plain number, or a Kubernetes quantity (4Gi, 512Mi, 2G)."""
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a byte count or a quantity such as 4Gi or 500M")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def gpu_share(deployment: FunctionDeployment) -> GpuShare | None:
    """The function's GPU request, None for a plain function; InvalidRequest naming the
    annotation for a bad value."""
    annotations = deployment.annotations
    known = (*ANNOTATIONS, LATENCY_SLO)
    unknown = sorted(k for k in annotations if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise InvalidRequest(
            f"unknown annotation(s) {', '.join(unknown)}: the {PREFIX} annotations are "
            f"{', '.join(known)}"
        )
    if LATENCY_SLO in annotations:
        slo = _number(annotations, LATENCY_SLO, "0", float)
        if not 0 < slo < float("inf"):
            raise InvalidRequest(f"annotation {LATENCY_SLO} must be milliseconds above 0")
    given = [name for name in ANNOTATIONS if name in annotations]
    whole = deployment.limits.gpu if deployment.limits else None
    if whole is not None:
        if whole.strip() != "1":
            raise InvalidRequest(
                f"limits nvidia.com/gpu must be 1 (one whole GPU), not {whole!r}: a replica "
                f"uses one GPU; share one with the {SM_PARTITION} annotations instead"
            )
        if given:
            raise InvalidRequest(
                f"limits nvidia.com/gpu asks for a whole GPU but {', '.join(given)} asks to "
                "share one: use one or the other"
            )
        return GpuShare(100, 1.0, 1.0, None, exclusive=True)
    if not given:
        return None
    sm = _number(annotations, SM_PARTITION, "100", int)
    if not 1 <= sm <= 100:
        raise InvalidRequest(f"annotation {SM_PARTITION} must be from 1 to 100, not {sm}")
    limit = _number(annotations, QUOTA_LIMIT, "1", float)
    if not 0 < limit <= 1:
        raise InvalidRequest(f"annotation {QUOTA_LIMIT} must be above 0 and at most 1, not {limit}")
    request = _number(annotations, QUOTA_REQUEST, str(limit), float)
    if not 0 < request <= 1:
        raise InvalidRequest(
            f"annotation {QUOTA_REQUEST} must be above 0 and at most 1, not {request}"
        )
    if limit < request:
        raise InvalidRequest(
            f"annotation {QUOTA_LIMIT} ({limit}) must not be below {QUOTA_REQUEST} ({request})"
        )
    memory = None
    if GPU_MEMORY in annotations:
        try:
            memory = parse_quantity(annotations[GPU_MEMORY])
        except ValueError as error:
            raise InvalidRequest(f"annotation {GPU_MEMORY}: {error}") from None
        if memory <= 0:
            raise InvalidRequest(f"annotation {GPU_MEMORY} must be more than 0 bytes")
    return GpuShare(sm, request, limit, memory)


def _number(annotations: dict[str, str], name: str, default: str, kind: type) -> int | float:
    text = annotations.get(name, default)
    try:
        return kind(text.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise InvalidRequest(f"annotation {name} must be {what}, not {text!r}") from None
