"""Fixtures: a real provider server on a free port, local backend, real replica processes."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from kubernetes_asyncio.client import ApiClient

from faas_provider.api.app import create_app
from faas_provider.backends.factory import create_backend
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.backends.local.settings import LocalSettings
from faas_provider.settings import Settings
from tests import kube

REPO = Path(__file__).resolve().parents[1]

# A handler whose behaviour the tests steer through the request body.
STEERABLE_HANDLER = textwrap.dedent(
    """
    import json
    import os
    import time

    calls = 0
    time.sleep(float(os.environ.get("LOAD_S", "0")))  # a model's load, where a test asks


    def handle(event, context):
        global calls
        calls += 1
        command = event.body.decode()
        if command == "crash":
            os.kill(os.getpid(), 9)
        if command.startswith("sleep "):
            time.sleep(float(command.split()[1]))
        if command.startswith("secret "):
            path = os.path.join(os.environ["secret_mount_path"], command.split()[1])
            mode = oct(os.stat(path).st_mode & 0o777)
            return {"statusCode": 200, "body": {"value": open(path).read(), "mode": mode}}
        if command.startswith("shout "):
            print("x" * int(command.split()[1]), flush=True)
        if command == "cookie":
            return {"statusCode": 200, "body": "", "headers": {"Set-Cookie": "session=abc"}}
        return {
            "statusCode": 200,
            "body": {
                "pid": os.getpid(),
                "calls": calls,
                "env": os.environ.get("GREETING"),
                "cookie": event.headers.get("Cookie"),
                "accept": event.headers.get("Accept"),
            },
        }
    """
)

Deploy = Callable[..., Awaitable[int]]


@pytest.fixture
def functions_root(tmp_path: Path) -> Path:
    """A functions root with the repository's samples and a steerable test handler."""
    root = tmp_path / "functions"
    root.mkdir()
    for sample in (REPO / "functions").iterdir():
        (root / sample.name).symlink_to(sample)
    (root / "steer").mkdir()
    (root / "steer" / "handler.py").write_text(STEERABLE_HANDLER)
    return root


@pytest.fixture
def settings(tmp_path: Path, functions_root: Path) -> Settings:
    local = LocalSettings(state_dir=tmp_path / "state", functions_dir=functions_root)
    return Settings(port=0, local=local, startup_wait_s=20)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> AsyncIterator[TestClient]:
    """A client of a real provider server whose backend runs real replica processes."""
    yield await aiohttp_client(create_app(local_backend(settings), settings))


def local_backend(settings: Settings) -> LocalBackend:
    """The local backend of `settings`."""
    local = settings.local
    return LocalBackend(local.state_dir, local.functions_dir, settings.startup_wait_s)


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kube.ApiServer]:
    """One real Kubernetes API server for the session (skips without KUBEBUILDER_ASSETS)."""
    with kube.api_server(tmp_path_factory.mktemp("envtest")) as server:
        yield server


@pytest.fixture
async def kube_admin(api_server: kube.ApiServer) -> AsyncIterator[ApiClient]:
    """An admin client of the API server; its function namespace emptied, one GPU node."""
    api = await kube.admin(api_server)
    await kube.reset(api)
    yield api
    await api.close()


@pytest.fixture(params=["local", "kubernetes"])
async def provider(
    request: pytest.FixtureRequest, aiohttp_client: Any, settings: Settings
) -> AsyncIterator[TestClient]:
    """A client of a real provider server on each backend: the local one with real replica
    processes; the Kubernetes one on a real API server (its function namespace emptied, one
    GPU node), with the stand-in kubelet of tests/kube.py."""
    if request.param == "local":
        yield await aiohttp_client(create_app(local_backend(settings), settings))
        return
    server: kube.ApiServer = request.getfixturevalue("api_server")
    api = await kube.admin(server)
    await kube.reset(api)
    on_cluster = kube.on_cluster(settings, server.kubeconfig)
    try:
        async with kube.kubelet(api):
            yield await aiohttp_client(create_app(create_backend(on_cluster), on_cluster))
    finally:
        await api.close()


def a_profile(
    function: str,
    gpu_model: str = "NVIDIA H200",
    measured: tuple[tuple[int, float], ...] = ((25, 300.0), (50, 520.0)),
) -> dict[str, object]:
    """A profile as `fast-gshare profile` sends it: req/s of one replica at each SM partition
    (quota 1, 4 in flight, p99 12 ms) of `measured`."""
    return {
        "function": function,
        "gpu_model": gpu_model,
        "made_at": "2026-12-02T06:00:00Z",
        "latency_slo_ms": 50,
        "measurements": [
            {"sm_percent": sm, "quota": 1.0, "concurrency": 4, "throughput_rps": rps,
             "p50_ms": 5, "p95_ms": 9, "p99_ms": 12}
            for sm, rps in measured
        ],
    }  # fmt: skip


async def faas_cli_deploy(client: TestClient, body: dict[str, Any]) -> int:
    """Deploy as faas-cli does: PUT first, POST only when the PUT answers 404."""
    response = await client.put("/system/functions", json=body)
    if response.status == 404:
        response = await client.post("/system/functions", json=body)
    return response.status


async def wait_available(
    client: TestClient, name: str, count: int = 1, namespace: str = "openfaas-fn"
) -> dict[str, Any]:
    """Poll the status as the gateway does (every 100 ms) until `count` replicas are ready."""
    for _ in range(300):
        response = await client.get(f"/system/function/{name}?namespace={namespace}")
        status = await response.json()
        if status["availableReplicas"] == count:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never reached {count} available replicas: {status}")


async def wait_logged(client: TestClient, name: str, text: str) -> str:
    """Poll the function's logs (every 50 ms, up to 5 s) until they hold `text`; the logs."""
    for _ in range(100):
        logs = await (await client.get(f"/system/logs?name={name}")).text()
        if text in logs:
            return logs
        await asyncio.sleep(0.05)
    raise AssertionError(f"the logs of {name} never said {text!r}: {logs[-2000:]}")


ECHO = {"service": "echo", "image": "ghcr.io/fast-gshare/echo:latest", "envProcess": "cat"}
STEER = {"service": "steer", "image": "example/steer:1"}


def import_handler(name: str, unset: str) -> tuple[ModuleType, str]:
    """The sample function `name`'s handler module, imported with environment variable `unset`
    unset, and what the import wrote to stderr."""
    path = REPO / "functions" / name / "handler.py"
    spec = importlib.util.spec_from_file_location(f"{name.replace('-', '_')}_handler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.delenv(unset, raising=False)
        spec.loader.exec_module(module)
    return module, stderr.getvalue()
