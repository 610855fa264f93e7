"""GPU sharing through the whole local path on a virtual GPU (CI has none): annotations,
placement with pending and release, and time shares enforced by the gates, with a measured
sleep standing in for each request's GPU work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from faas_provider.api.app import create_app
from faas_provider.backends.local import replica as replica_module
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.node.agent import NodeAgent
from faas_provider.settings import Settings
from tests.conftest import ECHO, STEER, faas_cli_deploy, wait_available, wait_logged

WORK_S = 0.01
SLEEPY = (
    f"import time\n\n\ndef handle(event, context):\n    time.sleep({WORK_S})\n    return 'ok'\n"
)
SM = "fastgshare/gpu_sm_partition"
VIRTUAL = GpuDevice(
    index=0, uuid="virtual-0", name="virtual", memory_bytes=16 * 1024**3, virtual=True
)


@pytest.fixture
async def gpu_client(aiohttp_client: Any, settings: Settings, functions_root: Path) -> TestClient:
    (functions_root / "sleepy").mkdir()
    (functions_root / "sleepy" / "handler.py").write_text(SLEEPY)
    backend = LocalBackend(
        settings.local.state_dir, functions_root, node=NodeAgent([VIRTUAL], window_s=0.1)
    )
    return await aiohttp_client(create_app(backend, settings))


def shared(name: str, **annotations: str) -> dict[str, Any]:
    keys = {k: f"fastgshare/gpu_{k}" for k in ("sm_partition", "quota_request", "quota_limit")}
    keys["mem"] = "fastgshare/gpu_mem"
    return {
        "service": name,
        "image": "example/sleepy:1",
        "annotations": {keys[k]: v for k, v in annotations.items()},
    }


@pytest.mark.parametrize(
    ("annotations", "fragment"),
    [
        ({"fastgshare/gpu_sm_partition": "0"}, "fastgshare/gpu_sm_partition"),
        ({"fastgshare/gpu_sm_partition": "half"}, "fastgshare/gpu_sm_partition"),
        ({"fastgshare/gpu_quota_limit": "1.5"}, "fastgshare/gpu_quota_limit"),
        (
            {"fastgshare/gpu_quota_request": "0.8", "fastgshare/gpu_quota_limit": "0.5"},
            "fastgshare/gpu_quota_limit",
        ),
        ({"fastgshare/gpu_quota_request": "-1"}, "fastgshare/gpu_quota_request"),
        ({"fastgshare/gpu_mem": "lots"}, "fastgshare/gpu_mem"),
        ({"fastgshare/gpu_mem": "64Gi"}, "fastgshare/gpu_mem"),  # more than any GPU here
        # a misspelt key would deploy a plain function: refused, naming the known keys
        ({"fastgshare/gpu_sm_partiton": "50"}, "fastgshare/gpu_sm_partition"),
        ({"fastgshare/gpu_sm_partiton": "50"}, "fastgshare/gpu_sm_partiton"),
    ],
)
async def test_bad_sharing_requests_are_refused_naming_the_annotation(
    gpu_client: TestClient, annotations: dict[str, str], fragment: str
) -> None:
    body = {**STEER, "annotations": annotations}
    response = await gpu_client.post("/system/functions", json=body)
    assert response.status == 400
    assert fragment in await response.text()
    assert await (await gpu_client.get("/system/functions")).json() == []


async def test_whole_gpu_limit_must_be_one_and_not_mixed_with_sharing(
    gpu_client: TestClient,
) -> None:
    two = {**STEER, "limits": {"nvidia.com/gpu": "2"}}
    assert (await gpu_client.post("/system/functions", json=two)).status == 400
    mixed = {
        **two,
        "limits": {"nvidia.com/gpu": "1"},
        "annotations": shared("x", sm_partition="50")["annotations"],
    }
    response = await gpu_client.post("/system/functions", json=mixed)
    assert response.status == 400
    assert "nvidia.com/gpu" in await response.text()


async def test_a_replica_that_fits_nowhere_waits_and_starts_when_room_frees(
    gpu_client: TestClient,
) -> None:
    assert await faas_cli_deploy(gpu_client, shared("first", sm_partition="60")) == 202
    await wait_available(gpu_client, "first")
    assert await faas_cli_deploy(gpu_client, shared("second", sm_partition="60")) == 202
    await asyncio.sleep(0.5)
    status = await (await gpu_client.get("/system/function/second")).json()
    assert (status["replicas"], status["availableReplicas"]) == (1, 0), "60 + 60 > 100: pending"
    logs = await wait_logged(gpu_client, "second", "pending: GPU 0 has 40 of 100 SM-time left")
    assert len(logs.splitlines()) == 1, "a pending replica has not started; said so once"
    deleted = await gpu_client.delete("/system/functions", json={"functionName": "first"})
    assert deleted.status == 202
    await wait_available(gpu_client, "second")
    assert await (await gpu_client.post("/function/second", data=b"")).text() == "ok"


async def test_a_call_to_a_pending_function_says_why_it_waits(
    aiohttp_client: Any, settings: Settings, functions_root: Path
) -> None:
    (functions_root / "sleepy").mkdir()
    (functions_root / "sleepy" / "handler.py").write_text(SLEEPY)
    gpus = NodeAgent([VIRTUAL], window_s=0.1)
    backend = LocalBackend(settings.local.state_dir, functions_root, startup_wait_s=0.5, node=gpus)
    client = await aiohttp_client(create_app(backend, settings))
    assert await faas_cli_deploy(client, shared("first", sm_partition="70")) == 202
    await wait_available(client, "first")
    assert await faas_cli_deploy(client, shared("second", sm_partition="70")) == 202
    response = await client.post("/function/second", data=b"")
    assert response.status == 503
    assert "1 pending, GPU 0 has 30 of 100 SM-time left" in await response.text()


async def test_scaling_down_drops_pending_replicas_first(gpu_client: TestClient) -> None:
    assert await faas_cli_deploy(gpu_client, shared("wide", sm_partition="40")) == 202
    await gpu_client.post("/system/scale-function/wide", json={"replicas": 3})  # 40 x 3 > 100
    status = await wait_available(gpu_client, "wide", 2)
    assert status["replicas"] == 3
    await gpu_client.post("/system/scale-function/wide", json={"replicas": 2})
    await asyncio.sleep(0.3)
    status = await (await gpu_client.get("/system/function/wide")).json()
    assert (status["replicas"], status["availableReplicas"]) == (2, 2)


async def test_plain_functions_need_no_gpu_room(gpu_client: TestClient) -> None:
    assert await faas_cli_deploy(gpu_client, shared("hog", sm_partition="100")) == 202
    assert await faas_cli_deploy(gpu_client, ECHO) == 202
    await wait_available(gpu_client, "hog")
    await wait_available(gpu_client, "echo")


async def _drive(client: TestClient, name: str, seconds: float) -> int:
    """One closed-loop caller: how many requests it completed in `seconds`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0
    while loop.time() < end:
        response = await client.post(f"/function/{name}", data=b"")
        assert response.status == 200, await response.text()
        await response.read()
        done += 1
    return done


