"""Contract tests for the invocation proxy /function/{name}[.{namespace}][/path]."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from faas_provider.api.proxy import split_name
from tests.conftest import ECHO, STEER, faas_cli_deploy, wait_available, wait_logged

# An fprocess that answers with the watchdog's request environment.
ENV_DUMP = {"service": "envdump", "image": "example/envdump", "envProcess": "env"}


def test_split_name_on_the_last_dot() -> None:
    assert split_name("echo") == ("echo", "openfaas-fn")
    assert split_name("echo.team-a") == ("echo", "team-a")
    assert split_name("v1.2.team") == ("v1.2", "team")


async def test_gateway_invoke_sequence_status_then_name_dot_namespace(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "echo")
    status = await client.get("/system/function/echo?namespace=openfaas-fn&usage=false")
    assert status.status == 200
    answer = await client.post(
        "/function/echo.openfaas-fn", data=b"hello world", headers={"X-Call-Id": "call-42"}
    )
    assert answer.status == 200
    assert await answer.read() == b"hello world"
    assert float(answer.headers["X-Duration-Seconds"]) >= 0


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_all_seven_methods_reach_the_function(client: TestClient, method: str) -> None:
    assert await faas_cli_deploy(client, ENV_DUMP) == 202
    await wait_available(client, "envdump")
    response = await client.request(method, "/function/envdump/some/path?x=1&y=two", data=b"")
    assert response.status == 200
    if method != "HEAD":
        env = await response.text()
        assert f"Http_Method={method}" in env
        assert "Http_Path=/some/path" in env
        assert "Http_Query=x=1&y=two" in env


async def test_other_methods_are_405(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    response = await client.request("PROPFIND", "/function/echo")
    assert response.status == 405


async def test_headers_reach_the_function_and_forwarded_headers_are_added(
    client: TestClient,
) -> None:
    assert await faas_cli_deploy(client, ENV_DUMP) == 202
    await wait_available(client, "envdump")
    response = await client.post(
        "/function/envdump",
        data=b"{}",
        headers={"X-Call-Id": "abc-123", "Content-Type": "application/json"},
    )
    env = await response.text()
    assert "Http_X_Call_Id=abc-123" in env
    assert "Http_Content_Type=application/json" in env
    assert "Http_X_Forwarded_Host=" in env
    assert "Http_X_Forwarded_For=127.0.0.1" in env
    assert response.headers["Content-Type"].startswith("application/json")


async def test_unknown_function_is_404(client: TestClient) -> None:
    response = await client.post("/function/nope", data=b"x")
    assert response.status == 404
    assert "nope" in await response.text()


async def test_large_bodies_stream_through(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "echo")
    payload = bytes(range(256)) * 40_000  # 10 MB
    response = await client.post("/function/echo", data=payload)
    assert response.status == 200
    assert await response.read() == payload


async def test_crash_mid_request_is_502_and_other_functions_keep_serving(
    client: TestClient,
) -> None:
    assert await faas_cli_deploy(client, STEER) == 202
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "steer")
    await wait_available(client, "echo")

    async def echo_loop() -> list[int]:
        codes = []
        for _ in range(40):
            response = await client.post("/function/echo", data=b"ping")
            codes.append(response.status)
            await asyncio.sleep(0.01)
        return codes

    others = asyncio.create_task(echo_loop())
    crashed = await client.post("/function/steer", data=b"crash")
    assert crashed.status == 502
    assert crashed.headers["X-OpenFaaS-Internal"] == "proxy"
    assert "steer" in await crashed.text()
    assert set(await others) == {200}, "a crash of one function must not lose another's requests"
    # the restart shows in the logs, and the restarted replica serves again
    await wait_logged(client, "steer", "restarting")
    await wait_available(client, "steer")
    again = await client.post("/function/steer", data=b"")
    assert again.status == 200
    metrics = await (await client.get("/metrics")).text()
    exited = (
        'fast_gshare_function_restarts_total{function_name="steer.openfaas-fn",reason="exited"}'
    )
    assert f"{exited} 1.0" in metrics, "the restart shows in /metrics, with its reason"


async def test_no_cookie_or_header_of_one_call_reaches_another(client: TestClient) -> None:
    assert await faas_cli_deploy(client, STEER) == 202
    await wait_available(client, "steer")
    setting = await client.post("/function/steer", data=b"cookie")
    assert setting.headers["Set-Cookie"] == "session=abc", "the caller gets the cookie"
    client.session.cookie_jar.clear()
    later = await client.post("/function/steer", data=b"", skip_auto_headers=["Accept"])
    body = await later.json()
    assert body["cookie"] is None, "the provider must not keep one caller's cookies for another"
    assert body["accept"] is None, "the provider must not add headers the caller did not send"


async def test_encoded_paths_and_queries_reach_the_function_as_sent(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ENV_DUMP) == 202
    await wait_available(client, "envdump")
    response = await client.get("/function/envdump/files/a%20b%3Fc?q=x%26y&r=1")
    env = await response.text()
    assert "Http_Path=/files/a b?c" in env  # decoded, as Go's URL.Path is
    assert "Http_Query=q=x%26y&r=1" in env  # raw, as the watchdog passes it


async def test_a_replica_that_exits_at_start_says_why(
    client: TestClient, functions_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (functions_root / "needs-torch").mkdir()
    (functions_root / "needs-torch" / "handler.py").write_text("import torch_not_here\n")
    deployment = {"service": "needs-torch", "image": "example/needs-torch:1"}
    assert await faas_cli_deploy(client, deployment) == 202
    why = "ModuleNotFoundError: No module named 'torch_not_here'"
    logs = await wait_logged(client, "needs-torch", f"replica exited (code 1: {why}); restarting")
    assert why in logs
    assert f"replica needs-torch-0 exited (code 1: {why}); restarting in" in caplog.text


async def test_a_handler_directory_serves_its_image_whatever_envprocess_names(
    client: TestClient,
) -> None:
    # as the conformance suite deploys its golang-middleware redirector: the template's server
    # in envProcess; functions/redirector stands in for the image, and its 302 is not followed
    body = {
        "service": "redirector-test",
        "image": "docker.io/theaxer/redirector:latest",
        "envProcess": "./handler",
        "envVars": {"destination": "http://example.com"},
    }
    assert await faas_cli_deploy(client, body) == 202
    await wait_available(client, "redirector-test")
    answer = await client.get("/function/redirector-test", allow_redirects=False)
    assert answer.status == 302
    assert answer.headers["Location"] == "http://example.com"
