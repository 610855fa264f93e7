"""Placement: which GPU a replica goes to. Pure logic, no I/O; fed by the GPU inventory.

A replica fits a GPU when the footprints (SM share times guaranteed time share) of the GPU's
replicas stay within 100, their memory caps within the GPU's memory, and nothing there is
exclusive (or, for an exclusive replica, the GPU is empty). Among the GPUs that fit, the
fullest wins: GPUs are packed before another is opened, so the load needs the fewest GPUs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from faas_provider.errors import InvalidRequest
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.share import GPU_MEMORY, GpuShare

_EPSILON = 1e-9


@dataclass
class GpuLoad:
    """The replicas placed on one GPU."""

    device: GpuDevice
    shares: dict[str, GpuShare] = field(default_factory=dict)

    @property
    def footprint(self) -> float:
        return sum(share.footprint for share in self.shares.values())

    @property
    def memory_bytes(self) -> int:
        return sum(share.memory_bytes or 0 for share in self.shares.values())

    def misfit(self, share: GpuShare) -> str | None:
        """Why `share` does not fit here now, or None when it does."""
        if share.exclusive and self.shares:
            return f"{self.device.label} is not empty (the function wants a whole GPU)"
        if any(s.exclusive for s in self.shares.values()):
            return f"{self.device.label} is held whole by one replica"
        if self.footprint + share.footprint > 100 + _EPSILON:
            return (
                f"{self.device.label} has {100 - self.footprint:.0f} of 100 SM-time left, "
                f"the replica needs {share.footprint:.0f}"
            )
        if self.memory_bytes + (share.memory_bytes or 0) > self.device.memory_bytes:
            free = (self.device.memory_bytes - self.memory_bytes) / 1024**3
            need = (share.memory_bytes or 0) / 1024**3
            label = self.device.label
            return f"{label} has {free:.1f} GiB free, the replica caps at {need:.1f} GiB"
        return None


def choose_gpu(share: GpuShare, loads: list[GpuLoad]) -> GpuLoad | None:
    """The fullest GPU that fits `share` now, or None."""
    fitting = [load for load in loads if load.misfit(share) is None]
    if not fitting:
        return None
    return max(fitting, key=lambda load: (load.footprint, -load.device.index))


def fits_when_empty(share: GpuShare, devices: list[GpuDevice]) -> bool:
    """Whether some GPU could hold `share` at all, were it empty."""
    return any(GpuLoad(device).misfit(share) is None for device in devices)


def why_pending(share: GpuShare, loads: list[GpuLoad]) -> str:
    """One line saying why no GPU fits `share` now."""
    return "; ".join(reason for load in loads if (reason := load.misfit(share)))


class Placer:
    """Which replica holds room on which GPU: the provider's placement bookkeeping."""

    def __init__(self, devices: list[GpuDevice], where: str = "this machine") -> None:
        """`where` names the GPUs' home in refusals ("no GPU of this machine can hold ...")."""
        self.devices = devices
        self._where = where
        self._loads = [GpuLoad(device) for device in devices]
        self._placed: dict[str, GpuLoad] = {}

    @property
    def loads(self) -> list[GpuLoad]:
        """What is placed on each GPU."""
        return list(self._loads)

    def check(self, share: GpuShare) -> None:
        """InvalidRequest when no GPU could hold `share` even empty."""
        if fits_when_empty(share, self.devices):
            return
        reason = why_pending(share, [GpuLoad(device) for device in self.devices])
        what = GPU_MEMORY if share.memory_bytes else "limits nvidia.com/gpu"
        raise InvalidRequest(f"no GPU of {self._where} can hold the function ({what}): {reason}")

    def place(self, key: str, share: GpuShare) -> GpuDevice | str:
        """Reserve room for replica `key`; its GPU, or why nothing fits now."""
        load = choose_gpu(share, self._loads)
        if load is None:
            return why_pending(share, self._loads)
        load.shares[key] = share
        self._placed[key] = load
        return load.device

    def hold(self, key: str, share: GpuShare, device: GpuDevice) -> None:
        """Record replica `key` as placed on `device` already (placement found again, as on a
        cluster after a restart), fitting or not."""
        load = next(load for load in self._loads if load.device == device)
        load.shares[key] = share
        self._placed[key] = load

    def release(self, key: str) -> bool:
        """Free replica `key`'s room; whether it had any."""
        load = self._placed.pop(key, None)
        if load is None:
            return False
        load.shares.pop(key, None)
        return True

    def device_of(self, key: str) -> GpuDevice | None:
        """The GPU replica `key` is placed on."""
        load = self._placed.get(key)
        return load.device if load is not None else None


def spread(
    placer: Placer,
    key: str,
    share: GpuShare,
    replicas: int,
    held: Counter[GpuDevice] | None = None,
) -> tuple[Counter[GpuDevice], str | None]:
    """Place `replicas` replicas of function `key` with `placer`: those `held` on GPUs the
    placer still has stay there (as many as are wanted), the others go where placement finds
    room. How many are on each GPU, and why the rest wait (None when none waits)."""
    counts: Counter[GpuDevice] = Counter()
    for device, count in (held or Counter()).items():
        if device not in placer.devices:
            continue  # gone from the inventory: placed again below
        for _ in range(min(count, replicas - counts.total())):
            placer.hold(f"{key}/{device.uuid}/{counts[device]}", share, device)
            counts[device] += 1
    while counts.total() < replicas:
        device = placer.place(f"{key}/new/{counts.total()}", share)
        if isinstance(device, str):
            return counts, device
        counts[device] += 1
    return counts, None
