"""The proxy's HTTP/1.1 client against scripted servers: framing, reuse, streaming, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from faas_provider.forwarding import forward
from faas_provider.upstream import ConnectFailed, UpstreamError, UpstreamPool, parse_base_url

Script = Callable[[bytes], list[bytes]]


class ScriptedServer:
    """A TCP server that answers each request head with scripted bytes and counts connections."""

    def __init__(self, answer: Script, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                for piece in self.answer(head):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(connect_timeout_s=2)
    yield pool
    await pool.close()


async def _get(pool: UpstreamPool, address: tuple[str, int], method: str = "GET") -> tuple:
    async with pool.request(address, method, "/x?a=1", CIMultiDict(), None) as response:
        return response.status, response.headers, await response.read()


def test_parse_base_url() -> None:
    assert parse_base_url("http://127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_base_url("http://[::1]:80/") == ("::1", 80)
    assert parse_base_url("unix:/run/x.sock") == "/run/x.sock"


async def test_content_length_answers_reuse_one_connection(pool: UpstreamPool) -> None:
    script = ScriptedServer(
        lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello"]
    )
    async with script as address:
        for _ in range(3):
            status, headers, body = await _get(pool, address)
            assert (status, headers["X-A"], body) == (200, "b", b"hello")
    assert script.connections == 1
    assert script.requests[0].startswith(b"GET /x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_chunked_answers_arrive_piece_by_piece(pool: UpstreamPool) -> None:
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nfirst\r\n"]
    pieces += [b"6;ext=1\r\nsecond\r\n", b"0\r\nTrailer: x\r\n\r\n"]
    script = ScriptedServer(lambda _: pieces)
    async with script as address:
        async with pool.request(address, "GET", "/", CIMultiDict(), None) as response:
            assert response.length is None
            assert [chunk async for chunk in response.chunks()] == [b"first", b"second"]
        assert (await _get(pool, address))[2] == b"firstsecond"
    assert script.connections == 1


async def test_answer_ended_by_close_and_informational_answers(pool: UpstreamPool) -> None:
    pieces = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"until ", b"close"]
    async with ScriptedServer(lambda _: pieces, close_after=True) as address:
        assert await _get(pool, address) == (200, CIMultiDict(), b"until close")


async def test_head_204_and_304_have_no_body(pool: UpstreamPool) -> None:
    answers = {
        b"HEAD": b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        b"GET ": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"PUT ": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
    }
    script = ScriptedServer(lambda head: [answers[head[:4]]])
    async with script as address:
        status, headers, body = await _get(pool, address, "HEAD")
        assert (status, headers["Content-Length"], body) == (200, "99", b"")
        assert (await _get(pool, address, "GET"))[::2] == (204, b"")
        assert (await _get(pool, address, "PUT"))[::2] == (304, b"")
    assert script.connections == 1


async def test_streamed_request_bodies_are_sent_chunked(pool: UpstreamPool) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/", echo)
    server = TestServer(app)
    await server.start_server()
    try:

        async def pieces() -> AsyncIterator[bytes]:
            for index in range(50):
                yield b"%d," % index

        headers = CIMultiDict({"X-Test": "1"})
        address = (server.host, server.port)
        async with pool.request(address, "POST", "/", headers, pieces()) as response:
            assert await response.read() == b"".join(b"%d," % i for i in range(50))
        async with pool.request(address, "POST", "/", headers, b"whole") as response:
            assert await response.read() == b"whole"
    finally:
        await server.close()


async def test_a_connection_lost_midway_is_an_error_and_not_reused(pool: UpstreamPool) -> None:
    script = ScriptedServer(
        lambda _: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], close_after=True
    )
    async with script as address:
        with pytest.raises(UpstreamError, match="closed"):
            await _get(pool, address)
        with pytest.raises(UpstreamError, match="closed"):
            await _get(pool, address)
    assert script.connections == 2


async def test_malformed_answers_are_errors(pool: UpstreamPool) -> None:
    async with ScriptedServer(lambda _: [b"SPDY/9 what\r\n\r\n"]) as address:
        with pytest.raises(UpstreamError, match="malformed status line"):
            await _get(pool, address)


async def test_nothing_listening_is_connect_failed(pool: UpstreamPool) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    address = probe.sockets[0].getsockname()[:2]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectFailed):
        await _get(pool, address)


async def test_a_partly_read_answer_closes_its_connection(pool: UpstreamPool) -> None:
    body = b"y" * 100_000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    script = ScriptedServer(lambda _: [head, body[:50_000], body[50_000:]])
    async with script as address:
        async with pool.request(address, "GET", "/", CIMultiDict(), None) as response:
            async for _ in response.chunks():
                break
        assert (await _get(pool, address))[2] == body
    assert script.connections == 2


async def test_forward_streams_an_answer_of_unknown_length_as_it_comes(
    aiohttp_client: Any,
) -> None:
    release = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await release.wait()
        await response.write(b"data: two\n\n")
        return response

    upstream_app = web.Application()
    upstream_app.router.add_get("/", events)
    upstream = TestServer(upstream_app)
    await upstream.start_server()

    async def through(request: web.Request) -> web.StreamResponse:
        return await forward(request, pool, f"http://{upstream.host}:{upstream.port}", "/", 30.0)

    pool = UpstreamPool()
    app = web.Application()
    app.router.add_get("/", through)
    client = await aiohttp_client(app)
    try:
        response = await client.get("/")
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first == b"data: one\n\n", "the first event must arrive before the stream ends"
        release.set()
        assert await response.content.read() == b"data: two\n\n"
    finally:
        await pool.close()
        await upstream.close()
