"""The machine's GPUs as the local backend uses them: placement, the token service, MPS.

A GPU replica is placed on a GPU (packing, see gpu/placement.py), started as an MPS client of
that GPU's daemon with its SM partition and memory cap (on a real GPU), and fronted by a
time-quota gate registered with the token service that runs here, in the provider. On a
machine without a GPU the same happens on a virtual GPU, without MPS, CPU-only.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from faas_provider.backends.base import InvalidRequest
from faas_provider.gate.service import TokenService
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.placement import GpuLoad, choose_gpu, fits_when_empty, why_pending
from faas_provider.gpu.share import GPU_MEMORY, GpuShare

log = logging.getLogger("fast_gshare.gpus")


@dataclass(frozen=True)
class Placement:
    """Where a replica runs and what it is started with there."""

    device: GpuDevice
    env: dict[str, str]
    gate_argv: list[str] | None


class GpuPool:
    """Places GPU replicas and runs what they need: the token service (and MPS daemons)."""

    def __init__(self, devices: list[GpuDevice], window_s: float = 0.1) -> None:
        self.devices = devices
        self._loads = [GpuLoad(device) for device in devices]
        self._where: dict[str, GpuLoad] = {}
        self._tokens = TokenService(window_s)
        self._run_dir = Path(tempfile.mkdtemp(prefix="fast-gshare-"))
        self.token_socket = self._run_dir / "tokens.sock"

    async def start(self) -> None:
        """Start the token service."""
        await self._tokens.start(self.token_socket)

    async def close(self) -> None:
        """Stop the token service and remove its socket."""
        await self._tokens.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def check(self, share: GpuShare) -> None:
        """InvalidRequest when no GPU of this machine could hold `share` even empty."""
        if fits_when_empty(share, self.devices):
            return
        reason = why_pending(share, [GpuLoad(device) for device in self.devices])
        what = GPU_MEMORY if share.memory_bytes else "limits nvidia.com/gpu"
        raise InvalidRequest(f"no GPU of this machine can hold the function ({what}): {reason}")

    def place(self, key: str, share: GpuShare) -> Placement | str:
        """Reserve room for replica `key`; its Placement, or why nothing fits now."""
        load = choose_gpu(share, self._loads)
        if load is None:
            return why_pending(share, self._loads)
        load.shares[key] = share
        self._where[key] = load
        device = load.device
        env = {} if device.virtual else {"CUDA_VISIBLE_DEVICES": device.uuid}
        gate_argv = None
        if not share.exclusive:  # a whole GPU has nobody to share time with
            gate_argv = [sys.executable, "-m", "faas_provider.gate"]
            gate_argv += ["--token-socket", str(self.token_socket), "--gpu", device.uuid]
            gate_argv += ["--client", key, "--sm", str(share.sm_percent)]
            gate_argv += ["--request", str(share.quota_request)]
            gate_argv += ["--limit", str(share.quota_limit), "--parent-pid", str(os.getpid())]
        log.info("replica %s placed on GPU %d (%s)", key, device.index, device.uuid)
        return Placement(device, env, gate_argv)

    def release(self, key: str) -> None:
        """Free replica `key`'s room."""
        load = self._where.pop(key, None)
        if load is not None:
            load.shares.pop(key, None)
