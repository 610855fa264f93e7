"""The gate and the token service over their real Unix socket: loss and return of the service,
a dead gate's share given back, the gate's HTTP front, admission while someone waits; the
gate's estimate of when the work it admitted ends, with numbers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from faas_provider.gate.__main__ import create_gate_app
from faas_provider.gate.gate import QuotaGate, SchedulerUnavailable, WorkEstimate
from faas_provider.gate.registration import Registration
from faas_provider.gate.service import TokenService


def _gate(socket: Path, client: str, sm: int = 100) -> QuotaGate:
    return QuotaGate(
        socket, Registration("GPU-test", client, sm, 1.0, 1.0, f"{client}.test"), linger_s=0.001
    )


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


async def test_each_answer_tells_how_long_it_waited_for_the_token(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    """In Server-Timing, beside the replica's own entries: 0.1 s held by a neighbour on the
    whole GPU shows as a wait of most of that (the request reaches the gate a little later)."""

    async def replica(request: web.Request) -> web.Response:
        return web.Response(text="done", headers={"Server-Timing": "model;dur=5"})

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", replica)
    upstream = await aiohttp_client(upstream_app)
    async with two_gates(tmp_path, 1.0, "holder", "waiter") as (holder, waiter):
        base = f"http://{upstream.host}:{upstream.port}"
        client = await aiohttp_client(create_gate_app(base, waiter, upstream_timeout_s=10))
        await holder.__aenter__()  # a request of the holder runs: it has the token
        call = asyncio.create_task(client.post("/work", data=b"x"))
        await asyncio.sleep(0.1)
        await holder.__aexit__(None, None, None)
        await holder.close()
        answer = await call
        assert await answer.text() == "done"
        timings = answer.headers.getall("Server-Timing")
    assert timings[0] == "model;dur=5", "the replica's own entry is kept"
    name, duration = timings[1].split(";dur=")
    assert name == "gate-wait" and float(duration) >= 80, timings


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


def test_the_work_estimate_of_requests_queued_on_one_device() -> None:
    work = WorkEstimate()
    for running in range(4):  # four requests start together; no pace known yet
        work.started(0.0, running)
    assert work.fits(0.0, 0.0), "before any request ended, nothing is known to overrun"
    work.finished(0.01, 3)  # they run one after another, 10 ms each
    assert work.pace_s == pytest.approx(0.01)
    # three still run: done at 40 ms; a fifth would end at 50
    assert work.fits(0.01, 0.05)
    assert not work.fits(0.01, 0.049)
    work.started(0.01, 3)
    assert not work.fits(0.01, 0.06 - 1e-6), "a sixth would end at 60 ms"
    for index, now in enumerate((0.02, 0.03, 0.04, 0.05)):
        work.finished(now, 3 - index)
    assert work.pace_s == pytest.approx(0.01)
    assert work.fits(0.05, 0.0601), "nothing runs: one request, 10 ms"
    assert not work.fits(0.05, 0.059)


def test_the_work_estimate_of_a_batch_is_its_cost_per_request() -> None:
    work = WorkEstimate()
    for batch in range(20):  # batches of four that take 20 ms each, back to back
        began = batch * 0.02
        for running in range(4):
            work.started(began, running)
        for running in (3, 2, 1, 0):
            work.finished(began + 0.02, running)
    assert work.pace_s == pytest.approx(0.005)
    for running in range(4):
        work.started(1.0, running)
    assert work.fits(1.0, 1.0251), "four more, one batch: 20 ms, and 5 for one more request"
    assert not work.fits(1.0, 1.024)


async def test_a_busy_gate_asked_to_yield_starts_only_what_ends_within_its_lease(
    tmp_path: Path,
) -> None:
    window_s, pace_s = 0.6, 0.03
    loop = asyncio.get_running_loop()
    origin = loop.time()  # the scheduler's first window starts a little later
    async with two_gates(tmp_path, window_s, "holder", "waiter") as (holder, waiter):
        device = asyncio.Lock()  # the holder's requests run one at a time, 30 ms each
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                async with holder, device:
                    await asyncio.sleep(pace_s)

        callers = [asyncio.create_task(caller()) for _ in range(4)]
        await asyncio.sleep(0.2)  # four requests in flight all along; the pace is known
        async with waiter:  # it waits for the holder's lease, to the window's end
            entered = loop.time()
            stop.set()
        await asyncio.gather(*callers)
    # Admitting every request while its lease lasted, the holder would drain up to four
    # requests (about 100 ms) past it; it started only what ends within it.
    assert entered - (origin + window_s) < 2 * pace_s


async def test_the_service_reports_the_gpu_time_charged_to_each_gate(tmp_path: Path) -> None:
    async with two_gates(tmp_path, 0.1, "worker", "idler") as (worker, _):
        for _ in range(3):
            async with worker:
                await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_unix_connection(tmp_path / "tokens.sock")
        writer.write(b'{"op": "stats"}\n')
        stats = json.loads(await reader.readline())
        assert await reader.read() == b"", "the service closes a stats connection"
        writer.close()
    charged = stats["GPU-test"]
    assert set(charged) == {"worker", "idler"}
    assert 0.15 <= charged["worker"] < 0.5, "three requests of 50 ms, and little else"
    assert charged["idler"] == 0.0


async def test_the_service_counts_how_long_each_functions_gates_waited_for_tokens(
    tmp_path: Path,
) -> None:
    socket = tmp_path / "tokens.sock"
    service = TokenService(window_s=1.0)
    await service.start(socket)
    holder, waiter = _gate(socket, "holder"), _gate(socket, "waiter")
    try:
        for gate in (holder, waiter):
            await gate.connect()
        await holder.__aenter__()  # holds the whole GPU
        entered = asyncio.Event()

        async def wait_for_token() -> None:
            async with waiter:
                entered.set()

        task = asyncio.create_task(wait_for_token())
        await asyncio.sleep(0.3)
        await holder.__aexit__(None, None, None)  # the waiter is granted once the holder is done
        await asyncio.wait_for(entered.wait(), 2.0)
        await task
        usage = {use.function: use for use in service.usage()}
        assert usage["holder.test"].grants == 1 and usage["holder.test"].waited_s < 0.1
        assert usage["waiter.test"].grants == 1
        assert 0.25 <= usage["waiter.test"].waited_s < 1.0, usage["waiter.test"]
    finally:
        for gate in (holder, waiter):
            await gate.close()
        await service.close()


async def test_the_service_hears_how_many_requests_wait_at_each_gate(tmp_path: Path) -> None:
    socket = tmp_path / "tokens.sock"
    service = TokenService(window_s=1.0)
    await service.start(socket)
    holder, waiter = _gate(socket, "holder"), _gate(socket, "waiter")

    def queued() -> dict[str, int]:
        return {use.function: use.queued for use in service.usage()}

    try:
        for gate in (holder, waiter):
            await gate.connect()
        await holder.__aenter__()  # holds the whole GPU: the waiter's requests queue
        release = asyncio.Event()

        async def request() -> None:
            async with waiter:
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(3)]
        await asyncio.sleep(QuotaGate.QUEUE_REPORT_S * 3)
        assert queued() == {"holder.test": 0, "waiter.test": 3}
        await holder.__aexit__(None, None, None)  # the waiter gets the token: all three start
        await asyncio.sleep(QuotaGate.QUEUE_REPORT_S * 3)
        assert queued() == {"holder.test": 0, "waiter.test": 0}
        release.set()
        await asyncio.gather(*tasks)
    finally:
        for gate in (holder, waiter):
            await gate.close()
        await service.close()
    assert queued() == {"holder.test": 0, "waiter.test": 0}, "gone gates queue nothing"
