"""Contract tests for /system/functions, /system/function/{name}, scale and info."""

from __future__ import annotations

import asyncio
import json
import os
import re
from datetime import datetime

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ECHO, STEER, faas_cli_deploy, wait_available


async def test_info_has_the_fields_faas_cli_version_reads(client: TestClient) -> None:
    response = await client.get("/system/info")
    assert response.status == 200
    info = await response.json()
    assert info["provider"] == "fast-gshare"
    assert info["orchestration"] == "local"
    assert info["version"]["release"]
    assert info["version"]["sha"]


async def test_list_is_an_empty_array_before_any_deploy(client: TestClient) -> None:
    response = await client.get("/system/functions")
    assert response.status == 200
    assert await response.text() in ("[]", "[]\n")


async def test_faas_cli_deploy_put_then_post_and_status_shape(client: TestClient) -> None:
    put = await client.put("/system/functions", json=ECHO)
    assert put.status == 404, "PUT of an unknown function must be 404 so faas-cli POSTs"
    assert await faas_cli_deploy(client, ECHO) in (200, 202)
    status = await wait_available(client, "echo")
    assert status["name"] == "echo"
    assert status["namespace"] == "openfaas-fn"
    assert status["image"] == ECHO["image"]
    assert status["envProcess"] == "cat"
    assert status["replicas"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", status["createdAt"])
    for empty in ("secrets", "envVars", "constraints"):
        assert empty not in status, f"empty {empty} must be left out"
    # the conformance suite's client dereferences both; faas-netes always sends them
    assert status["labels"] == {"faas_function": "echo"}
    assert status["annotations"] == {}
    listed = await (await client.get("/system/functions?namespace=openfaas-fn")).json()
    assert [f["name"] for f in listed] == ["echo"]
    assert listed[0]["labels"] == {"faas_function": "echo"} and listed[0]["annotations"] == {}
    # a second faas-cli deploy updates in place (PUT 202), a second POST is refused
    assert await faas_cli_deploy(client, ECHO) == 202
    again = await client.post("/system/functions", json=ECHO)
    assert again.status == 409
    assert "exists" in await again.text()


async def test_status_of_unknown_function_is_404_naming_it(client: TestClient) -> None:
    response = await client.get("/system/function/nope?namespace=openfaas-fn&usage=false")
    assert response.status == 404
    assert await response.text() == "function nope not found in namespace openfaas-fn"


async def test_faas_function_label_is_the_name_and_user_labels_are_kept(
    client: TestClient,
) -> None:
    labels = {"canary_build": "true", "faas_function": "someone-else"}
    assert await faas_cli_deploy(client, {**ECHO, "labels": labels}) == 202
    status = await (await client.get("/system/function/echo")).json()
    assert status["labels"] == {"canary_build": "true", "faas_function": "echo"}
    # an update that drops the user's labels keeps the function's own
    assert await faas_cli_deploy(client, ECHO) == 202
    listed = await (await client.get("/system/functions")).json()
    assert listed[0]["labels"] == {"faas_function": "echo"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"service": "../x", "image": "a"}), "service"),
        (json.dumps({"service": "Upper", "image": "a"}), "DNS-1123"),
        (json.dumps({"service": "a" * 64, "image": "a"}), "DNS-1123"),
        (json.dumps({"service": "x", "image": "a", "envVars": {"A": 1}}), "envVars.A"),
        (json.dumps({"service": "x", "image": "a", "labels": ["no"]}), "labels"),
        (json.dumps({"service": "x"}), "image"),
        (json.dumps({"service": "x", "image": "acme/missing:1"}), "acme/missing:1"),
        (
            json.dumps({**ECHO, "labels": {"com.openfaas.scale.min": "two"}}),
            "com.openfaas.scale.min",
        ),
        (json.dumps({**ECHO, "secrets": ["absent"]}), "absent"),
        (json.dumps({**ECHO, "namespace": "elsewhere"}), "namespace elsewhere"),
    ],
)
async def test_bad_deploys_are_refused_with_a_clear_message_and_change_nothing(
    client: TestClient, body: str, fragment: str
) -> None:
    response = await client.post("/system/functions", data=body)
    text = await response.text()
    assert response.status == 400, text
    assert fragment in text
    assert await (await client.get("/system/functions")).json() == []


