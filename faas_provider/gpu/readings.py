"""What NVML says the node's GPUs are doing now: utilisation, memory in use, and the memory
each function's processes hold.

Utilisation is NVML's (as DCGM_FI_DEV_GPU_UTIL: the share of the last sample period in which
a kernel ran). Under MPS, NVML lists every client process with the memory it holds, but
reports per-process utilisation for the MPS server alone: a function's use of a GPU's time is
what its gates were charged (gate/service.py), not NVML's.

A process belongs to the function named by FUNCTION_VARIABLE in its environment, which every
replica placed on a GPU starts with (the local backend's launch, the Kubernetes pod
template); it is read from /proc/PID/environ. On a cluster the node agent runs in the host's
PID namespace, as NVML's PIDs are, with CAP_SYS_PTRACE to read other containers' environments.
Processes of no function (the MPS server, anything else on the GPU) count in the GPU's memory
used alone.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("fast_gshare.gpu")

FUNCTION_VARIABLE = "FAST_GSHARE_FUNCTION"


def function_env(function: str) -> dict[str, str]:
    """The environment that marks a replica's processes as `function`'s (`name.namespace`)."""
    return {FUNCTION_VARIABLE: function}


@dataclass(frozen=True)
class GpuReading:
    """One GPU, as NVML saw it at one moment."""

    uuid: str
    utilization_ratio: float | None  # None where NVML does not say
    memory_used_bytes: int
    memory_by_function: dict[str, int] = field(default_factory=dict)  # name.namespace -> bytes


class GpuReader:
    """Reads NVML for the GPUs asked about; reads nothing where NVML is not there.

    `nvml` is the pynvml module, or a stand-in with its functions (the seam tests use);
    `proc` is where the processes' environments are read."""

    def __init__(self, nvml: ModuleType | Any | None = None, proc: Path = Path("/proc")) -> None:
        self._nvml = nvml
        self._proc = proc
        self._started = False
        self._unavailable = False
        self._unreadable_told = False

    def read(self, uuids: list[str]) -> list[GpuReading]:
        """A reading of each GPU in `uuids` that NVML knows (none without NVML)."""
        nvml = self._start()
        if nvml is None:
            return []
        readings = []
        for uuid in uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                used = _memory_used(nvml, handle)
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError:
                continue  # not an NVML GPU (a virtual one), or gone
            try:
                utilization: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
            except nvml.NVMLError:
                utilization = None
            by_function: dict[str, int] = {}
            for process in processes:
                function = self.function_of(int(process.pid))
                if function is not None and process.usedGpuMemory is not None:
                    by_function[function] = by_function.get(function, 0) + process.usedGpuMemory
            readings.append(GpuReading(uuid, utilization, used, by_function))
        return readings

    def close(self) -> None:
        """Let NVML go."""
        if self._started and self._nvml is not None:
            self._started = False
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()

    def function_of(self, pid: int) -> str | None:
        """The function process `pid` runs for, from its environment; None for a process of
        none, one gone, or one whose environment this process may not read."""
        try:
            environ = (self._proc / str(pid) / "environ").read_bytes()
        except PermissionError:
            if not self._unreadable_told:
                self._unreadable_told = True
                log.warning(
                    "cannot read the environment of GPU process %d: its memory is counted "
                    "for no function (the node agent needs the host's PID namespace and "
                    "CAP_SYS_PTRACE)",
                    pid,
                )
            return None
        except OSError:
            return None
        prefix = FUNCTION_VARIABLE.encode() + b"="
        for entry in environ.split(b"\0"):
            if entry.startswith(prefix):
                return entry[len(prefix) :].decode(errors="replace") or None
        return None

    def _start(self) -> ModuleType | Any | None:
        if self._unavailable:
            return None
        if self._started:
            return self._nvml
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as error:  # ImportError, or NVMLError of any kind: no readings
            self._unavailable = True
            log.info("no GPU readings: NVML unavailable (%s)", error)
            return None
        self._started = True
        return self._nvml


def _memory_used(nvml: ModuleType | Any, handle: Any) -> int:
    """Memory in use as nvidia-smi and DCGM count it: NVML's v2 figure, which leaves out what
    the driver reserves (the v1 figure, where v2 is missing, counts that too)."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle, version=version).used)
        except nvml.NVMLError:
            pass
    return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
