"""A stand-in for pynvml with the calls gpu/discovery.py and gpu/readings.py make, for
machines without a GPU.

Its GPUs are named by UUID, each with a utilisation; their compute processes are the PIDs
`processes()` returns, each holding `process_bytes` (as NVML lists MPS clients), and the memory
used is `base_bytes` (the MPS server) plus theirs, and RESERVED_BYTES more in NVML's v1 figure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from faas_provider.gpu.readings import FUNCTION_VARIABLE


class NVMLError(Exception):
    pass


RESERVED_BYTES = 512 * 1024**2


class FakeNvml:
    NVMLError = NVMLError
    nvmlMemory_v2 = 0x02000028

    def __init__(
        self,
        utilization: dict[str, int],
        processes: Callable[[], list[int]],
        process_bytes: int = 256 * 1024**2,
        base_bytes: int = 64 * 1024**2,
    ) -> None:
        self.utilization = utilization
        self.processes = processes
        self.process_bytes = process_bytes
        self.base_bytes = base_bytes
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.utilization)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return list(self.utilization)[index]

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return handle

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "NVIDIA H200"

    def nvmlDeviceGetAttributes(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(multiprocessorCount=132)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid not in self.utilization:
            raise NVMLError(f"no GPU {uuid}")
        return uuid

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=self.utilization[handle], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: str, version: int | None = None) -> SimpleNamespace:
        used = self.base_bytes + len(self.processes()) * self.process_bytes
        if version is None:  # v1 counts what the driver reserves as used too
            used += RESERVED_BYTES
        return SimpleNamespace(used=used, total=16 * 1024**3, free=16 * 1024**3 - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=self.process_bytes) for pid in self.processes()
        ]


def replica_processes() -> list[int]:
    """This machine's processes started as GPU replicas (their environment names a function),
    but not their gates, which open no CUDA context."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if FUNCTION_VARIABLE.encode() + b"=" in environ and b"faas_provider.gate" not in command:
            found.append(int(entry.name))
    return found
