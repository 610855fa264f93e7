"""Hostile input the fuzz test (tests/test_fuzz.py) found answered 500: each kept as a case."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ECHO, faas_cli_deploy, wait_available


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x80{}", "not UTF-8 JSON"),
        (b'{"replicas": ' + b"7" * 5000 + b"}", "over 4300 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
async def test_bodies_json_cannot_read_are_400(
    client: TestClient, body: bytes, message: str
) -> None:
    for method, path in (("POST", "/system/functions"), ("POST", "/system/scale-function/x")):
        answer = await client.request(method, path, data=body)
        assert answer.status == 400
        assert message in await answer.text()


async def test_the_default_namespace_cannot_be_deleted(client: TestClient) -> None:
    answer = await client.delete("/system/namespace/openfaas-fn")
    assert answer.status == 409
    assert "default" in await answer.text()
    assert "openfaas-fn" in await (await client.get("/system/namespaces")).json()


async def test_a_scale_min_label_past_the_replica_bound_is_refused(client: TestClient) -> None:
    for value in ("1001", "9" * 30):
        labels = {"com.openfaas.scale.min": value}
        answer = await client.post("/system/functions", json={**ECHO, "labels": labels})
        assert answer.status == 400
        assert "from 0 to 1000" in await answer.text()
    assert await (await client.get("/system/functions")).json() == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("envVars", {"A=B": "1"}, "not an environment variable name"),
        ("envVars", {"": "1"}, "not an environment variable name"),
        ("envVars", {"A\x00": "1"}, "not an environment variable name"),
        ("envVars", {"A": "a\x00b"}, "environment variable A holds a NUL"),
        ("envVars", {"A": "\ud800"}, "environment variable A is not valid Unicode"),
        ("envProcess", "cat\x00", "envProcess holds a NUL"),
    ],
)
async def test_an_environment_no_process_can_have_is_refused(
    client: TestClient, field: str, value: object, message: str
) -> None:
    answer = await client.post("/system/functions", json={**ECHO, field: value})
    assert answer.status == 400
    assert message in await answer.text()
    assert await (await client.get("/system/functions")).json() == []


async def test_a_secret_value_utf8_cannot_hold_is_refused(client: TestClient) -> None:
    answer = await client.post("/system/secrets", json={"name": "s", "value": "\ud800"})
    assert answer.status == 400
    assert "value is not valid Unicode" in await answer.text()
    assert await (await client.get("/system/secrets")).json() == []


def _tasks_of(function: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == function]


async def test_a_replica_scaled_away_leaves_no_health_check_running(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "echo")
    scaled = await client.post("/system/scale-function/echo", json={"replicas": 0})
    assert scaled.status == 202
    await wait_available(client, "echo", 0)
    for _ in range(200):  # until the replica's supervisor has stopped
        if not _tasks_of("Replica._supervise"):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)
    assert _tasks_of("Replica._watch_health") == []