async def _shares(client: TestClient, functions: dict[str, dict[str, str]]) -> dict[str, float]:
    for name, wanted in functions.items():
        assert await faas_cli_deploy(client, shared(name, **wanted)) == 202
    for name in functions:
        await wait_available(client, name)
    seconds = 4.0
    counts = await asyncio.gather(*(_drive(client, name, seconds) for name in functions))
    return {name: count * WORK_S / seconds for name, count in zip(functions, counts, strict=True)}


async def test_limits_split_gpu_time(gpu_client: TestClient) -> None:
    shares = await _shares(
        gpu_client,
        {
            "low": {"sm_partition": "100", "quota_limit": "0.3"},
            "high": {"sm_partition": "100", "quota_limit": "0.7"},
        },
    )
    total = sum(shares.values())
    assert shares["low"] / total == pytest.approx(0.3, abs=0.05), shares
    assert shares["high"] / total == pytest.approx(0.7, abs=0.05), shares


async def test_a_guaranteed_request_holds_against_greedy_neighbours(
    gpu_client: TestClient,
) -> None:
    functions = {"kept": {"sm_partition": "100", "quota_request": "0.5", "quota_limit": "1"}}
    for index in range(3):
        functions[f"greedy{index}"] = {
            "sm_partition": "100",
            "quota_request": "0.1",
            "quota_limit": "1",
        }
    shares = await _shares(gpu_client, functions)
    assert shares["kept"] / sum(shares.values()) >= 0.45, shares


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _gate_pid(client: str) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"faas_provider.gate" in command and client.encode() in command:
            return int(pid)
    raise AssertionError(f"no gate process for {client}")


