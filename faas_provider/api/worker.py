"""An extra worker process of the provider, so invocations can use more than one core.

Workers share the provider's listening port (SO_REUSEPORT: the kernel spreads connections
across them). A worker proxies /function/* itself, resolving replicas through the provider's
control socket with a short cache, and passes every other request through to the provider
unchanged, so there is one backend, one state and one auth check. It counts the calls it
proxies and reports the counts to the provider process, whose /metrics serves the sums.
The provider starts them (`python -m faas_provider.api.worker`); they are not a user command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web
from multidict import CIMultiDict

from faas_provider.api import proxy
from faas_provider.api.keys import METRICS, RESOLVER, SETTINGS, UPSTREAM
from faas_provider.api.limits import BodyTooLarge, system_limit
from faas_provider.api.middleware import basic_auth
from faas_provider.api.resolver import ENDPOINT_TTL_S, EndpointSource, Resolver
from faas_provider.errors import NotFound, Unavailable
from faas_provider.forwarding import bad_gateway, forward
from faas_provider.metrics import REPORT_INTERVAL_S, ProviderMetrics
from faas_provider.processes import watch_parent
from faas_provider.settings import Settings, read_basic_auth
from faas_provider.upstream import UpstreamError, UpstreamPool, parse_base_url

log = logging.getLogger("fast_gshare.worker")


def create_worker_app(settings: Settings, control_socket: Path) -> web.Application:
    """A worker app that talks to the provider listening on the Unix socket `control_socket`.

    The worker checks basic auth itself: the provider trusts what reaches its Unix socket.
    """
    metrics = ProviderMetrics(counted_prefix="/function/")
    middlewares = [metrics.middleware]
    if settings.basic_auth:
        middlewares.append(basic_auth(*read_basic_auth(settings.secret_mount_path)))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024**2)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    control = f"unix:{control_socket}"

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        pool = UpstreamPool()
        app[UPSTREAM] = pool
        app[RESOLVER] = Resolver(_endpoint_source(pool, control), ttl_s=ENDPOINT_TTL_S)
        reporting = asyncio.create_task(_report_metrics(pool, control, metrics))
        try:
            yield
        finally:
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting
            await _send_metrics(pool, control, metrics)  # the last counts, before it goes
            await pool.close()

    async def to_provider(request: web.Request) -> web.StreamResponse:
        """Pass a non-invocation request through to the provider process unchanged."""
        try:
            settings = request.app[SETTINGS]
            return await forward(
                request,
                request.app[UPSTREAM],
                control,
                request.raw_path,
                settings.upstream_timeout_s,
                system_limit(settings),
            )
        except BodyTooLarge as error:
            return web.Response(status=error.status, text=str(error))
        except (UpstreamError, TimeoutError) as error:
            return bad_gateway("the provider process", error)

    app.cleanup_ctx.append(lifecycle)
    app.add_routes(
        [
            web.route("*", r"/function/{service:[-a-zA-Z_0-9.]+}", proxy.invoke),
            web.route("*", r"/function/{service:[-a-zA-Z_0-9.]+}/{path:.*}", proxy.invoke),
            web.route("*", "/{tail:.*}", to_provider),
        ]
    )
    return app


async def _report_metrics(pool: UpstreamPool, control: str, metrics: ProviderMetrics) -> None:
    """Send this worker's counts to the provider process every REPORT_INTERVAL_S."""
    while True:
        await asyncio.sleep(REPORT_INTERVAL_S)
        await _send_metrics(pool, control, metrics)


async def _send_metrics(pool: UpstreamPool, control: str, metrics: ProviderMetrics) -> None:
    target = f"/system/workers/{os.getpid()}/metrics"
    headers = CIMultiDict({"Content-Type": "text/plain"})
    try:
        async with pool.request(
            parse_base_url(control), "PUT", target, headers, metrics.exposition()
        ) as response:
            await response.read()
    except UpstreamError as error:
        log.warning("worker %d could not report its metrics: %s", os.getpid(), error)


def _endpoint_source(pool: UpstreamPool, control: str) -> EndpointSource:
    address = parse_base_url(control)

    async def fetch(name: str, namespace: str) -> list[str]:
        target = f"/system/endpoints/{name}?{urlencode({'namespace': namespace})}"
        async with pool.request(address, "GET", target, CIMultiDict(), None) as response:
            text = (await response.read()).decode()
        if response.status == 404:
            raise NotFound(text)
        if response.status != 200:
            raise Unavailable(text)
        return json.loads(text)["urls"]

    return fetch


async def serve_worker(settings: Settings, control_socket: Path, parent_pid: int) -> None:
    """Run one worker on the shared port until the provider process that started it is gone."""
    runner = web.AppRunner(create_worker_app(settings, control_socket), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port, reuse_port=True).start()
    try:
        await watch_parent(
            parent_pid, lambda: log.warning("provider %d is gone; worker exiting", parent_pid)
        )
    finally:
        await runner.cleanup()


class WorkerPool:
    """The provider's extra worker processes, restarted when one exits, stopped with it."""

    def __init__(self, settings: Settings, control_socket: Path, count: int) -> None:
        self._argv = [
            sys.executable,
            "-m",
            "faas_provider.api.worker",
            f"--control-socket={control_socket}",
            f"--host={settings.host}",
            f"--port={settings.port}",
            f"--parent-pid={os.getpid()}",
            f"--secret-mount-path={settings.secret_mount_path}",
            f"--max-system-body={settings.max_system_body}",
            f"--max-function-body={settings.max_function_body}",
        ] + (["--basic-auth"] if settings.basic_auth else [])
        self._count = count
        self._tasks: list[asyncio.Task[None]] = []
        self._processes: dict[int, asyncio.subprocess.Process] = {}

    def start(self) -> None:
        """Start the workers."""
        self._tasks = [asyncio.create_task(self._supervise(i)) for i in range(self._count)]

    async def stop(self) -> None:
        """Stop the workers and wait for them to exit."""
        for task in self._tasks:
            task.cancel()
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        await asyncio.gather(*(p.wait() for p in self._processes.values()))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _supervise(self, index: int) -> None:
        while True:
            process = await asyncio.create_subprocess_exec(*self._argv)
            self._processes[index] = process
            log.info("worker %d started (pid %d)", index + 1, process.pid)
            code = await process.wait()
            log.warning("worker %d exited (code %s); restarting in 1 s", index + 1, code)
            await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process, as `WorkerPool` starts it."""
    parser = argparse.ArgumentParser(prog="python -m faas_provider.api.worker")
    parser.add_argument("--control-socket", type=Path, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--basic-auth", action="store_true")
    parser.add_argument("--secret-mount-path", type=Path, required=True)
    parser.add_argument("--max-system-body", type=int, required=True)
    parser.add_argument("--max-function-body", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings(
        host=args.host,
        port=args.port,
        basic_auth=args.basic_auth,
        secret_mount_path=args.secret_mount_path,
        max_system_body=args.max_system_body,
        max_function_body=args.max_function_body,
    )
    asyncio.run(serve_worker(settings, args.control_socket, args.parent_pid))


if __name__ == "__main__":
    main()