async def test_bad_update_of_an_existing_function_changes_nothing(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    for body in ({**ECHO, "service": "Bad_Name"}, {**ECHO, "envProcess": None, "image": "x/y"}):
        response = await client.put("/system/functions", json=body)
        assert response.status == 400, await response.text()
    status = await (await client.get("/system/function/echo")).json()
    assert status["envProcess"] == "cat" and status["image"] == ECHO["image"]


async def test_handler_image_resolution_names_what_was_looked_for(client: TestClient) -> None:
    response = await client.post("/system/functions", json={"service": "x", "image": "a/b:c"})
    assert response.status == 400
    text = await response.text()
    assert "b/handler.py" in text and "envProcess" in text


async def test_delete_by_body_and_by_query_and_unknown(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    assert await faas_cli_deploy(client, {**ECHO, "service": "echo2"}) == 202
    by_body = await client.delete(
        "/system/functions", json={"functionName": "echo", "namespace": "openfaas-fn"}
    )
    assert by_body.status == 202
    by_query = await client.delete(
        "/system/functions?namespace=openfaas-fn", json={"functionName": "echo2"}
    )
    assert by_query.status == 202
    assert await (await client.get("/system/functions")).json() == []
    unknown = await client.delete("/system/functions", json={"functionName": "echo"})
    assert unknown.status == 404
    assert "echo" in await unknown.text()


async def test_scale_in_both_body_forms_down_to_zero_and_back(client: TestClient) -> None:
    assert await faas_cli_deploy(client, STEER) == 202
    status = await wait_available(client, "steer")
    first_pid = (await (await client.post("/function/steer", data="")).json())["pid"]
    # the gateway's form: serviceName + replicas, namespace in the query
    gateway = await client.post(
        "/system/scale-function/steer?namespace=openfaas-fn",
        json={"serviceName": "steer", "replicas": 2},
    )
    assert gateway.status in (200, 202)
    status = await wait_available(client, "steer", 2)
    assert status["replicas"] == 2
    # faas-cli's form: all three in the body
    cli = await client.post(
        "/system/scale-function/steer",
        json={"serviceName": "steer", "namespace": "openfaas-fn", "replicas": 0},
    )
    assert cli.status in (200, 202)
    status = await wait_available(client, "steer", 0)
    assert status["replicas"] == 0
    await asyncio.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)
    unavailable = await client.post("/function/steer", data="")
    assert unavailable.status == 503
    assert unavailable.headers["X-OpenFaaS-Internal"] == "proxy"
    assert "steer" in await unavailable.text()
    unknown = await client.post("/system/scale-function/nope", json={"replicas": 1})
    assert unknown.status == 404
    negative = await client.post("/system/scale-function/steer", json={"replicas": -1})
    assert negative.status == 400


async def test_gateway_scale_from_zero_flow(client: TestClient) -> None:
    """What the gateway does on a cold call: status, scale to min, poll, then forward."""
    body = {**ECHO, "labels": {"com.openfaas.scale.min": "1"}}
    assert await faas_cli_deploy(client, body) == 202
    await wait_available(client, "echo")
    await client.post("/system/scale-function/echo", json={"replicas": 0})
    await wait_available(client, "echo", 0)

    status = await (await client.get("/system/function/echo?namespace=openfaas-fn")).json()
    assert status["replicas"] == 0
    minimum = int(status["labels"]["com.openfaas.scale.min"])
    scaled = await client.post(
        "/system/scale-function/echo?namespace=openfaas-fn",
        json={"serviceName": "echo", "replicas": minimum},
    )
    assert scaled.status in (200, 202)
    await wait_available(client, "echo", 1)
    answer = await client.post("/function/echo.openfaas-fn", data="warm now")
    assert answer.status == 200
    assert await answer.text() == "warm now"


async def test_scale_min_label_sets_replicas_at_deploy(client: TestClient) -> None:
    body = {**ECHO, "labels": {"com.openfaas.scale.min": "2"}}
    assert await faas_cli_deploy(client, body) == 202
    status = await wait_available(client, "echo", 2)
    assert status["replicas"] == 2
    assert status["labels"] == {"com.openfaas.scale.min": "2", "faas_function": "echo"}


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
