"""The local backend's side of /system/functions and scale: images resolved to handler
directories, replica processes started and stopped (test_contract.py holds what every backend
answers alike)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import datetime

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from faas_provider.api.app import create_app
from faas_provider.backends.local import replica as replica_module
from faas_provider.settings import Settings
from tests.conftest import ECHO, STEER, faas_cli_deploy, local_backend, wait_available


async def test_handler_image_resolution_names_what_was_looked_for(client: TestClient) -> None:
    response = await client.post("/system/functions", json={"service": "x", "image": "a/b:c"})
    assert response.status == 400
    text = await response.text()
    assert "b/handler.py" in text and "envProcess" in text


async def test_an_image_with_no_handler_and_no_envprocess_is_refused(client: TestClient) -> None:
    response = await client.post("/system/functions", json={"service": "x", "image": "acme/m:1"})
    assert response.status == 400
    assert "acme/m:1" in await response.text()
    assert await faas_cli_deploy(client, ECHO) == 202
    update = await client.put(
        "/system/functions", json={**ECHO, "envProcess": None, "image": "x/y"}
    )
    assert update.status == 400, await update.text()
    status = await (await client.get("/system/function/echo")).json()
    assert status["envProcess"] == "cat" and status["image"] == ECHO["image"]


async def test_scale_to_zero_stops_the_replica_process(client: TestClient) -> None:
    assert await faas_cli_deploy(client, STEER) == 202
    await wait_available(client, "steer")
    pid = (await (await client.post("/function/steer", data="")).json())["pid"]
    await client.post("/system/scale-function/steer", json={"replicas": 0})
    await wait_available(client, "steer", 0)
    # withdrawn from service at once, it is stopped once no worker can still send to it
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_update_replaces_replicas_only_when_the_spec_changes(client: TestClient) -> None:
    assert await faas_cli_deploy(client, {**STEER, "envVars": {"GREETING": "hi"}}) == 202
    await wait_available(client, "steer")
    before = await (await client.post("/function/steer", data="")).json()
    assert before["env"] == "hi"
    # a label-only change keeps the running replica
    same = {**STEER, "envVars": {"GREETING": "hi"}, "labels": {"team": "a"}}
    assert await faas_cli_deploy(client, same) == 202
    unchanged = await (await client.post("/function/steer", data="")).json()
    assert unchanged["pid"] == before["pid"]
    # a new environment means a new replica; the old one serves until it is ready
    assert await faas_cli_deploy(client, {**STEER, "envVars": {"GREETING": "hello"}}) == 202
    for _ in range(200):
        after = await client.post("/function/steer", data="")
        assert after.status == 200, "the function must keep answering during the rollout"
        body = await after.json()
        if body["env"] == "hello":
            break
        await asyncio.sleep(0.05)
    assert body["env"] == "hello" and body["pid"] != before["pid"]
    status = await (await client.get("/system/function/steer")).json()
    assert datetime.fromisoformat(status["createdAt"]) <= datetime.now().astimezone()


async def test_a_provider_stop_during_a_scale_down_stops_every_replica_promptly(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica that the scale-down stops is slow to go (a call in flight, past the grace
    period): it is not health-checked meanwhile, and the provider's stop waits for it before
    it closes the fork server, which then has no child left. (Its own client: a stop that
    hangs is not tried again at teardown.)"""
    monkeypatch.setattr(replica_module, "HEALTH_INTERVAL_S", 0.1)
    monkeypatch.setattr(replica_module, "RECHECK_S", 0.1)
    monkeypatch.setattr(replica_module, "STOP_GRACE_S", 1.0)
    caplog.set_level(logging.INFO, logger="fast_gshare")
    client = TestClient(TestServer(create_app(local_backend(settings), settings)))
    await client.start_server()
    assert await faas_cli_deploy(client, STEER) == 202
    await wait_available(client, "steer")
    pid = (await (await client.post("/function/steer", data="")).json())["pid"]
    [url] = (await (await client.get("/system/endpoints/steer")).json())["urls"]
    async with aiohttp.ClientSession() as session:
        busy = asyncio.create_task(session.post(url, data="sleep 30"))
        await asyncio.sleep(0.3)
        await client.post("/system/scale-function/steer", json={"replicas": 0})
        await asyncio.sleep(0.5)  # its port is closed: checks would fail now
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(10):
            await client.close()
        took = loop.time() - began
        with contextlib.suppress(aiohttp.ClientError):
            await busy
    assert took < 3, f"the provider took {took:.1f} s to stop"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "replica steer-0 stopped" in caplog.text
    assert "health check" not in caplog.text
    assert "from /proc" not in caplog.text
