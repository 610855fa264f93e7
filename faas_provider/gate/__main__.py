"""`python -m faas_provider.gate`: run the time-quota gate in front of one replica.

    python -m faas_provider.gate --upstream http://127.0.0.1:8080 --token-socket /run/x.sock \\
        --gpu GPU-1234 --client resnet50-0 --sm 14 --request 1 --limit 1 [--port 0]

Prints `Listening on port: N` once it serves; `/_/health` answers as the upstream's does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

from faas_provider.api import proxy
from faas_provider.api.keys import SETTINGS, UPSTREAM
from faas_provider.gate.gate import QuotaGate, Registration, SchedulerUnavailable
from faas_provider.processes import watch_parent
from faas_provider.settings import Settings
from faas_provider.upstream import UpstreamError, UpstreamPool, parse_base_url

GATE = web.AppKey("gate", QuotaGate)


def create_gate_app(upstream: str, gate: QuotaGate, upstream_timeout_s: float) -> web.Application:
    """The gate's app: every request but the health check passes the gate, then the replica."""
    app = web.Application(client_max_size=64 * 1024**2)
    app[SETTINGS] = Settings(upstream_timeout_s=upstream_timeout_s)
    app[GATE] = gate

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAM] = UpstreamPool()
        try:
            yield
        finally:
            await app[UPSTREAM].close()
            await gate.close()

    async def health(request: web.Request) -> web.Response:
        try:
            async with request.app[UPSTREAM].request(
                parse_base_url(upstream), "GET", "/_/health", CIMultiDict(), None
            ) as answer:
                body = await answer.read()
                return web.Response(status=answer.status, body=body)
        except UpstreamError:
            return web.Response(status=503, text="the replica does not answer")

    async def through_gate(request: web.Request) -> web.StreamResponse:
        try:
            async with gate:
                return await proxy.forward(request, upstream, request.raw_path)
        except SchedulerUnavailable as error:
            return web.Response(status=503, text=str(error), headers=proxy.INTERNAL)
        except (UpstreamError, TimeoutError) as error:
            return proxy.bad_gateway("the replica", error)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/_/health", health)
    app.router.add_route("*", "/{tail:.*}", through_gate)
    return app


async def _serve(args: argparse.Namespace) -> None:
    registration = Registration(args.gpu, args.client, args.sm, args.request, args.limit)
    gate = QuotaGate(args.token_socket, registration, linger_s=args.linger_ms / 1000)
    await gate.connect()
    app = create_gate_app(args.upstream, gate, args.upstream_timeout)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = socket.socket()
    listener.bind(("127.0.0.1", args.port))
    await web.SockSite(runner, listener).start()
    print(f"Listening on port: {listener.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if args.parent_pid:
        watcher = asyncio.create_task(watch_parent(args.parent_pid, stop.set))
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()


def main() -> None:
    """Entry point of `python -m faas_provider.gate`."""
    parser = argparse.ArgumentParser(prog="python -m faas_provider.gate", description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL of the replica")
    parser.add_argument("--token-socket", type=Path, required=True, help="token service socket")
    parser.add_argument("--gpu", required=True, help="GPU UUID (or virtual GPU name)")
    parser.add_argument("--client", required=True, help="this replica's name")
    parser.add_argument("--sm", type=int, required=True, help="SM partition, percent")
    parser.add_argument("--request", type=float, required=True, help="guaranteed time share")
    parser.add_argument("--limit", type=float, required=True, help="most time share")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--linger-ms", type=float, default=2.0)
    parser.add_argument("--upstream-timeout", type=float, default=300.0)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        asyncio.run(_serve(args))
    except SchedulerUnavailable as error:
        raise SystemExit(f"gate: {error}") from error


if __name__ == "__main__":
    main()
