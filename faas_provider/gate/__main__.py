"""`python -m faas_provider.gate`: run the time-quota gate in front of one replica.

    python -m faas_provider.gate --upstream http://127.0.0.1:8080 --token-socket /run/x.sock \\
        --gpu GPU-1234 --client resnet50-0 --sm 14 --request 1 --limit 1 \\
        [--host 127.0.0.1] [--port 0]

Prints `Listening on port: N` once it serves; `/_/health` answers as the upstream's does.
Each answer it passes on tells, in a `Server-Timing: gate-wait;dur=MS` entry, how long the
request waited for its GPU's token.
It imports nothing of the provider API: on Kubernetes it is the function pod's sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

from faas_provider.forwarding import INTERNAL, bad_gateway, forward
from faas_provider.gate.gate import WAIT_TIMING, QuotaGate, SchedulerUnavailable
from faas_provider.gate.registration import BadRegistration, Registration
from faas_provider.processes import watch_parent
from faas_provider.upstream import UpstreamError, UpstreamPool, parse_base_url

UPSTREAM = web.AppKey("upstream", UpstreamPool)


def create_gate_app(upstream: str, gate: QuotaGate, upstream_timeout_s: float) -> web.Application:
    """The gate's app: every request but the health check passes the gate, then the replica."""
    app = web.Application(client_max_size=64 * 1024**2)

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
        arrived = time.perf_counter()
        try:
            async with gate:
                waited_ms = (time.perf_counter() - arrived) * 1000
                return await forward(
                    request,
                    request.app[UPSTREAM],
                    upstream,
                    request.raw_path,
                    upstream_timeout_s,
                    timing=f"{WAIT_TIMING};dur={waited_ms:.3f}",
                )
        except SchedulerUnavailable as error:
            return web.Response(status=503, text=str(error), headers=INTERNAL)
        except (UpstreamError, TimeoutError) as error:
            return bad_gateway("the replica", error)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/_/health", health)
    app.router.add_route("*", "/{tail:.*}", through_gate)
    return app


async def _serve(args: argparse.Namespace) -> None:
    registration = Registration.from_args(args)
    gate = QuotaGate(args.token_socket, registration, linger_s=args.linger_ms / 1000)
    await gate.connect()
    app = create_gate_app(args.upstream, gate, args.upstream_timeout)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.create_server((args.host, args.port), family=family)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The gate's command line."""
    parser = argparse.ArgumentParser(prog="python -m faas_provider.gate", description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL of the replica")
    parser.add_argument("--token-socket", type=Path, required=True, help="token service socket")
    Registration.add_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 lets the OS pick (default)")
    parser.add_argument("--linger-ms", type=float, default=2.0)
    parser.add_argument("--upstream-timeout", type=float, default=300.0)
    parser.add_argument("--parent-pid", type=int, default=0)
    return parser.parse_args(argv)


def main() -> None:
    """Entry point of `python -m faas_provider.gate`."""
    args = parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        asyncio.run(_serve(args))
    except (SchedulerUnavailable, BadRegistration) as error:
        raise SystemExit(f"gate: {error}") from error


if __name__ == "__main__":
    main()
