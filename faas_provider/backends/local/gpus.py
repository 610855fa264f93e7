"""The machine's GPUs as the local backend uses them: placement, the token service, MPS.

A GPU replica is placed on a GPU (packing, see gpu/placement.py), started as an MPS client of
that GPU's daemon with its SM partition and memory cap (on a real GPU), and fronted by a
time-quota gate registered with the token service that runs here, in the provider. On a
machine without a GPU the same happens on a virtual GPU, without MPS, CPU-only. When a GPU's
MPS clients lose their server (a fatal fault, the server or its daemon gone; see gpu/mps.py),
`on_lost` is called with that GPU, once its daemon runs again: the backend then recycles the
replicas of that GPU alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from faas_provider.backends.base import InvalidRequest
from faas_provider.gate.service import TokenService
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.mps import CONTROL_BINARY, MpsDaemon, MpsError, ServerLoss
from faas_provider.gpu.placement import GpuLoad, choose_gpu, fits_when_empty, why_pending
from faas_provider.gpu.share import GPU_MEMORY, GpuShare

log = logging.getLogger("fast_gshare.gpus")

LossHook = Callable[[GpuDevice, ServerLoss], Awaitable[None]]


@dataclass(frozen=True)
class Placement:
    """Where a replica runs and what it is started with there."""

    device: GpuDevice
    env: dict[str, str]
    gate_argv: list[str] | None


class GpuPool:
    """Places GPU replicas and runs what they need: the token service and MPS daemons."""

    def __init__(
        self,
        devices: list[GpuDevice],
        window_s: float = 0.1,
        mps_binary: str = CONTROL_BINARY,
    ) -> None:
        self.devices = devices
        self._loads = [GpuLoad(device) for device in devices]
        self._where: dict[str, GpuLoad] = {}
        self._tokens = TokenService(window_s)
        self._run_dir: Path | None = None  # made by start(): sockets and MPS directories
        self._mps_binary = mps_binary
        self._mps: dict[int, MpsDaemon] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self.on_lost: LossHook | None = None

    async def start(self) -> None:
        """Start the token service and, on real GPUs, one MPS daemon per GPU."""
        run_dir = self._run_dir = Path(tempfile.mkdtemp(prefix="fast-gshare-"))
        await self._tokens.start(self.token_socket)
        real = [device for device in self.devices if not device.virtual]
        if real and shutil.which(self._mps_binary) is None:
            log.warning(
                "%s not found: GPU replicas share time through their gates, but not SMs",
                self._mps_binary,
            )
            return
        for device in real:
            daemon = MpsDaemon(device.index, device.uuid, run_dir / "mps", self._mps_binary)
            try:
                await daemon.start()
            except MpsError as error:
                log.error("%s; GPU %d shares time only, not SMs", error, device.index)
                continue
            self._mps[device.index] = daemon
            self._watchers.append(asyncio.create_task(daemon.watch(self._lost_on(device))))

    async def close(self) -> None:
        """Stop the MPS daemons and the token service; remove their sockets."""
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(daemon.stop() for daemon in self._mps.values()))
        await self._tokens.close()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    @property
    def token_socket(self) -> Path:
        """Where the token service listens."""
        assert self._run_dir is not None, "GpuPool used before start()"
        return self._run_dir / "tokens.sock"

    def daemon(self, index: int) -> MpsDaemon | None:
        """The MPS daemon of GPU `index`, if it has one."""
        return self._mps.get(index)

    def device_of(self, key: str) -> GpuDevice | None:
        """The GPU replica `key` is placed on."""
        load = self._where.get(key)
        return load.device if load is not None else None

    def _lost_on(self, device: GpuDevice) -> Callable[[ServerLoss], Awaitable[None]]:
        async def recycle(loss: ServerLoss) -> None:
            if self.on_lost is not None:
                await self.on_lost(device, loss)

        return recycle

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
        daemon = self._mps.get(device.index)
        if daemon is not None and not share.exclusive:
            env = daemon.client_env(share.sm_percent, share.memory_bytes)
        else:
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

    def release(self, key: str) -> bool:
        """Free replica `key`'s room; whether it had any."""
        load = self._where.pop(key, None)
        if load is None:
            return False
        load.shares.pop(key, None)
        return True
