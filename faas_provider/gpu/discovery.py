"""Finding the GPUs of this machine through NVML, or one virtual GPU where there is none.

On a machine without an NVIDIA GPU (or without NVML) GPU functions still run, CPU-only, on a
virtual GPU: placement, the time-quota gate and the scheduler are the same code either way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

log = logging.getLogger("fast_gshare.gpu")

VIRTUAL_GPU_MEMORY = 16 * 1024**3


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as placement sees it."""

    index: int
    uuid: str
    name: str
    memory_bytes: int
    sm_count: int | None = None
    virtual: bool = False
    node: str | None = None  # on a cluster, the node it is on
    # the cores that go with a real GPU: its machine's, shared evenly by its GPUs
    cpu_cores: int | None = None

    @property
    def label(self) -> str:
        """How log lines and refusals name it: `GPU 0`, or `GPU 0 of node gpu-1`."""
        return f"GPU {self.index}" + (f" of node {self.node}" if self.node else "")


def discover_gpus(virtual_memory_bytes: int = VIRTUAL_GPU_MEMORY) -> list[GpuDevice]:
    """The NVIDIA GPUs NVML reports, or one virtual GPU (with one log line saying why)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # ImportError, or NVMLError of any kind: no usable GPU
        return [_virtual(virtual_memory_bytes, f"NVML unavailable: {error}")]
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                sm_count = pynvml.nvmlDeviceGetAttributes(handle).multiprocessorCount
            except pynvml.NVMLError:
                sm_count = None
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            devices.append(
                GpuDevice(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    name=name.decode() if isinstance(name, bytes) else name,
                    memory_bytes=pynvml.nvmlDeviceGetMemoryInfo(handle).total,
                    sm_count=sm_count,
                )
            )
    finally:
        pynvml.nvmlShutdown()
    if not devices:
        return [_virtual(virtual_memory_bytes, "NVML reports no GPU")]
    cores = max(1, len(os.sched_getaffinity(0)) // len(devices))
    devices = [replace(device, cpu_cores=cores) for device in devices]
    for device in devices:
        log.info(
            "GPU %d: %s, %s, %.0f GiB, %s SMs, %d CPU cores",
            device.index,
            device.name,
            device.uuid,
            device.memory_bytes / 1024**3,
            device.sm_count or "?",
            device.cpu_cores,
        )
    return devices


def _virtual(memory_bytes: int, reason: str) -> GpuDevice:
    log.info("no NVIDIA GPU (%s): GPU functions run CPU-only on one virtual GPU", reason)
    return GpuDevice(
        index=0, uuid="virtual-0", name="virtual", memory_bytes=memory_bytes, virtual=True
    )
