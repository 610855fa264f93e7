"""Every query of the Grafana dashboard (k8s/grafana/fast-gshare.json) run against a real
Prometheus scraping a provider with GPU-shared and plain functions under traffic: none may
fail, none may name a metric nobody exports, and those of fast-gshare's own metrics find data."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from faas_provider.api.app import create_app
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.readings import GpuReader
from faas_provider.node.agent import NodeAgent
from faas_provider.settings import Settings
from tests.conftest import ECHO, REPO, faas_cli_deploy, wait_available
from tests.fake_nvml import FakeNvml, replica_processes
from tests.prom import prometheus

DASHBOARD = REPO / "k8s" / "grafana" / "fast-gshare.json"
# exported by the stock gateway, which this test does not run (DESIGN: the gateway's metrics)
GATEWAY_METRICS = {"gateway_function_invocation_total", "gateway_service_count"}
METRIC_NAME = re.compile(r"\b(?:fast_gshare|provider|gateway)_[a-z0-9_]+")
# a GPU with the stand-in MPS control daemon of tests/fixtures, so MPS panels have data
GPU = GpuDevice(0, "GPU-fake-0", "fake", 16 * 1024**3)
FAKE_MPS = str(Path(__file__).parent / "fixtures" / "fake-mps-control")


def queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target, Grafana's variables given values."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "10s")
            expr = expr.replace("$gpu", ".*").replace("$function", ".*")
            found.append((panel["title"], expr))
    return found


async def test_every_panel_query_runs_and_names_only_exported_metrics(
    aiohttp_client: Any, settings: Settings, functions_root: Path, tmp_path: Path
) -> None:
    nvml = FakeNvml({GPU.uuid: 55}, replica_processes)  # so the NVML panels have data
    reader = GpuReader(nvml)
    backend = LocalBackend(
        settings.local.state_dir,
        functions_root,
        node=NodeAgent([GPU], window_s=0.1, mps_binary=FAKE_MPS, reader=reader),
    )
    client = await aiohttp_client(create_app(backend, settings))
    async with prometheus(tmp_path, [f"127.0.0.1:{client.server.port}"]) as server:
        share = {"fastgshare/gpu_sm_partition": "40", "fastgshare/gpu_mem": "1Gi"}
        shared = {**ECHO, "service": "shared", "annotations": share}
        failing = {**ECHO, "service": "failing", "envProcess": "false"}  # exits 1: a 500
        for body in (ECHO, shared, failing):
            assert await faas_cli_deploy(client, body) == 202
            await wait_available(client, body["service"])
        for _ in range(3):  # traffic over a few scrapes, an error among it
            for name in ("echo", "shared", "echo", "shared"):
                assert (await client.post(f"/function/{name}", data=b"x")).status == 200
            assert (await client.post("/function/failing", data=b"x")).status == 500
            await asyncio.sleep(0.6)
        exported = set(METRIC_NAME.findall(await (await client.get("/metrics")).text()))
        await asyncio.sleep(1.0)
        assert queries(), "the dashboard has panels"
        for title, expr in queries():
            names = set(METRIC_NAME.findall(expr))
            unknown = {n for n in names if n not in exported and n not in GATEWAY_METRICS}
            unknown = {n for n in unknown if not any(e.startswith(n) for e in exported)}
            assert not unknown, f"{title}: {unknown} exported by nobody"
            result = await server.query(expr)  # fails the test on a query Prometheus refuses
            if names and not names & GATEWAY_METRICS:
                assert result, f"{title}: no data for {expr}"
