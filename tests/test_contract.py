"""The provider contract, held against every backend: the routes, the shapes of their answers
and the refusals of bad input, through a real provider server on the local backend (real
replica processes) and on the Kubernetes backend (a real API server, tests/kube.py)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ECHO, a_profile, faas_cli_deploy, wait_available


async def test_info_has_the_fields_faas_cli_version_reads(provider: TestClient) -> None:
    response = await provider.get("/system/info")
    assert response.status == 200
    info = await response.json()
    assert info["provider"] == "fast-gshare"
    assert info["orchestration"] in ("local", "kubernetes")
    assert info["version"]["release"]
    assert info["version"]["sha"]


async def test_list_is_an_empty_array_before_any_deploy(provider: TestClient) -> None:
    response = await provider.get("/system/functions")
    assert response.status == 200
    assert await response.text() in ("[]", "[]\n")


async def test_faas_cli_deploy_put_then_post_and_status_shape(provider: TestClient) -> None:
    put = await provider.put("/system/functions", json=ECHO)
    assert put.status == 404, "PUT of an unknown function must be 404 so faas-cli POSTs"
    assert await faas_cli_deploy(provider, ECHO) in (200, 202)
    status = await wait_available(provider, "echo")
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
    listed = await (await provider.get("/system/functions?namespace=openfaas-fn")).json()
    assert [f["name"] for f in listed] == ["echo"]
    assert listed[0]["labels"] == {"faas_function": "echo"} and listed[0]["annotations"] == {}
    # a second faas-cli deploy updates in place (PUT 202), a second POST is refused
    assert await faas_cli_deploy(provider, ECHO) == 202
    again = await provider.post("/system/functions", json=ECHO)
    assert again.status == 409
    assert "exists" in await again.text()
    answer = await provider.post("/function/echo", data=b"through the provider")
    assert answer.status == 200
    assert await answer.text() == "through the provider"


async def test_status_of_unknown_function_is_404_naming_it(provider: TestClient) -> None:
    response = await provider.get("/system/function/nope?namespace=openfaas-fn&usage=false")
    assert response.status == 404
    assert await response.text() == "function nope not found in namespace openfaas-fn"
    invoked = await provider.post("/function/nope", data=b"")
    assert invoked.status == 404


async def test_faas_function_label_is_the_name_and_user_labels_are_kept(
    provider: TestClient,
) -> None:
    labels = {"canary_build": "true", "faas_function": "someone-else"}
    assert await faas_cli_deploy(provider, {**ECHO, "labels": labels}) == 202
    status = await (await provider.get("/system/function/echo")).json()
    assert status["labels"] == {"canary_build": "true", "faas_function": "echo"}
    # an update that drops the user's labels keeps the function's own
    assert await faas_cli_deploy(provider, ECHO) == 202
    listed = await (await provider.get("/system/functions")).json()
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
        (
            json.dumps({**ECHO, "labels": {"com.openfaas.scale.min": "two"}}),
            "com.openfaas.scale.min",
        ),
        (json.dumps({**ECHO, "secrets": ["absent"]}), "absent"),
        (json.dumps({**ECHO, "namespace": "elsewhere"}), "namespace elsewhere"),
        (
            json.dumps({**ECHO, "annotations": {"fastgshare/gpu_sm_partition": "140"}}),
            "fastgshare/gpu_sm_partition",
        ),
        (
            json.dumps({**ECHO, "annotations": {"fastgshare/gpu_mem": "64Gi"}}),
            "fastgshare/gpu_mem",
        ),
    ],
)
async def test_bad_deploys_are_refused_with_a_clear_message_and_change_nothing(
    provider: TestClient, body: str, fragment: str
) -> None:
    response = await provider.post("/system/functions", data=body)
    text = await response.text()
    assert response.status == 400, text
    assert fragment in text
    assert await (await provider.get("/system/functions")).json() == []


async def test_bad_update_of_an_existing_function_changes_nothing(provider: TestClient) -> None:
    assert await faas_cli_deploy(provider, ECHO) == 202
    for body in (
        {**ECHO, "service": "Bad_Name"},
        {**ECHO, "envProcess": "other", "secrets": ["absent"]},
    ):
        response = await provider.put("/system/functions", json=body)
        assert response.status == 400, await response.text()
    status = await (await provider.get("/system/function/echo")).json()
    assert status["envProcess"] == "cat" and status["image"] == ECHO["image"]


async def test_delete_by_body_and_by_query_and_unknown(provider: TestClient) -> None:
    assert await faas_cli_deploy(provider, ECHO) == 202
    assert await faas_cli_deploy(provider, {**ECHO, "service": "echo2"}) == 202
    by_body = await provider.delete(
        "/system/functions", json={"functionName": "echo", "namespace": "openfaas-fn"}
    )
    assert by_body.status == 202
    by_query = await provider.delete(
        "/system/functions?namespace=openfaas-fn", json={"functionName": "echo2"}
    )
    assert by_query.status == 202
    assert await (await provider.get("/system/functions")).json() == []
    unknown = await provider.delete("/system/functions", json={"functionName": "echo"})
    assert unknown.status == 404
    assert "echo" in await unknown.text()


async def test_scale_in_both_body_forms_down_to_zero_and_back(provider: TestClient) -> None:
    assert await faas_cli_deploy(provider, ECHO) == 202
    await wait_available(provider, "echo")
    # the gateway's form: serviceName + replicas, namespace in the query
    gateway = await provider.post(
        "/system/scale-function/echo?namespace=openfaas-fn",
        json={"serviceName": "echo", "replicas": 2},
    )
    assert gateway.status in (200, 202)
    status = await wait_available(provider, "echo", 2)
    assert status["replicas"] == 2
    # faas-cli's form: all three in the body
    cli = await provider.post(
        "/system/scale-function/echo",
        json={"serviceName": "echo", "namespace": "openfaas-fn", "replicas": 0},
    )
    assert cli.status in (200, 202)
    status = await wait_available(provider, "echo", 0)
    assert status["replicas"] == 0
    unavailable = await provider.post("/function/echo", data="")
    assert unavailable.status == 503
    assert unavailable.headers["X-OpenFaaS-Internal"] == "proxy"
    assert "echo" in await unavailable.text()
    unknown = await provider.post("/system/scale-function/nope", json={"replicas": 1})
    assert unknown.status == 404
    negative = await provider.post("/system/scale-function/echo", json={"replicas": -1})
    assert negative.status == 400


async def test_gateway_scale_from_zero_flow(provider: TestClient) -> None:
    """What the gateway does on a cold call: status, scale to min, poll, then forward."""
    body = {**ECHO, "labels": {"com.openfaas.scale.min": "1"}}
    assert await faas_cli_deploy(provider, body) == 202
    await wait_available(provider, "echo")
    await provider.post("/system/scale-function/echo", json={"replicas": 0})
    await wait_available(provider, "echo", 0)

    status = await (await provider.get("/system/function/echo?namespace=openfaas-fn")).json()
    assert status["replicas"] == 0
    minimum = int(status["labels"]["com.openfaas.scale.min"])
    scaled = await provider.post(
        "/system/scale-function/echo?namespace=openfaas-fn",
        json={"serviceName": "echo", "replicas": minimum},
    )
    assert scaled.status in (200, 202)
    await wait_available(provider, "echo", 1)
    answer = await provider.post("/function/echo.openfaas-fn", data="warm now")
    assert answer.status == 200
    assert await answer.text() == "warm now"


async def test_scale_min_label_sets_replicas_at_deploy(provider: TestClient) -> None:
    body = {**ECHO, "labels": {"com.openfaas.scale.min": "2"}}
    assert await faas_cli_deploy(provider, body) == 202
    status = await wait_available(provider, "echo", 2)
    assert status["replicas"] == 2
    assert status["labels"] == {"com.openfaas.scale.min": "2", "faas_function": "echo"}


async def test_gpu_replicas_that_no_gpu_has_room_for_wait_and_say_why(
    provider: TestClient,
) -> None:
    shared = {**ECHO, "annotations": {"fastgshare/gpu_sm_partition": "60"}}
    assert await faas_cli_deploy(provider, {**shared, "service": "first"}) == 202
    await wait_available(provider, "first")
    assert await faas_cli_deploy(provider, {**shared, "service": "second"}) == 202
    status = await (await provider.get("/system/function/second")).json()
    assert (status["replicas"], status["availableReplicas"]) == (1, 0)
    await asyncio.sleep(0.3)
    assert (await (await provider.get("/system/function/second")).json())[
        "availableReplicas"
    ] == 0, "60 + 60 of 100 SM-time: the second waits"
    deleted = await provider.delete("/system/functions", json={"functionName": "first"})
    assert deleted.status == 202
    await wait_available(provider, "second")
    answer = await provider.post("/function/second", data=b"placed")
    assert await answer.text() == "placed"


async def test_secrets_crud_never_shows_values(provider: TestClient) -> None:
    created = await provider.post("/system/secrets", json={"name": "api-key", "value": "s3cret"})
    assert created.status == 201
    duplicate = await provider.post("/system/secrets", json={"name": "api-key", "value": "x"})
    assert duplicate.status == 409
    listed = await provider.get("/system/secrets?namespace=openfaas-fn")
    assert await listed.json() == [{"name": "api-key", "namespace": "openfaas-fn"}]
    assert "s3cret" not in await listed.text()
    updated = await provider.put("/system/secrets", json={"name": "api-key", "value": "new"})
    assert updated.status in (200, 202)
    missing = await provider.put("/system/secrets", json={"name": "nope", "value": "x"})
    assert missing.status == 404
    deleted = await provider.delete(
        "/system/secrets", json={"name": "api-key", "namespace": "openfaas-fn"}
    )
    assert deleted.status in (200, 202)
    assert await (await provider.get("/system/secrets")).json() == []
    again = await provider.delete("/system/secrets", json={"name": "api-key"})
    assert again.status == 404


async def test_bad_secret_names_are_refused(provider: TestClient) -> None:
    for name in ("../etc", "UPPER", "a/b", ""):
        response = await provider.post("/system/secrets", json={"name": name, "value": "x"})
        assert response.status == 400, name
        assert "name" in await response.text()
    assert await (await provider.get("/system/secrets")).json() == []


async def test_namespaces(provider: TestClient) -> None:
    assert await (await provider.get("/system/namespaces")).json() == ["openfaas-fn"]
    created = await provider.post("/system/namespace/team-a", json={"labels": {"x": "1"}})
    assert created.status == 201
    assert (await provider.post("/system/namespace/team-a")).status == 409
    assert (await provider.post("/system/namespace/Team_A")).status == 400
    # faas-cli's form: no name in the path, the name in the body
    by_body = await provider.post(
        "/system/namespace/", json={"name": "team-b", "labels": {"openfaas": "1"}}
    )
    assert by_body.status == 201
    assert (await provider.post("/system/namespace/", json={"name": "../x"})).status == 400
    assert (await provider.post("/system/namespace/", json={})).status == 400
    got = await (await provider.get("/system/namespace/team-a")).json()
    assert got["name"] == "team-a" and got["annotations"] == {}
    assert got["labels"]["x"] == "1"
    assert await faas_cli_deploy(provider, {**ECHO, "namespace": "team-a"}) == 202
    in_use = await provider.delete("/system/namespace/team-a")
    assert in_use.status == 409
    listed = await (await provider.get("/system/functions?namespace=team-a")).json()
    assert [f["namespace"] for f in listed] == ["team-a"]
    assert await (await provider.get("/system/functions")).json() == []
    await wait_available(provider, "echo", namespace="team-a")
    answer = await provider.post("/function/echo.team-a", data=b"ns")
    assert await answer.text() == "ns"
    await provider.delete("/system/functions?namespace=team-a", json={"functionName": "echo"})
    assert (await provider.delete("/system/namespace/team-a")).status == 202
    assert (await provider.get("/system/namespace/team-a")).status == 404
    assert "team-a" not in await (await provider.get("/system/namespaces")).json()


async def test_a_profile_is_stored_replaced_and_deleted_with_its_function(
    provider: TestClient,
) -> None:
    missing = await provider.get("/system/profiles/echo")
    assert missing.status == 404 and "echo" in await missing.text()
    unknown = await provider.put("/system/profiles/echo", json=a_profile("echo.openfaas-fn"))
    assert unknown.status == 404, "no profile for a function nobody deployed"
    assert await faas_cli_deploy(provider, ECHO) == 202
    none_yet = await provider.get("/system/profiles/echo")
    assert none_yet.status == 404 and "fast-gshare profile" in await none_yet.text()
    assert (
        await provider.put("/system/profiles/echo", json=a_profile("echo.openfaas-fn"))
    ).status == 202
    stored = await (await provider.get("/system/profiles/echo?namespace=openfaas-fn")).json()
    assert stored == {**a_profile("echo.openfaas-fn"), "measurements": stored["measurements"],
                      "open_loop": []}  # fmt: skip
    assert [m["throughput_rps"] for m in stored["measurements"]] == [300.0, 520.0]
    replaced = a_profile("echo.openfaas-fn", gpu_model="NVIDIA H100 80GB HBM3")
    assert (await provider.put("/system/profiles/echo", json=replaced)).status == 202
    again = await (await provider.get("/system/profiles/echo")).json()
    assert again["gpu_model"] == "NVIDIA H100 80GB HBM3", "re-profiling replaces the profile"
    for bad, says in (
        (a_profile("other.openfaas-fn"), "not echo.openfaas-fn"),
        ({**a_profile("echo.openfaas-fn"), "measurements": []}, "measurements"),
        ({**a_profile("echo.openfaas-fn"), "gpu_model": ""}, "gpu_model"),
    ):
        refused = await provider.put("/system/profiles/echo", json=bad)
        assert refused.status == 400 and says in await refused.text(), says
    kept = await (await provider.get("/system/profiles/echo")).json()
    assert kept["gpu_model"] == "NVIDIA H100 80GB HBM3", "a refused profile changes nothing"
    assert (await provider.delete("/system/functions", json={"functionName": "echo"})).status == 202
    assert await faas_cli_deploy(provider, ECHO) == 202
    gone = await provider.get("/system/profiles/echo")
    assert gone.status == 404, "a function deployed anew starts without the old profile"
