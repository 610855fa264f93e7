"""Time quotas through the whole local path when replicas run several requests at once.

A CPU stand-in plays a GPU at 100% SMs: every request of every function holds one exclusive
lock (fcntl.flock on a shared file) for a measured sleep, so the work of all replicas is
serialised as on a saturated card, however many requests each replica has in flight. Each
function is driven by four closed-loop callers; a function's share is its completed work (every
request is the same work) over all the work done. Where a replica's requests overlap instead
(plain sleeps on 4 threads, a device that runs them side by side), its share is the time at
least one of them ran, over all such time. Requests are long beside the HTTP path
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
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.node.agent import NodeAgent
from faas_provider.settings import Settings
from tests.conftest import faas_cli_deploy, wait_available
from tests.prom import prometheus

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

# handle(event, context) on 4 threads whose sleeps overlap, each logged: a device that runs a
# replica's requests side by side.
OVERLAPPING = f"""
import os
import time


def handle(event, context):
    began = time.monotonic()
    time.sleep({WORK_S})
    with open(os.environ["BUSY_LOG"], "a") as log:
        log.write(f"{{began}} {{time.monotonic()}}\\n")
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
    for name, source in (
        ("threaded", THREADED),
        ("overlapping", OVERLAPPING),
        ("batched", BATCHED),
    ):
        (functions_root / name).mkdir()
        (functions_root / name / "handler.py").write_text(source)
    backend = LocalBackend(
        settings.local.state_dir, functions_root, node=NodeAgent([VIRTUAL], window_s=WINDOW_S)
    )
    return await aiohttp_client(create_app(backend, settings))


def deployment(name: str, kind: str, lock: Path, request: float, limit: float) -> dict[str, Any]:
    """A function at 100% SMs of the stand-in GPU, run as `kind`: threaded, overlapping,
    batched or fprocess."""
    body: dict[str, Any] = {
        "service": name,
        "image": f"example/{'threaded' if kind == 'fprocess' else kind}:1",
        "envVars": {"GPU_LOCK": str(lock), "BUSY_LOG": str(busy_log(lock, name))},
        "annotations": {
            "fastgshare/gpu_sm_partition": "100",
            "fastgshare/gpu_quota_request": str(request),
            "fastgshare/gpu_quota_limit": str(limit),
        },
    }
    if kind == "fprocess":  # one child a request, as the classic watchdog forks it
        body["envProcess"] = f"flock {lock} sleep {WORK_S}"
    return body


def busy_log(lock: Path, name: str) -> Path:
    """Where the overlapping handler of function `name` logs when each of its requests ran."""
    return lock.with_name(f"{name}.busy")


def busy_time(log: Path, start: float, end: float) -> float:
    """The time within [start, end] that at least one of the requests in `log` ran."""
    ran = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    busy, reached = 0.0, start
    for began, ended in ran:
        began, ended = max(began, reached), min(ended, end)
        if ended > began:
            busy, reached = busy + ended - began, ended
    return busy


async def work_shares(
    client: TestClient, kind: str, lock: Path, quotas: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Deploy a function per (request, limit) of `quotas`, drive each with CALLERS closed-loop
    callers for MEASURED_S after a ramp, and give each function's share of the stand-in GPU:
    of the work done, or for `overlapping` of the time its requests ran."""
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
    used = {name: count * WORK_S for name, count in done.items()}
    if kind == "overlapping":
        used = {name: busy_time(busy_log(lock, name), start, end) for name in quotas}
    total = sum(used.values())
    # the stand-in GPU was contended (forking, fprocess keeps it busy least on 2 loaded cores)
    assert total >= 0.25 * MEASURED_S, f"the stand-in GPU sat idle: {used}"
    return {name: seconds / total for name, seconds in used.items()}


@pytest.mark.parametrize("kind", ["threaded", "overlapping", "batched", "fprocess"])
async def test_a_request_holds_against_neighbours_with_requests_in_flight(
    gpu_client: TestClient, tmp_path: Path, kind: str
) -> None:
    quotas = {"kept": (0.6, 1.0)} | {f"greedy{i}": (0.1, 1.0) for i in range(3)}
    shares = await work_shares(gpu_client, kind, tmp_path / "gpu.lock", quotas)
    assert shares["kept"] >= 0.55, shares


@pytest.mark.parametrize("kind", ["threaded", "overlapping", "batched", "fprocess"])
async def test_limits_hold_with_requests_in_flight(
    gpu_client: TestClient, tmp_path: Path, kind: str
) -> None:
    shares = await work_shares(
        gpu_client, kind, tmp_path / "gpu.lock", {"low": (0.3, 0.3), "high": (0.7, 0.7)}
    )
    assert shares["low"] == pytest.approx(0.3, abs=0.05), shares


async def test_prometheus_sees_the_gpu_time_shares_the_scheduler_enforced(
    gpu_client: TestClient, tmp_path: Path
) -> None:
    quotas = {"low": (0.3, 0.3), "high": (0.7, 0.7)}
    async with prometheus(tmp_path, [f"127.0.0.1:{gpu_client.server.port}"]) as server:
        shares = await work_shares(gpu_client, "threaded", tmp_path / "gpu.lock", quotas)
        await asyncio.sleep(1.5)  # scrapes after the last request, the cores idle again
        charged = {}
        for name in quotas:
            series = f'fast_gshare_gpu_time_seconds_total{{function_name="{name}.openfaas-fn"}}'
            charged[name] = await server.value(series)
        total = sum(charged.values())
        seen = {name: seconds / total for name, seconds in charged.items()}
        for name, (request, _) in quotas.items():
            assert seen[name] == pytest.approx(request, abs=0.06), (seen, shares)
            assert seen[name] == pytest.approx(shares[name], abs=0.06), "as the work done says"
            ratio = await server.value(
                f'fast_gshare_function_quota_request_ratio{{function_name="{name}.openfaas-fn"}}'
            )
            assert ratio == request
        sm = 'fast_gshare_function_sm_share_ratio{function_name="low.openfaas-fn"}'
        assert await server.value(sm) == 1.0