async def test_an_answer_through_the_provider_tells_its_wait_at_the_gate(
    gpu_client: TestClient,
) -> None:
    assert await faas_cli_deploy(gpu_client, shared("timed", sm_partition="50")) == 202
    await wait_available(gpu_client, "timed")
    answer = await gpu_client.post("/function/timed", data=b"")
    assert answer.status == 200
    name, duration = answer.headers["Server-Timing"].split(";dur=")
    assert name == "gate-wait" and 0 <= float(duration) < 1000


async def test_a_killed_gate_is_restarted_with_its_replica(gpu_client: TestClient) -> None:
    assert await faas_cli_deploy(gpu_client, shared("guarded", sm_partition="50")) == 202
    await wait_available(gpu_client, "guarded")
    endpoints = await (await gpu_client.get("/system/endpoints/guarded")).json()
    port = int(endpoints["urls"][0].rsplit(":", 1)[1])
    os.kill(_gate_pid("guarded"), signal.SIGKILL)
    await wait_logged(gpu_client, "guarded", "restarting")
    await wait_available(gpu_client, "guarded")
    again = await (await gpu_client.get("/system/endpoints/guarded")).json()
    assert int(again["urls"][0].rsplit(":", 1)[1]) != port
    assert await (await gpu_client.post("/function/guarded", data=b"")).text() == "ok"


async def on_fake_gpus(
    aiohttp_client: Any, settings: Settings, functions_root: Path, count: int
) -> tuple[TestClient, NodeAgent]:
    """The provider on `count` pretend real GPUs, each with the stand-in MPS control binary."""
    devices = [
        GpuDevice(
            index=i, uuid=f"GPU-fake-{i}", name="fake", memory_bytes=16 * 1024**3, cpu_cores=8
        )
        for i in range(count)
    ]
    fake = str(Path(__file__).parent / "fixtures" / "fake-mps-control")
    pool = NodeAgent(devices, mps_binary=fake)
    backend = LocalBackend(settings.local.state_dir, functions_root, node=pool)
    return await aiohttp_client(create_app(backend, settings)), pool


Call = tuple[float, int, Any]  # seconds it took, status, the pid that answered (or None)
# replicas that take 0.6 s to load their model, so that a call made while one is replaced
# shows by how long it waited
LOADING = {"LOAD_S": "0.6"}


@contextlib.asynccontextmanager
async def calling(client: TestClient, bodies: dict[str, bytes]) -> AsyncIterator[dict[str, list]]:
    """One caller a function (name -> body), calling without pause for the block's duration;
    yields each function's calls (`Call`s) as they are made."""
    record: dict[str, list[Call]] = {name: [] for name in bodies}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def caller(name: str) -> None:
        while not stop.is_set():
            began = loop.time()
            response = await client.post(f"/function/{name}", data=bodies[name])
            text = await response.text()
            pid = json.loads(text)["pid"] if text.startswith("{") else None
            record[name].append((loop.time() - began, response.status, pid))

    callers = [asyncio.create_task(caller(name)) for name in bodies]
    try:
        yield record
    finally:
        stop.set()
        await asyncio.gather(*callers)


