"""The invocation proxy: /function/{name}[.{namespace}][/path] to a ready replica.

The request is forwarded as faas-provider's proxy does (faas_provider/forwarding.py). Unknown
function: 404. No reachable replica: 502/503 with `X-OpenFaaS-Internal: proxy` and a message
naming the function.
"""

from __future__ import annotations

import time

from aiohttp import web

from faas_provider.api.keys import METRICS, RESOLVER, SETTINGS, UPSTREAM
from faas_provider.api.limits import BodyTooLarge, function_limit
from faas_provider.errors import NotFound, Unavailable
from faas_provider.forwarding import INTERNAL, bad_gateway, forward
from faas_provider.models import DEFAULT_NAMESPACE
from faas_provider.upstream import ConnectFailed, UpstreamError

ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})


def split_name(service: str) -> tuple[str, str]:
    """`name.namespace` split on the last dot; a bare name is in the default namespace."""
    name, dot, namespace = service.rpartition(".")
    if not dot:
        return service, DEFAULT_NAMESPACE
    return name, namespace or DEFAULT_NAMESPACE


async def invoke(request: web.Request) -> web.StreamResponse:
    """Forward one invocation to a ready replica of the named function."""
    if request.method not in ALLOWED_METHODS:
        raise web.HTTPMethodNotAllowed(request.method, sorted(ALLOWED_METHODS))
    service = request.match_info["service"]
    name, namespace = split_name(service)
    where = f"{name}.{namespace}"
    resolver = request.app[RESOLVER]
    settings = request.app[SETTINGS]
    limit = function_limit(settings)
    pool, timeout_s = request.app[UPSTREAM], settings.upstream_timeout_s
    # The path and query exactly as the caller encoded them, less /function/<service>.
    target = request.raw_path[len("/function/") + len(service) :]
    if not target.startswith("/"):
        target = "/" + target
    started = time.perf_counter()
    try:
        base = await resolver.resolve(name, namespace)
        try:
            response = await forward(request, pool, base, target, timeout_s, limit)
        except ConnectFailed:
            # The replica went away before the request reached it: another may take it.
            base = await resolver.resolve(name, namespace, fresh=True)
            response = await forward(request, pool, base, target, timeout_s, limit)
    except BodyTooLarge as error:
        response = web.Response(status=error.status, text=str(error), headers=INTERNAL)
    except NotFound:  # not counted: a name nobody deployed is no function's invocation
        return web.Response(status=404, text=f"function {where} not found")
    except Unavailable as error:
        response = web.Response(status=503, text=str(error), headers=INTERNAL)
    except (UpstreamError, TimeoutError) as error:
        response = bad_gateway(f"function {where}", error)
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.invoked(name, namespace, response.status, time.perf_counter() - started)
    return response
