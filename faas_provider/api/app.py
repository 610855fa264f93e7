"""The provider's aiohttp application: the whole OpenFaaS provider API in one route table."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from faas_provider import __version__
from faas_provider.api import functions, logs, namespaces, profiles, proxy, secrets
from faas_provider.api.keys import AUTOSCALER, BACKEND, METRICS, RESOLVER, SETTINGS, UPSTREAM
from faas_provider.api.middleware import basic_auth, errors, on_unix_socket
from faas_provider.api.resolver import Resolver
from faas_provider.autoscale.loop import Autoscaler
from faas_provider.backends.base import Backend
from faas_provider.metrics import ProviderMetrics
from faas_provider.settings import Settings, read_basic_auth
from faas_provider.upstream import UpstreamPool

PROVIDER_NAME = "fast-gshare"


def create_app(backend: Backend, settings: Settings) -> web.Application:
    """Build the provider app around `backend`; it starts and closes the backend with itself."""
    metrics = ProviderMetrics()
    metrics.watch_replicas(backend.replica_counts)
    for collector in backend.metric_collectors():
        metrics.registry.register(collector)
    middlewares = [metrics.middleware, errors]
    if settings.basic_auth:
        middlewares.insert(0, basic_auth(*read_basic_auth(settings.secret_mount_path)))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024**2)
    app[BACKEND] = backend
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[RESOLVER] = Resolver(backend.endpoints)
    if settings.autoscale_tick_s is not None:
        autoscaler = Autoscaler(
            backend, metrics.latencies, metrics.gpu_models, tick_s=settings.autoscale_tick_s
        )
        metrics.registry.register(autoscaler.collector())
        app[AUTOSCALER] = autoscaler
    app.cleanup_ctx.append(_lifecycle)
    _source_sha()  # once, at start, not in a request
    app.add_routes(
        [
            web.get("/system/functions", functions.list_functions),
            web.post("/system/functions", functions.deploy),
            web.put("/system/functions", functions.update),
            web.delete("/system/functions", functions.delete),
            web.get("/system/function/{name}", functions.status),
            web.get("/system/endpoints/{name}", functions.endpoints),
            web.post("/system/scale-function/{name}", functions.scale),
            web.post("/system/scale-function", functions.scale),
            web.get("/system/info", info),
            web.get("/system/namespaces", namespaces.list_namespaces),
            web.get("/system/namespace/{name}", namespaces.get_namespace),
            web.post("/system/namespace/{name}", namespaces.create_namespace),
            web.post("/system/namespace/", namespaces.create_namespace),  # name in the body
            web.put("/system/namespace/{name}", namespaces.update_namespace),
            web.delete("/system/namespace/{name}", namespaces.delete_namespace),
            web.get("/system/secrets", secrets.list_secrets),
            web.post("/system/secrets", secrets.create_secret),
            web.put("/system/secrets", secrets.update_secret),
            web.delete("/system/secrets", secrets.delete_secret),
            web.get("/system/logs", logs.logs),
            web.get("/system/profiles/{name}", profiles.get_profile),
            web.put("/system/profiles/{name}", profiles.put_profile),
            web.get("/healthz", healthz),  # also answers HEAD
            web.get("/metrics", metrics_handler),
            web.put("/system/workers/{worker}/metrics", worker_metrics),  # control socket only
            web.route("*", r"/function/{service:[-a-zA-Z_0-9.]+}", proxy.invoke),
            web.route("*", r"/function/{service:[-a-zA-Z_0-9.]+}/{path:.*}", proxy.invoke),
        ]
    )
    return app


def create_metrics_app(provider: web.Application) -> web.Application:
    """An app that serves `provider`'s /metrics and nothing else: for a second address."""
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(provider[METRICS].registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    app[UPSTREAM] = UpstreamPool()
    await app[BACKEND].start()
    autoscaling = None
    if AUTOSCALER in app:
        autoscaling = asyncio.create_task(app[AUTOSCALER].run())
    try:
        yield
    finally:
        if autoscaling is not None:
            autoscaling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await autoscaling
        await app[BACKEND].close()
        await app[UPSTREAM].close()


async def info(request: web.Request) -> web.Response:
    """GET /system/info: faas-cli version reads version.release and version.sha."""
    return web.json_response(
        {
            "provider": PROVIDER_NAME,
            "orchestration": request.app[BACKEND].orchestration,
            "version": {"sha": _source_sha(), "release": __version__},
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """GET/HEAD /healthz."""
    return web.Response(text="OK")


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def worker_metrics(request: web.Request) -> web.Response:
    """PUT /system/workers/{worker}/metrics: a worker's counts (faas_provider/metrics.py), on
    the provider's control socket only."""
    if not on_unix_socket(request):
        return web.Response(status=403, text="workers report on the provider's control socket")
    request.app[METRICS].report(request.match_info["worker"], await request.text())
    return web.Response(status=204)


@functools.cache
def _source_sha() -> str:
    """The git commit the provider runs from, or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"