async def answered_by_another(
    calls: list[Call], pid: int, since: int = 0, timeout_s: float = 20.0
) -> None:
    """Wait until a call in `calls` (from index `since` on) is answered by a process other
    than `pid`."""
    for _ in range(int(timeout_s / 0.05)):
        if any(status == 200 and who != pid for _, status, who in calls[since:]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no call was answered by a new replica: {calls[-5:]}")


async def one_replica_a_gpu(client: TestClient) -> tuple[str, str, dict[str, int]]:
    """Two GPU functions, one on each fake GPU: (the one on GPU 0, the other, their pids)."""
    big = {"fastgshare/gpu_sm_partition": "60"}  # two of them do not fit on one GPU
    names = ("first", "second")
    for name in names:
        steer = {**STEER, "service": name, "annotations": big, "envVars": LOADING}
        assert await faas_cli_deploy(client, steer) == 202
    for name in names:
        await wait_available(client, name)
    pids = {}
    for name in names:
        pids[name] = (await (await client.post(f"/function/{name}", data=b"")).json())["pid"]
    gpus = {name: _environment(pid)["CUDA_VISIBLE_DEVICES"] for name, pid in pids.items()}
    assert sorted(gpus.values()) == ["GPU-fake-0", "GPU-fake-1"]
    (on_gpu0,) = (name for name, gpu in gpus.items() if gpu == "GPU-fake-0")
    (other,) = set(names) - {on_gpu0}
    return on_gpu0, other, pids


def assert_recovered(calls: list[Call], pid: int) -> None:
    """Every call succeeded, and the first one a new replica answered waited for it (it was
    made before the new replica was up)."""
    assert [status for _, status, _ in calls] == [200] * len(calls), calls
    waited, _, _ = next(call for call in calls if call[2] != pid)
    assert waited > 0.5, f"the first call after the recycle took {waited:.2f} s"


def assert_untouched(calls: list[Call], pid: int | None) -> None:
    """Many calls, each answered 200 by the same process."""
    assert len(calls) > 10
    assert {(status, who) for _, status, who in calls} == {(200, pid)}


async def test_a_replica_runs_its_gpu_shares_part_of_the_cores_unless_it_says(
    aiohttp_client: Any, settings: Settings, functions_root: Path
) -> None:
    """8 cores a GPU: a replica at 50% SMs x quota 0.5 gets a quarter of them as torch threads;
    a function that sets OMP_NUM_THREADS keeps its own."""
    client, _ = await on_fake_gpus(aiohttp_client, settings, functions_root, 2)
    quarter = {"fastgshare/gpu_sm_partition": "50", "fastgshare/gpu_quota_request": "0.5"}
    own = {"OMP_NUM_THREADS": "3"}
    deployments = {
        "sized": {**STEER, "service": "sized", "annotations": quarter},
        "own": {**STEER, "service": "own", "annotations": quarter, "envVars": own},
    }
    for deployment in deployments.values():
        assert await faas_cli_deploy(client, deployment) == 202
    threads = {}
    for name in deployments:
        await wait_available(client, name)
        pid = (await (await client.post(f"/function/{name}", data=b"")).json())["pid"]
        threads[name] = _environment(pid)["OMP_NUM_THREADS"]
    assert threads == {"sized": "2", "own": "3"}


async def test_an_mps_fault_recycles_that_gpus_replicas_and_loses_no_other_request(
    aiohttp_client: Any, settings: Settings, functions_root: Path
) -> None:
    """With the stand-in MPS control binary on a (pretend) real GPU: the server reports a
    fatal fault, the replica on that GPU is replaced, a plain function answers throughout."""
    client, pool = await on_fake_gpus(aiohttp_client, settings, functions_root, 1)
    annotations = {"fastgshare/gpu_sm_partition": "50", "fastgshare/gpu_mem": "1.5Gi"}
    steer = {**STEER, "annotations": annotations, "envVars": LOADING}
    assert await faas_cli_deploy(client, steer) == 202
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "steer")
    await wait_available(client, "echo")
    before = (await (await client.post("/function/steer", data=b"")).json())["pid"]
    daemon = pool.daemon(0)
    assert daemon is not None
    environment = _environment(before)
    assert environment["CUDA_VISIBLE_DEVICES"] == "GPU-fake-0"
    assert environment["CUDA_MPS_PIPE_DIRECTORY"] == str(daemon.pipe_dir)
    assert environment["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert environment["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=1536M"

    await daemon.command("start_server -uid 0")
    async with calling(client, {"steer": b"", "echo": b"x"}) as calls:
        await daemon.command("fake_fault")
        await answered_by_another(calls["steer"], before)
    assert_recovered(calls["steer"], before)
    assert_untouched(calls["echo"], None)
    logs = await (await client.get("/system/logs?name=steer")).text()
    assert "restarting" in logs
    metrics = await (await client.get("/metrics")).text()
    where = (("gpu", "GPU-fake-0"), ("node", socket.gethostname()))
    seen = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    assert seen[("fast_gshare_mps_server_losses_total", where)] == 1
    assert seen[("fast_gshare_mps_daemon_up", where)] == 1
    assert seen[("fast_gshare_gpu_footprint_allocated_ratio", where)] == 0.5
    assert seen[("fast_gshare_gpu_memory_allocated_bytes", where)] == 1.5 * 1024**3
    assert seen[("fast_gshare_gpu_memory_total_bytes", where)] == 16 * 1024**3
    steer_labels = (("function_name", "steer.openfaas-fn"), ("reason", "recycled"))
    assert seen[("fast_gshare_function_restarts_total", steer_labels)] == 1


async def test_an_mps_fault_on_one_gpu_leaves_another_gpus_replicas_serving(
    aiohttp_client: Any, settings: Settings, functions_root: Path
) -> None:
    client, pool = await on_fake_gpus(aiohttp_client, settings, functions_root, 2)
    faulty, other, pids = await one_replica_a_gpu(client)
    daemon = pool.daemon(0)
    assert daemon is not None

    await daemon.command("start_server -uid 0")
    async with calling(client, {faulty: b"", other: b""}) as calls:
        await daemon.command("fake_fault")
        await answered_by_another(calls[faulty], pids[faulty])
    assert_recovered(calls[faulty], pids[faulty])
    assert_untouched(calls[other], pids[other])


async def test_a_gpu_recycled_again_and_again_restarts_its_replica_at_once_losing_no_call(
    aiohttp_client: Any,
    settings: Settings,
    functions_root: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A recycle is asked for, not a crash: the replica starts again without a backoff that
    grows, and its gate ends before its runtime, so no call let in meets a runtime gone."""
    caplog.set_level(logging.INFO, logger="fast_gshare.replica")
    client, pool = await on_fake_gpus(aiohttp_client, settings, functions_root, 1)
    assert await faas_cli_deploy(client, {**STEER, "annotations": {SM: "50"}}) == 202
    await wait_available(client, "steer")
    daemon = pool.daemon(0)
    assert daemon is not None
    await daemon.command("start_server -uid 0")
    async with calling(client, {"steer": b""}) as calls:
        await asyncio.sleep(0.2)
        for _ in range(3):
            since = len(calls["steer"])
            await daemon.command("fake_fault")
            await answered_by_another(calls["steer"], calls["steer"][since - 1][2], since)
    assert [status for _, status, _ in calls["steer"]] == [200] * len(calls["steer"])
    assert caplog.text.count("replica steer-0 recycled; starting it again") == 3
    assert "restarting in" not in caplog.text


@pytest.mark.parametrize("killed", ["daemon and server", "server"])
async def test_a_lost_mps_server_recycles_the_replicas_of_its_gpu_alone(
    aiohttp_client: Any,
    settings: Settings,
    functions_root: Path,
    caplog: pytest.LogCaptureFixture,
    killed: str,
) -> None:
    """SIGKILL of GPU 0's MPS control daemon and its server, or of the server alone: the
    replica on GPU 0 is replaced once the daemon answers again, calls made meanwhile wait for
    it; GPU 1's replica and a plain function answer every call, the same processes throughout."""
    caplog.set_level(logging.WARNING, logger="fast_gshare.local")
    client, pool = await on_fake_gpus(aiohttp_client, settings, functions_root, 2)
    victim, other, pids = await one_replica_a_gpu(client)
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "echo")
    daemon = pool.daemon(0)
    assert daemon is not None
    await daemon.command("start_server -uid 0")  # on a GPU, the replica's first CUDA call does
    [server] = await daemon.server_pids() or []
    old = daemon.pid()
    assert old is not None

    async with calling(client, {victim: b"", other: b"", "echo": b"x"}) as calls:
        await asyncio.sleep(0.2)
        if killed == "daemon and server":
            os.kill(old, signal.SIGKILL)
        os.kill(server, signal.SIGKILL)
        await answered_by_another(calls[victim], pids[victim])
        await asyncio.sleep(0.2)
    assert_recovered(calls[victim], pids[victim])
    assert_untouched(calls[other], pids[other])
    assert_untouched(calls["echo"], None)
    assert await daemon.healthy()
    if killed == "server":
        assert daemon.pid() == old, "a daemon that lives on is not restarted"
        what = f"server {server} ended"
    else:
        assert daemon.pid() != old
        what = f"control daemon {old} exited; server {server} ended"
    line = f"MPS clients of GPU 0 lost their server ({what}); recycling 1 replica(s): {victim}-0"
    assert caplog.text.count("lost their server") == 1
    assert line in caplog.text


async def test_a_gpu_whose_mps_daemon_will_not_start_still_serves_by_time(
    aiohttp_client: Any, settings: Settings, functions_root: Path
) -> None:
    device = GpuDevice(index=0, uuid="GPU-fake-0", name="fake", memory_bytes=16 * 1024**3)
    pool = NodeAgent([device], mps_binary="false")  # exits 1: the daemon never starts
    backend = LocalBackend(settings.local.state_dir, functions_root, node=pool)
    client = await aiohttp_client(create_app(backend, settings))
    assert pool.daemon(0) is None
    on_gpu = {**STEER, "annotations": {"fastgshare/gpu_sm_partition": "50"}}
    assert await faas_cli_deploy(client, on_gpu) == 202
    await wait_available(client, "steer")
    assert (await client.post("/function/steer", data=b"")).status == 200


async def test_an_update_that_drops_the_gpu_gives_its_room_back(gpu_client: TestClient) -> None:
    assert await faas_cli_deploy(gpu_client, shared("mover", sm_partition="80")) == 202
    await wait_available(gpu_client, "mover")
    assert await faas_cli_deploy(gpu_client, shared("waiter", sm_partition="80")) == 202
    await asyncio.sleep(0.3)
    assert (await (await gpu_client.get("/system/function/waiter")).json())[
        "availableReplicas"
    ] == 0
    plain = {"service": "mover", "image": "example/sleepy:1"}  # no annotations: no GPU now
    assert await faas_cli_deploy(gpu_client, plain) == 202
    await wait_available(gpu_client, "waiter")
    await wait_available(gpu_client, "mover")


LOSES_ITS_GPU = """
import os


def handle(event, context):
    if event.body == b"lose":
        raise RuntimeError(
            "CUDA error: the remote procedural call between the MPS server and the MPS client "
            "failed\\nCUDA kernel errors might be asynchronously reported at some other API call"
        )
    return {"statusCode": 200, "body": {"pid": os.getpid()}}
"""


async def test_a_replica_whose_handler_lost_its_gpu_is_not_ready_and_is_replaced(
    gpu_client: TestClient,
    functions_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No MPS daemon sees it (a virtual GPU has none): the handler's own error says the GPU
    context is lost. The replica's gate says so at /_/health, the function is not available
    until a new replica is, and the provider replaces the replica."""
    monkeypatch.setattr(replica_module, "HEALTH_INTERVAL_S", 0.5)
    caplog.set_level(logging.WARNING, logger="fast_gshare.replica")
    (functions_root / "loses").mkdir()
    (functions_root / "loses" / "handler.py").write_text(LOSES_ITS_GPU)
    deployment = {**shared("loses", sm_partition="50"), "image": "example/loses:1"}
    assert await faas_cli_deploy(gpu_client, deployment) == 202
    await wait_available(gpu_client, "loses")
    before = (await (await gpu_client.post("/function/loses", data=b"")).json())["pid"]
    [gate] = (await (await gpu_client.get("/system/endpoints/loses")).json())["urls"]

    assert (await gpu_client.post("/function/loses", data=b"lose")).status == 500
    async with aiohttp.ClientSession() as session, session.get(f"{gate}/_/health") as health:
        assert health.status == 503
        assert "GPU context lost: RuntimeError: CUDA error: the remote procedural" in (
            await health.text()
        )
    await wait_available(gpu_client, "loses", 0)
    status = await wait_available(gpu_client, "loses", 1)
    assert status["replicas"] == 1
    answer = await gpu_client.post("/function/loses", data=b"")
    assert answer.status == 200 and (await answer.json())["pid"] != before
    assert "replica loses-0 failed 3 health checks in a row (503 GPU context lost" in caplog.text
