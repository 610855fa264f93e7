"""Request body limits: past its limit a body gets 413 before it is read whole, streamed or not,
on /system/* and through the invocation proxy, in the provider and in its worker processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from faas_provider.settings import Settings
from tests.conftest import ECHO, STEER, faas_cli_deploy, wait_available, wait_logged
from tests.test_cli import provider

SYSTEM_LIMIT = 64 * 1024
FUNCTION_LIMIT = 2 * 1024**2  # past the proxy's 1 MiB buffer: bodies of known size stream too
DEPLOY_HEAD = "POST /system/functions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"max_system_body": SYSTEM_LIMIT, "max_function_body": FUNCTION_LIMIT}
    )


async def _exchange(port: int, head: str, parts: list[bytes]) -> tuple[int, str, str]:
    """Send a request head and body parts on a new connection, without ending a body that is
    not whole; the answer's status, headers and body, read as soon as it comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + b"\r\n")
        for part in parts:
            writer.write(part)
            await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        head_lines = []
        while (line := await reader.readline()) not in (b"\r\n", b""):
            head_lines.append(line.decode().strip())
        length = next(
            int(h.split(":", 1)[1]) for h in head_lines if h.lower().startswith("content-length")
        )
        body = await reader.readexactly(length)
        return int(status_line.split()[1]), "\n".join(head_lines), body.decode()
    finally:
        writer.close()


def _chunked(total: int, piece: int = 16 * 1024) -> list[bytes]:
    """`total` bytes as chunks, without the last (empty) chunk that would end the body."""
    sizes = [piece] * (total // piece) + ([total % piece] if total % piece else [])
    return [b"%x\r\n%s\r\n" % (size, b"x" * size) for size in sizes]


async def _function_names(client: TestClient) -> list[str]:
    return [f["name"] for f in await (await client.get("/system/functions")).json()]


async def test_a_deploy_past_the_limit_by_its_length_is_refused_before_it_is_sent(
    client: TestClient,
) -> None:
    head = DEPLOY_HEAD + f"Content-Length: {10 * 1024**3}\r\n"
    status, _, text = await _exchange(client.port, head, [b'{"service": "big", "image": "'])
    assert status == 413
    assert "/system/* takes at most 64Ki (65536 bytes)" in text
    assert "--max-system-body" in text and "max_system_body" in text
    assert await _function_names(client) == []


async def test_a_chunked_deploy_past_the_limit_is_refused_as_it_passes_it(
    client: TestClient,
) -> None:
    head = DEPLOY_HEAD + "Transfer-Encoding: chunked\r\n"
    status, _, text = await _exchange(client.port, head, _chunked(SYSTEM_LIMIT + 1024))
    assert status == 413
    assert "--max-system-body" in text
    assert await _function_names(client) == []


async def test_a_deploy_just_under_the_limit_is_read(client: TestClient) -> None:
    def deployment(padding: str) -> bytes:
        labels = {"com.openfaas.scale.min": "0", "padding": padding}
        return json.dumps({**ECHO, "labels": labels}).encode()

    body = deployment("p" * (SYSTEM_LIMIT - len(deployment(""))))
    assert len(body) == SYSTEM_LIMIT
    answer = await client.post("/system/functions", data=body)
    assert answer.status == 202, await answer.text()
    assert await _function_names(client) == ["echo"]


async def test_an_invocation_past_the_limit_by_its_length_never_reaches_the_replica(
    client: TestClient,
) -> None:
    assert await faas_cli_deploy(client, STEER) == 202
    await wait_available(client, "steer")
    first = await (await client.post("/function/steer", data=b"")).json()
    head = f"POST /function/steer HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * 1024**3}\r\n"
    status, headers, text = await _exchange(client.port, head, [b"x" * 1024])
    assert status == 413
    assert "X-OpenFaaS-Internal: proxy" in headers
    assert "/function/* takes at most 2Mi" in text and "--max-function-body" in text
    after = await (await client.post("/function/steer", data=b"")).json()
    assert (after["pid"], after["calls"]) == (first["pid"], first["calls"] + 1)


async def test_a_chunked_invocation_past_the_limit_is_cut_before_the_replica_runs_it(
    client: TestClient,
) -> None:
    assert await faas_cli_deploy(client, STEER) == 202
    await wait_available(client, "steer")
    first = await (await client.post("/function/steer", data=b"")).json()
    head = "POST /function/steer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    status, headers, text = await _exchange(client.port, head, _chunked(FUNCTION_LIMIT + 1))
    assert status == 413
    assert "X-OpenFaaS-Internal: proxy" in headers
    assert "--max-function-body" in text
    # the replica got part of the body, never the whole request: it ran nothing and lives on
    after = await (await client.post("/function/steer", data=b"")).json()
    assert (after["pid"], after["calls"]) == (first["pid"], first["calls"] + 1)
    logs = await wait_logged(client, "steer", "Request body cut short")
    assert "Traceback" not in logs


async def test_invocations_just_under_the_limit_pass_whole(client: TestClient) -> None:
    assert await faas_cli_deploy(client, ECHO) == 202
    await wait_available(client, "echo")
    body = bytes(range(256)) * (FUNCTION_LIMIT // 256)
    by_length = await client.post("/function/echo", data=body)
    assert by_length.status == 200
    assert await by_length.read() == body

    async def pieces():
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    chunked = await client.post("/function/echo", data=pieces())
    assert chunked.status == 200
    assert await chunked.read() == body


def test_worker_processes_hold_the_limits(tmp_path: Path) -> None:
    limits = ["--max-system-body", "16Ki", "--max-function-body", "32Ki"]
    with provider(tmp_path, "--workers", "2", *limits) as (_, port):

        async def refused() -> list[tuple[int, str]]:
            answers = []
            for _ in range(8):  # new connections, spread over both processes by the kernel
                for head, size in (
                    ("POST /function/echo HTTP/1.1\r\nHost: x\r\n", 32 * 1024 + 1),
                    (DEPLOY_HEAD, 16 * 1024 + 1),
                ):
                    chunked = head + "Transfer-Encoding: chunked\r\n"
                    status, _, text = await _exchange(port, chunked, _chunked(size, 4096))
                    answers.append((status, text))
            return answers

        for status, text in asyncio.run(refused()):
            assert status == 413, text
            assert "takes at most 16Ki" in text or "takes at most 32Ki" in text
