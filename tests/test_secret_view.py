"""Secrets at /var/openfaas/secrets: an unchanged function reads its own, and no other's."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from faas_provider.api.app import create_app
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.backends.local.forkserver import ForkServer
from faas_provider.backends.local.launch import python_environment
from faas_provider.backends.local.secret_view import SecretView, probe_secret_view
from faas_provider.settings import Settings
from tests.conftest import STEER, faas_cli_deploy, wait_available

ALPINE = "docker.io/functions/alpine:latest"  # as the conformance suite deploys it


def cat(service: str, path: str, secrets: list[str], namespace: str = "openfaas-fn") -> dict:
    """A stock-style fprocess function that answers with the file at `path`."""
    return {
        "service": service,
        "image": ALPINE,
        "envProcess": f"cat {path}",
        "secrets": secrets,
        "namespace": namespace,
    }


async def call(client: TestClient, name: str) -> tuple[int, str]:
    response = await client.post(f"/function/{name}", data=b"")
    return response.status, await response.text()


async def test_each_function_reads_its_own_secrets_at_var_openfaas_secrets(
    client: TestClient, settings: Settings
) -> None:
    forks = ForkServer(python_environment(), preload=())
    await forks.start()
    try:
        view = await probe_secret_view(settings.local.state_dir, forks)
    finally:
        await forks.close()
    if not isinstance(view, SecretView):
        pytest.skip(f"no private mount namespaces on this machine: {view}")
    assert (await client.post("/system/namespace/team-b")).status in (200, 201, 202)
    await client.post("/system/secrets", json={"name": "x", "value": "mine"})
    await client.post("/system/secrets", json={"name": "y", "value": "b's", "namespace": "team-b"})
    assert await faas_cli_deploy(client, cat("reader", "/var/openfaas/secrets/x", ["x"])) == 202
    intruder = cat("intruder", "/var/openfaas/secrets/x", ["y"], namespace="team-b")
    assert await faas_cli_deploy(client, intruder) == 202
    store = cat("store", str(settings.local.state_dir.absolute() / "secrets.json"), ["y"], "team-b")
    assert await faas_cli_deploy(client, store) == 202
    for name, namespace in (("reader", "openfaas-fn"), ("intruder", "team-b"), ("store", "team-b")):
        await wait_available(client, name, namespace=namespace)

    assert await call(client, "reader") == (200, "mine")
    # a secret made again after the replica started shows: the directory is bound, not a file
    await client.delete("/system/secrets", json={"name": "x", "namespace": "openfaas-fn"})
    await client.post("/system/secrets", json={"name": "x", "value": "made again"})
    assert await call(client, "reader") == (200, "made again")

    # another namespace's function, with a secret of the same name's path, sees only its own
    status, text = await call(client, "intruder.team-b")
    assert status == 500 and "No such file" in text and "mine" not in text
    # nor can it read every function's secrets where the provider keeps them
    status, text = await call(client, "store.team-b")
    assert status == 500 and "No such file" in text and "b's" not in text


async def test_without_the_view_secrets_are_at_secret_mount_path_and_the_start_says_so(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async def refuse(hidden: Path, forks: ForkServer) -> str:
        return "forced for the test"

    backend = LocalBackend(
        settings.local.state_dir,
        settings.local.functions_dir,
        settings.startup_wait_s,
        probe_secrets=refuse,
    )
    with caplog.at_level(logging.INFO, logger="fast_gshare.local"):
        client = await aiohttp_client(create_app(backend, settings))
    said = [r.getMessage() for r in caplog.records if "secrets at" in r.getMessage()]
    assert said == [
        "replicas read their secrets at $secret_mount_path only, not at "
        "/var/openfaas/secrets: forced for the test"
    ]
    await client.post("/system/secrets", json={"name": "x", "value": "mine"})
    assert await faas_cli_deploy(client, {**STEER, "secrets": ["x"]}) == 202
    assert await faas_cli_deploy(client, cat("reader", "/var/openfaas/secrets/x", ["x"])) == 202
    await wait_available(client, "steer")
    await wait_available(client, "reader")
    answer = await (await client.post("/function/steer", data=b"secret x")).json()
    assert answer["value"] == "mine"
    status, _ = await call(client, "reader")
    assert status == 500


def test_the_probe_says_why_when_util_linux_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = asyncio.run(probe_secret_view(tmp_path, ForkServer(python_environment())))
    assert reason == "mount, sh not found (util-linux)"
