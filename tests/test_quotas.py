"""Time quotas through the whole local path when replicas run several requests at once.

A CPU stand-in plays a GPU at 100% SMs: every request of every function holds one exclusive
lock (fcntl.flock on a shared file) for a measured sleep, so the work of all replicas is
serialised as on a saturated card, however many requests each replica has in flight. Each
function is driven by four closed-loop callers; a function's share is its completed work (every
request is the same work) over all the work done. Requests are long beside the HTTP path
(20 ms, in 200 ms windows), so that two loaded cores measure the quotas, not their own delays.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from faas_provider.api.app import create_app
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.backends.local.gpus import GpuPool
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.settings import Settings
from tests.conftest import faas_cli_deploy, wait_available

WORK_S = 0.02  # the stand-in GPU time of one request
CALLERS = 4  # closed-loop callers a function, as many as the runtime's default handler threads
MEASURED_S = 4.0
WINDOW_S = 0.2  # the scheduler's window: a 0.1 request is one request's work
VIRTUAL = GpuDevice(
    index=0, uuid="virtual-0", name="virtual", memory_bytes=16 * 1024**3, virtual=True
)

# handle(event, context) only: the runtime runs it on its 4 default threads.
THREADED = f"""
import fcntl
import os
import time


def handle(event, context):
    with open(os.environ["GPU_LOCK"], "a") as gpu:
        fcntl.flock(gpu, fcntl.LOCK_EX)
        time.sleep({WORK_S})
    return "ok"
"""

# handle_batch(events, context): one call a batch, each event the same work as above.
BATCHED = f"""
import fcntl
import os
import time


def handle_batch(events, context):
    with open(os.environ["GPU_LOCK"], "a") as gpu:
        fcntl.flock(gpu, fcntl.LOCK_EX)
        time.sleep({WORK_S} * len(events))
    return ["ok"] * len(events)
"""


@pytest.fixture
async def gpu_client(
    aiohttp_client: Any, settings: Settings, functions_root: Path, tmp_path: Path
) -> TestClient:
    for name, source in (("threaded", THREADED), ("batched", BATCHED)):
        (functions_root / name).mkdir()
        (functions_root / name / "handler.py").write_text(source)
    backend = LocalBackend(
        settings.state_dir, functions_root, gpus=GpuPool([VIRTUAL], window_s=WINDOW_S)
    )
    return await aiohttp_client(create_app(backend, settings))


def deployment(name: str, kind: str, lock: Path, request: float, limit: float) -> dict[str, Any]:
    """A function at 100% SMs of the stand-in GPU, run as `kind`: threaded, batched, fprocess."""
    body: dict[str, Any] = {
        "service": name,
        "image": f"example/{'threaded' if kind == 'fprocess' else kind}:1",
        "envVars": {"GPU_LOCK": str(lock)},
        "annotations": {
            "fastgshare/gpu_sm_partition": "100",
            "fastgshare/gpu_quota_request": str(request),
            "fastgshare/gpu_quota_limit": str(limit),
        },
    }
    if kind == "fprocess":  # one child a request, as the classic watchdog forks it
        body["envProcess"] = f"flock {lock} sleep {WORK_S}"
    return body


async def work_shares(
    client: TestClient, kind: str, lock: Path, quotas: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Deploy a function per (request, limit) of `quotas`, drive each with CALLERS closed-loop
    callers for MEASURED_S after a ramp, and give each function's share of the work done."""
    for name, (request, limit) in quotas.items():
        assert await faas_cli_deploy(client, deployment(name, kind, lock, request, limit)) == 202
    for name in quotas:
        await wait_available(client, name)
    loop = asyncio.get_running_loop()
    start = loop.time() + 1.0  # the gates' first windows, every caller under way
    end = start + MEASURED_S
    done = dict.fromkeys(quotas, 0)

    async def caller(name: str) -> None:
        while (began := loop.time()) < end:
            response = await client.post(f"/function/{name}", data=b"")
            assert response.status == 200, await response.text()
            await response.read()
            if began >= start:
                done[name] += 1

    await asyncio.gather(*(caller(name) for name in quotas for _ in range(CALLERS)))
    total = sum(done.values())
    # the stand-in GPU was contended (forking, fprocess keeps it busy least on 2 loaded cores)
    assert total * WORK_S >= 0.25 * MEASURED_S, f"the stand-in GPU sat idle: {done}"
    return {name: count / total for name, count in done.items()}


@pytest.mark.parametrize("kind", ["threaded", "batched", "fprocess"])
async def test_a_request_holds_against_neighbours_with_requests_in_flight(
    gpu_client: TestClient, tmp_path: Path, kind: str
) -> None:
    quotas = {"kept": (0.6, 1.0)} | {f"greedy{i}": (0.1, 1.0) for i in range(3)}
    shares = await work_shares(gpu_client, kind, tmp_path / "gpu.lock", quotas)
    assert shares["kept"] >= 0.55, shares


@pytest.mark.parametrize("kind", ["threaded", "batched", "fprocess"])
async def test_limits_hold_with_requests_in_flight(
    gpu_client: TestClient, tmp_path: Path, kind: str
) -> None:
    shares = await work_shares(
        gpu_client, kind, tmp_path / "gpu.lock", {"low": (0.3, 0.3), "high": (0.7, 0.7)}
    )
    assert shares["low"] == pytest.approx(0.3, abs=0.05), shares
