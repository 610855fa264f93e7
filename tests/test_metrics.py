"""The provider's /metrics as a real Prometheus sees it (tests/prom.py): known traffic is sent,
and the values are read back through Prometheus' query API, as a dashboard reads them; and the
latency histogram as the autoscaler reads it, every worker's calls summed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from faas_provider.api.app import create_app
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.readings import GpuReader
from faas_provider.metrics import ProviderMetrics
from faas_provider.node.agent import NodeAgent
from faas_provider.settings import Settings
from tests.conftest import ECHO, faas_cli_deploy, wait_available
from tests.fake_nvml import FakeNvml, replica_processes
from tests.prom import prometheus

VIRTUAL = GpuDevice(
    index=0, uuid="virtual-0", name="virtual", memory_bytes=16 * 1024**3, virtual=True
)

ECHO_NAME = 'function_name="echo.openfaas-fn"'
# a GPU with the stand-in MPS control daemon of tests/fixtures
GPU = GpuDevice(0, "GPU-fake-0", "fake", 16 * 1024**3)
FAKE_MPS = str(Path(__file__).parent / "fixtures" / "fake-mps-control")
MIB, GIB = 1024**2, 1024**3


async def test_invocations_are_counted_per_function_and_code_in_prometheus(
    client: TestClient, tmp_path: Path
) -> None:
    async with prometheus(tmp_path, [f"127.0.0.1:{client.server.port}"]) as server:
        assert await faas_cli_deploy(client, ECHO) == 202
        await wait_available(client, "echo")
        for path in ["/function/echo"] * 7 + ["/function/echo.openfaas-fn/sub?x=1"] * 2:
            assert (await client.post(path, data=b"x")).status == 200
        for _ in range(3):
            assert (await client.post("/function/nobody", data=b"x")).status == 404
        await client.post("/system/scale-function/echo", json={"replicas": 0})
        await wait_available(client, "echo", 0)
        assert (await client.post("/function/echo", data=b"x")).status == 503

        total = f"fast_gshare_function_invocations_total{{{ECHO_NAME}"
        assert await server.settled(f'{total},code="200"}}', 9) == 9
        assert await server.settled(f'{total},code="503"}}', 1) == 1
        count = f"fast_gshare_function_invocation_duration_seconds_count{{{ECHO_NAME}}}"
        assert await server.settled(count, 10) == 10
        nobody = 'fast_gshare_function_invocations_total{function_name=~"nobody.*"}'
        assert await server.query(nobody) == [], "a name nobody deployed is no function"
        proxied = 'provider_http_requests_total{path="/function/{service}",code="404"}'
        assert await server.settled(proxied, 3) == 3, "the proxy's routes are counted too"
        deploys = 'sum(provider_http_requests_total{path="/system/functions",method="PUT"})'
        assert await server.value(deploys) >= 1
        latency = (
            "histogram_quantile(0.99, sum by (le) ("
            f"fast_gshare_function_invocation_duration_seconds_bucket{{{ECHO_NAME}}}))"
        )
        assert 0 < await server.value(latency) < 30, "p99 latency is answerable from the buckets"


def test_the_autoscaler_reads_every_workers_calls_by_how_long_they_took() -> None:
    provider, worker = ProviderMetrics(), ProviderMetrics("/function/")
    for seconds in (0.004, 0.004, 0.04, 0.06):
        provider.invoked("steer", "openfaas-fn", 200, seconds)
    worker.invoked("steer", "openfaas-fn", 200, 0.3)
    worker.invoked("echo", "openfaas-fn", 200, 0.001)
    provider.report("1234", worker.exposition().decode())
    latencies = provider.latencies()
    steer = latencies["steer.openfaas-fn"]
    assert (steer[0.005], steer[0.05], steer[0.075], steer[0.3], steer[math.inf]) == (2, 3, 4, 5, 5)
    assert latencies["echo.openfaas-fn"][0.005] == 1


async def test_replicas_desired_available_and_pending_per_function(
    aiohttp_client: Any, settings: Settings, functions_root: Path, tmp_path: Path
) -> None:
    backend = LocalBackend(
        settings.local.state_dir, functions_root, node=NodeAgent([VIRTUAL], window_s=0.1)
    )
    client = await aiohttp_client(create_app(backend, settings))
    async with prometheus(tmp_path, [f"127.0.0.1:{client.server.port}"]) as server:
        shared = {**ECHO, "annotations": {"fastgshare/gpu_sm_partition": "60"}}
        assert await faas_cli_deploy(client, {**shared, "service": "first"}) == 202
        await wait_available(client, "first")
        body = {**shared, "service": "second", "labels": {"com.openfaas.scale.min": "2"}}
        assert await faas_cli_deploy(client, body) == 202
        replicas = "fast_gshare_function_replicas{function_name=%r,state=%r}"
        for function, state, expected in (
            ("first.openfaas-fn", "desired", 1),
            ("first.openfaas-fn", "available", 1),
            ("first.openfaas-fn", "pending", 0),
            ("second.openfaas-fn", "desired", 2),
            ("second.openfaas-fn", "available", 0),
            ("second.openfaas-fn", "pending", 2),
        ):
            query = (replicas % (function, state)).replace("'", '"')
            assert await server.settled(query, expected) == expected, query
        (why,) = await server.query('fast_gshare_function_pending_info{function_name=~".*"}')
        assert why["metric"]["function_name"] == "second.openfaas-fn", "only it waits"
        assert why["metric"]["reason"] == (
            "GPU 0 has 40 of 100 SM-time left, the replica needs 60"
        ), "the room placement found against what one replica needs"


async def test_gpu_memory_and_utilisation_from_nvml_per_gpu_and_per_function(
    aiohttp_client: Any, settings: Settings, functions_root: Path, tmp_path: Path
) -> None:
    # The stand-in NVML lists every replica process (found by the variable the launch put in
    # its environment) as a compute process of the GPU holding 256 MiB.
    nvml = FakeNvml({GPU.uuid: 37}, replica_processes, process_bytes=256 * MIB)
    node = NodeAgent([GPU], window_s=0.1, mps_binary=FAKE_MPS, reader=GpuReader(nvml))
    backend = LocalBackend(settings.local.state_dir, functions_root, node=node)
    client = await aiohttp_client(create_app(backend, settings))
    async with prometheus(tmp_path, [f"127.0.0.1:{client.server.port}"]) as server:
        capped = {
            **ECHO,
            "service": "capped",
            "annotations": {"fastgshare/gpu_sm_partition": "40", "fastgshare/gpu_mem": "1Gi"},
            "labels": {"com.openfaas.scale.min": "2"},
        }
        for body, count in ((ECHO, 1), (capped, 2)):
            assert await faas_cli_deploy(client, body) == 202
            await wait_available(client, body["service"], count)
        where = '{function_name="capped.openfaas-fn",gpu="GPU-fake-0"}'
        used = f"fast_gshare_function_memory_used_bytes{where}"
        assert await server.settled(used, 2 * 256 * MIB) == 2 * 256 * MIB, "its two replicas"
        limit = f"fast_gshare_function_memory_limit_bytes{where}"
        assert await server.settled(limit, 2 * GIB) == 2 * GIB, "two caps of 1 GiB"
        utilisation = 'fast_gshare_gpu_utilization_ratio{gpu="GPU-fake-0"}'
        assert await server.settled(utilisation, 0.37) == 0.37
        gpu_used = await server.value('fast_gshare_gpu_memory_used_bytes{gpu="GPU-fake-0"}')
        assert gpu_used >= 64 * MIB + 2 * 256 * MIB
        plain = await server.query(f"fast_gshare_function_memory_used_bytes{{{ECHO_NAME}}}")
        assert plain == [], "a plain function's processes are no GPU's"
        queued = await server.value(f"fast_gshare_function_queued_requests{where}")
        assert queued == 0, "nothing waits at an idle function's gates"
