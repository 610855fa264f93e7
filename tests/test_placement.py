"""Placement and the sharing request, with numbers."""

from __future__ import annotations

from collections import Counter

import pytest

from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.placement import GpuLoad, Placer, choose_gpu, fits_when_empty, spread
from faas_provider.gpu.share import GpuShare, parse_quantity

GIB = 1024**3


def _loads(count: int, memory_gib: int = 80) -> list[GpuLoad]:
    return [GpuLoad(GpuDevice(i, f"GPU-{i}", "test", memory_gib * GIB)) for i in range(count)]


def test_quantities() -> None:
    assert parse_quantity("4Gi") == 4 * GIB
    assert parse_quantity("500M") == 500_000_000
    assert parse_quantity("1.5Gi") == int(1.5 * GIB)
    assert parse_quantity("1024") == 1024
    for bad in ("", "4 GB", "-1Gi", "Gi"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


def test_packs_the_fullest_gpu_that_fits_before_opening_another() -> None:
    loads = _loads(3)
    share = GpuShare(sm_percent=30, quota_request=1.0, quota_limit=1.0, memory_bytes=GIB)
    placed = []
    for index in range(7):
        load = choose_gpu(share, loads)
        assert load is not None
        load.shares[f"r{index}"] = share
        placed.append(load.device.index)
    assert placed == [0, 0, 0, 1, 1, 1, 2], "three 30% replicas per GPU, GPUs filled in turn"
    assert choose_gpu(GpuShare(10, 1.0, 1.0, None), loads).device.index == 0  # fullest fit
    assert choose_gpu(GpuShare(20, 1.0, 1.0, None), loads).device.index == 2  # only fit


def test_footprint_is_sm_share_times_guaranteed_time() -> None:
    loads = _loads(1)
    half_time = GpuShare(sm_percent=100, quota_request=0.25, quota_limit=1.0, memory_bytes=None)
    for index in range(4):
        load = choose_gpu(half_time, loads)
        assert load is not None, f"replica {index}: four 100% x 0.25 fit one GPU"
        load.shares[str(index)] = half_time
    assert choose_gpu(half_time, loads) is None


def test_memory_caps_and_whole_gpus() -> None:
    loads = _loads(2, memory_gib=16)
    big = GpuShare(10, 0.1, 1.0, 10 * GIB)
    first = choose_gpu(big, loads)
    assert first is not None
    first.shares["a"] = big
    second = choose_gpu(big, loads)
    assert second is not None and second is not first, "10 + 10 GiB > 16 GiB"
    second.shares["b"] = big
    assert choose_gpu(GpuShare(100, 1.0, 1.0, None, exclusive=True), loads) is None
    assert not fits_when_empty(GpuShare(10, 0.1, 1.0, 20 * GIB), [load.device for load in loads])
    empty = _loads(1)
    empty[0].shares["whole"] = GpuShare(100, 1.0, 1.0, None, exclusive=True)
    assert choose_gpu(GpuShare(1, 0.01, 0.01, None), empty) is None, "a whole GPU is alone"


def test_spread_keeps_held_replicas_packs_the_rest_and_says_why_some_wait() -> None:
    gpus = [GpuDevice(i, f"GPU-{i}", "test", 80 * GIB, node=f"n{i}") for i in range(2)]
    share = GpuShare(sm_percent=40, quota_request=1.0, quota_limit=1.0, memory_bytes=GIB)
    held = Counter({gpus[1]: 1})
    placed, reason = spread(Placer(gpus), "ns/f", share, 3, held)
    assert placed == Counter({gpus[1]: 2, gpus[0]: 1}), "kept where it was, then packed there"
    assert reason is None
    placed, reason = spread(Placer(gpus), "ns/f", share, 5)
    assert placed.total() == 4
    assert reason is not None and "GPU 0 of node n0 has 20 of 100 SM-time left" in reason
    gone = GpuDevice(9, "GPU-9", "test", 80 * GIB, node="n9")
    placed, _ = spread(Placer(gpus), "ns/f", share, 1, Counter({gone: 1}))
    assert placed.total() == 1 and gone not in placed, "a GPU no longer there is placed anew"
    fewer, _ = spread(Placer(gpus), "ns/f", share, 1, Counter({gpus[0]: 2}))
    assert fewer == Counter({gpus[0]: 1}), "no more kept than wanted"
