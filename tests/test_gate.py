"""The gate and the token service over their real Unix socket: loss and return of the service,
a dead gate's share given back, the gate's HTTP front."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from faas_provider.gate.__main__ import create_gate_app
from faas_provider.gate.gate import QuotaGate, Registration, SchedulerUnavailable
from faas_provider.gate.service import TokenService


def _gate(socket: Path, client: str, sm: int = 100) -> QuotaGate:
    return QuotaGate(socket, Registration("GPU-test", client, sm, 1.0, 1.0), linger_s=0.001)


@contextlib.asynccontextmanager
async def two_gates(
    tmp_path: Path, window_s: float, first: str, second: str
) -> AsyncIterator[tuple[QuotaGate, QuotaGate]]:
    """A token service and two whole-GPU gates registered with it; all closed afterwards."""
    socket = tmp_path / "tokens.sock"
    service = TokenService(window_s=window_s)
    await service.start(socket)
    gates = _gate(socket, first), _gate(socket, second)
    try:
        for gate in gates:
            await gate.connect()
        yield gates
    finally:
        for gate in gates:
            await gate.close()
        await service.close()


async def test_a_dead_gate_gives_its_share_back(tmp_path: Path) -> None:
    async with two_gates(tmp_path, 0.1, "holder", "waiter") as (holder, waiter):
        await holder.__aenter__()  # a request of the holder is running: it has the token
        entered = asyncio.Event()

        async def wait_for_token() -> None:
            async with waiter:
                entered.set()

        task = asyncio.create_task(wait_for_token())
        await asyncio.sleep(0.03)
        assert not entered.is_set(), "100% + 100% of the SMs: the waiter must wait"
        await holder.close()  # the holder's process dies with its request unfinished
        await asyncio.wait_for(entered.wait(), 1.0)
        await task


async def test_the_gate_answers_503_without_its_token_service_and_recovers(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    async def replica(request: web.Request) -> web.Response:
        return web.Response(text="done")

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", replica)
    upstream = await aiohttp_client(upstream_app)
    socket = tmp_path / "tokens.sock"
    service = TokenService()
    await service.start(socket)
    gate = _gate(socket, "replica-0")
    await gate.connect()
    base = f"http://{upstream.host}:{upstream.port}"
    client = await aiohttp_client(create_gate_app(base, gate, upstream_timeout_s=10))

    assert await (await client.post("/work", data=b"x")).text() == "done"
    assert (await client.get("/_/health")).status == 200, "health is the replica's"
    await service.close()
    await asyncio.sleep(0.05)  # past the idle linger: the next request must ask again
    refused = await client.post("/work", data=b"x")
    assert refused.status == 503
    assert refused.headers["X-OpenFaaS-Internal"] == "proxy"
    assert "token service" in await refused.text()

    service = TokenService()
    await service.start(socket)
    try:
        assert await (await client.post("/work", data=b"x")).text() == "done"
    finally:
        await service.close()


async def test_connecting_to_no_service_is_a_clear_error(tmp_path: Path) -> None:
    gate = _gate(tmp_path / "absent.sock", "lonely")
    try:
        await gate.connect()
    except SchedulerUnavailable as error:
        assert "absent.sock" in str(error)
    else:
        raise AssertionError("connect() must fail without a token service")


async def test_a_busy_gate_keeps_its_token_across_windows_until_a_neighbour_waits(
    tmp_path: Path,
) -> None:
    async with two_gates(tmp_path, 0.02, "busy", "neighbour") as (busy, neighbour):
        await busy.__aenter__()  # a long request, running across many windows
        await asyncio.sleep(0.05)
        # Its lease ran out long ago, but nobody else wants the GPU: a second request starts
        # at once, without waiting for the first to finish.
        await asyncio.wait_for(busy.__aenter__(), 0.01)
        await busy.__aexit__(None, None, None)

        neighbour_in = asyncio.create_task(neighbour.__aenter__())
        await asyncio.sleep(0.05)
        assert not neighbour_in.done(), "100% + 100% of the SMs: the neighbour waits"
        # Now the renewal is refused: the busy gate admits nothing new until it has let go.
        third = asyncio.create_task(busy.__aenter__())
        await asyncio.sleep(0.05)
        assert not third.done()
        await busy.__aexit__(None, None, None)  # the long request ends; the token goes
        await asyncio.wait_for(neighbour_in, 0.5)
        assert not third.done(), "the neighbour runs first"
        await neighbour.__aexit__(None, None, None)
        await asyncio.wait_for(third, 0.5)
        await busy.__aexit__(None, None, None)


async def test_an_idle_gate_keeps_its_token_until_a_neighbour_needs_the_room(
    tmp_path: Path,
) -> None:
    async with two_gates(tmp_path, 1.0, "idler", "neighbour") as (idler, neighbour):
        asked: list[str] = []
        ask = idler._ask

        async def counted(op: str) -> float:
            asked.append(op)
            return await ask(op)

        idler._ask = counted  # type: ignore[method-assign]
        async with idler:
            pass
        await asyncio.sleep(0.05)  # idle well past its linger
        async with idler:
            pass
        assert asked == ["acquire"], "the second request ran on the token kept while idle"
        await asyncio.sleep(0.05)

        # 100% + 100% of the SMs: the neighbour's turn needs the idle gate's token.
        await asyncio.wait_for(neighbour.__aenter__(), 0.5)
        following = asyncio.create_task(idler.__aenter__())
        await asyncio.sleep(0.05)
        assert not following.done(), "the token went to the neighbour"
        assert asked == ["acquire", "acquire"]
        await neighbour.__aexit__(None, None, None)
        await asyncio.sleep(0.05)  # the neighbour idles: now it is asked to yield
        await asyncio.wait_for(following, 0.5)
        await idler.__aexit__(None, None, None)
