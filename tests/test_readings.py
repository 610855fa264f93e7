"""The GPU readings through a stand-in NVML (tests/fake_nvml.py), with real processes: each
process's memory counts for the function its environment names, others count for the GPU alone,
and without NVML there are no readings and no errors."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from faas_provider.gpu.readings import GpuReader, function_env
from tests.fake_nvml import FakeNvml

MIB = 1024**2


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Four sleeping processes: two of function a, one of b, one of none."""
    started = []
    for env in (function_env("a.fn"), function_env("a.fn"), function_env("b.fn"), {}):
        environment = {k: v for k, v in os.environ.items() if k != "FAST_GSHARE_FUNCTION"}
        started.append(subprocess.Popen(["sleep", "60"], env={**environment, **env}))
    yield started
    for process in started:
        process.kill()
        process.wait()


def test_each_processs_memory_counts_for_the_function_its_environment_names(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    pids = [process.pid for process in sleepers] + [gone.pid]
    nvml = FakeNvml({"GPU-a": 42}, lambda: pids, process_bytes=100 * MIB, base_bytes=10 * MIB)
    reader = GpuReader(nvml)
    (reading,) = reader.read(["GPU-a", "virtual-0"])  # NVML knows no virtual GPU
    assert reading.uuid == "GPU-a"
    assert reading.utilization_ratio == pytest.approx(0.42)
    assert reading.memory_used_bytes == 10 * MIB + 5 * 100 * MIB, "NVML's v2: nvidia-smi's"
    assert reading.memory_by_function == {"a.fn": 200 * MIB, "b.fn": 100 * MIB}
    reader.close()
    assert nvml.initialised == 0, "NVML is let go"


def test_a_process_whose_memory_nvml_cannot_say_counts_for_none() -> None:
    process = subprocess.Popen(["sleep", "60"], env={**os.environ, **function_env("a.fn")})
    try:
        nvml = FakeNvml({"GPU-a": 0}, lambda: [process.pid])
        unknown = nvml.nvmlDeviceGetComputeRunningProcesses

        def not_available(handle: str) -> list[Any]:
            listed = unknown(handle)
            for entry in listed:
                entry.usedGpuMemory = None  # pynvml's NVML_VALUE_NOT_AVAILABLE
            return listed

        nvml.nvmlDeviceGetComputeRunningProcesses = not_available  # type: ignore[method-assign]
        (reading,) = GpuReader(nvml).read(["GPU-a"])
        assert reading.memory_by_function == {}
    finally:
        process.kill()
        process.wait()


def test_without_nvml_there_are_no_readings(caplog: pytest.LogCaptureFixture) -> None:
    class Absent:
        class NVMLError(Exception):
            pass

        def nvmlInit(self) -> None:
            raise self.NVMLError("NVML Shared Library Not Found")

    reader = GpuReader(Absent())
    with caplog.at_level(logging.INFO, logger="fast_gshare.gpu"):
        assert reader.read(["GPU-a"]) == []
        assert reader.read(["GPU-a"]) == []
    assert [r.message for r in caplog.records if "NVML" in r.message] == [
        "no GPU readings: NVML unavailable (NVML Shared Library Not Found)"
    ], "said once"
