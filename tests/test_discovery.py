"""Finding the GPUs through a stand-in NVML (tests/fake_nvml.py)."""

from __future__ import annotations

import os
import sys

import pytest

from faas_provider.gpu.discovery import GpuDevice, discover_gpus
from tests.fake_nvml import FakeNvml


def test_each_gpu_found_gets_its_part_of_the_machines_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = FakeNvml({"GPU-a": 0, "GPU-b": 0}, list)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    found = discover_gpus()
    memory = 16 * 1024**3
    assert found == [
        GpuDevice(0, "GPU-a", "NVIDIA H200", memory, sm_count=132, cpu_cores=8),
        GpuDevice(1, "GPU-b", "NVIDIA H200", memory, sm_count=132, cpu_cores=8),
    ]
    assert nvml.initialised == 0, "NVML is shut down again"
