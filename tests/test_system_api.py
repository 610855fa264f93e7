"""Secrets as the local backend's replicas read them, logs, healthz, metrics and basic auth
(test_contract.py holds the secret and namespace calls every backend answers alike)."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from faas_provider.api.app import create_app
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.settings import Settings
from tests.conftest import ECHO, STEER, faas_cli_deploy, wait_available


async def test_function_reads_its_secret_file_mode_0600_raw_value_wins(
    client: TestClient,
) -> None:
    raw = base64.b64encode(b"from-raw").decode()
    body = {"name": "db-pass", "value": "from-value", "rawValue": raw}
    assert (await client.post("/system/secrets", json=body)).status == 201
    assert await faas_cli_deploy(client, {**STEER, "secrets": ["db-pass"]}) == 202
    await wait_available(client, "steer")
    answer = await (await client.post("/function/steer", data=b"secret db-pass")).json()
    assert answer == {"value": "from-raw", "mode": "0o600"}
    # an updated secret reaches the running function's file
    await client.put("/system/secrets", json={"name": "db-pass", "value": "rotated"})
    answer = await (await client.post("/function/steer", data=b"secret db-pass")).json()
    assert answer["value"] == "rotated"


async def _log_lines(client: TestClient, query: str) -> list[dict[str, Any]]:
    response = await client.get(f"/system/logs?{query}")
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "application/x-ndjson"
    return [json.loads(line) for line in (await response.text()).splitlines()]


async def test_logs_tail_since_and_bad_parameters(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "echo")
    for _ in range(3):
        await client.post("/function/echo", data=b"x")
    lines = await _log_lines(client, "name=echo&namespace=openfaas-fn")
    assert any("Forking fprocess" in line["text"] for line in lines)
    first = lines[0]
    assert set(first) == {"name", "namespace", "instance", "timestamp", "text"}
    assert first["name"] == "echo" and first["instance"] == "echo-0"
    assert len(await _log_lines(client, "name=echo&tail=2")) == 2
    # faas-cli's default is tail=-1: as in faas-provider, <= 0 means every line
    assert len(await _log_lines(client, "name=echo&tail=-1&follow=false")) == len(lines)
    assert len(await _log_lines(client, "name=echo&tail=0")) == len(lines)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert await _log_lines(client, f"name=echo&since={future}") == []
    assert (await client.get("/system/logs?name=echo&tail=ten")).status == 422
    assert (await client.get("/system/logs?name=echo&since=yesterday")).status == 422
    assert (await client.get("/system/logs?name=nope")).status == 404
    assert (await client.get("/system/logs")).status == 400


async def test_an_overlong_output_line_neither_stalls_the_replica_nor_is_lost(
    client: TestClient,
) -> None:
    assert await faas_cli_deploy(client, STEER) == 202
    await wait_available(client, "steer")
    for _ in range(3):  # 900 kB: far past any pipe buffer if nobody read it
        response = await asyncio.wait_for(client.post("/function/steer", data=b"shout 300000"), 10)
        assert response.status == 200
    lines = await _log_lines(client, "name=steer")
    assert sum(line["text"].count("x") for line in lines) == 900_000


async def test_logs_follow_streams_new_lines_as_they_come(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "echo")
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    response = await client.get(f"/system/logs?name=echo&follow=true&since={now}")
    assert response.status == 200
    await client.post("/function/echo", data=b"x")
    line = await asyncio.wait_for(response.content.readline(), 5)
    assert json.loads(line)["name"] == "echo"
    response.close()


async def test_healthz_and_metrics(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.head("/healthz")).status == 200
    await client.get("/system/functions")
    await client.get("/system/function/nope")
    metrics = await (await client.get("/metrics")).text()
    assert 'provider_http_requests_total{code="200",method="GET",path="/system/functions"}' in (
        metrics
    )
    assert 'code="404",method="GET",path="/system/function/{name}"' in metrics
    assert "provider_http_request_duration_seconds_bucket" in metrics


@pytest.fixture
async def auth_client(aiohttp_client: Any, settings: Settings, tmp_path: Path) -> TestClient:
    secrets = tmp_path / "auth"
    secrets.mkdir()
    (secrets / "basic-auth-user").write_text("admin\n")
    (secrets / "basic-auth-password").write_text(" pa55 \n")
    settings = settings.model_copy(update={"basic_auth": True, "secret_mount_path": secrets})
    backend = LocalBackend(settings.local.state_dir, settings.local.functions_dir)
    return await aiohttp_client(create_app(backend, settings))


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_basic_auth_guards_system_routes_only(auth_client: TestClient) -> None:
    denied = await auth_client.get("/system/functions")
    assert denied.status == 401
    assert denied.headers["WWW-Authenticate"] == 'Basic realm="Restricted"'
    wrong = await auth_client.get("/system/functions", headers=_basic("admin", "nope"))
    assert wrong.status == 401
    allowed = await auth_client.get("/system/functions", headers=_basic("admin", "pa55"))
    assert allowed.status == 200
    assert (await auth_client.get("/healthz")).status == 200
    assert (await auth_client.get("/metrics")).status == 200
    assert (await auth_client.post("/function/nope")).status == 404  # open, just unknown
