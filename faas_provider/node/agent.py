"""The node agent: one node's GPU services.

It keeps the node's GPU inventory, runs one MPS control daemon per real GPU and the token
service every gate of the node registers with, reads the GPUs' NVML figures (gpu/readings.py),
and watches the daemons: when a GPU's MPS clients lose their server (a fatal fault, the
server or its daemon gone; see gpu/mps.py), `on_lost` is called with that GPU once its daemon
runs again, so whoever runs the replicas can recycle that GPU's alone. On a machine without a
GPU the inventory is one virtual GPU, without MPS: the gates and the token service run the same.

It decides nothing: placement (gpu/placement.py) is the provider's, the replicas' start is the
backend's.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from faas_provider.gate.service import FunctionUsage, TokenService
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.mps import CONTROL_BINARY, MpsDaemon, MpsError, ServerLoss, pipe_dir
from faas_provider.gpu.readings import GpuReader, GpuReading

log = logging.getLogger("fast_gshare.node")

LossHook = Callable[[GpuDevice, ServerLoss], Awaitable[None]]


@dataclass(frozen=True)
class RunDir:
    """What the node agent keeps in its run directory, where gates and MPS clients reach it
    (on a cluster function pods mount these paths from the host)."""

    root: PurePosixPath

    @property
    def token_dir(self) -> PurePosixPath:
        """The directory of the token service's socket."""
        return self.root / "tokens"

    @property
    def token_socket(self) -> PurePosixPath:
        return self.token_dir / "tokens.sock"

    @property
    def mps_dir(self) -> PurePosixPath:
        """The MPS daemons' directories, one per GPU."""
        return self.root / "mps"

    def pipe_dir(self, gpu_uuid: str) -> PurePosixPath:
        """The MPS pipe directory of one GPU's daemon."""
        return PurePosixPath(pipe_dir(self.mps_dir, gpu_uuid))

    @property
    def shm_dir(self) -> PurePosixPath:
        """The shared memory MPS clients and their server meet in (their /dev/shm)."""
        return self.root / "shm"


class NodeAgent:
    """The GPU services of one node: MPS daemons, the token service and the fault watch."""

    def __init__(
        self,
        devices: list[GpuDevice],
        window_s: float = 0.1,
        mps_binary: str = CONTROL_BINARY,
        run_dir: Path | None = None,
        reader: GpuReader | None = None,
    ) -> None:
        """`run_dir` holds the token socket and the MPS directories (a fresh temporary
        directory, removed on close, when None); `reader` reads the GPUs' NVML figures."""
        self.devices = devices
        self._reader = reader or GpuReader()
        self._tokens = TokenService(window_s)
        self._given_run_dir = run_dir
        self._run_dir: RunDir | None = None  # set by start()
        self._mps_binary = mps_binary
        self._mps: dict[int, MpsDaemon] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self.on_lost: LossHook | None = None
        self.losses: dict[str, int] = {}  # by GPU UUID: how often its MPS clients lost their server

    async def start(self) -> None:
        """Start the token service and, on real GPUs, one MPS daemon per GPU."""
        root = self._given_run_dir or Path(tempfile.mkdtemp(prefix="fast-gshare-"))
        self._run_dir = RunDir(PurePosixPath(root))
        Path(self._run_dir.token_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
        await self._tokens.start(self.token_socket)
        real = [device for device in self.devices if not device.virtual]
        if real and shutil.which(self._mps_binary) is None:
            log.warning(
                "%s not found: GPU replicas share time through their gates, but not SMs",
                self._mps_binary,
            )
            return
        for device in real:
            daemon = MpsDaemon(device.index, device.uuid, self.mps_dir, self._mps_binary)
            try:
                await daemon.start()
            except MpsError as error:
                log.error("%s; GPU %d shares time only, not SMs", error, device.index)
                continue
            self._mps[device.index] = daemon
            self._watchers.append(asyncio.create_task(daemon.watch(self._lost_on(device))))

    async def close(self) -> None:
        """Stop the MPS daemons and the token service; remove a temporary run directory."""
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(daemon.stop() for daemon in self._mps.values()))
        await self._tokens.close()
        self._reader.close()
        if self._run_dir is not None and self._given_run_dir is None:
            shutil.rmtree(self._run_dir.root, ignore_errors=True)

    @property
    def token_socket(self) -> Path:
        """Where the token service listens."""
        assert self._run_dir is not None, "NodeAgent used before start()"
        return Path(self._run_dir.token_socket)

    @property
    def mps_dir(self) -> Path:
        """Where the MPS daemons keep their pipe and log directories, one per GPU."""
        assert self._run_dir is not None, "NodeAgent used before start()"
        return Path(self._run_dir.mps_dir)

    def usage(self) -> list[FunctionUsage]:
        """Each function's share and use of each GPU, from the token service."""
        return self._tokens.usage()

    def readings(self) -> list[GpuReading]:
        """What NVML says of the node's GPUs now (nothing without NVML)."""
        return self._reader.read([device.uuid for device in self.devices])

    def daemon(self, index: int) -> MpsDaemon | None:
        """The MPS daemon of GPU `index`, if it has one."""
        return self._mps.get(index)

    def _lost_on(self, device: GpuDevice) -> Callable[[ServerLoss], Awaitable[None]]:
        async def recycle(loss: ServerLoss) -> None:
            self.losses[device.uuid] = self.losses.get(device.uuid, 0) + 1
            if self.on_lost is not None:
                await self.on_lost(device, loss)

        return recycle
