"""Handlers for /system/functions, /system/function/{name} and /system/scale-function/{name}."""

from __future__ import annotations

from aiohttp import web

from faas_provider.api.keys import BACKEND
from faas_provider.api.params import dns_label, namespace_param, read_model
from faas_provider.models import (
    DeleteFunctionRequest,
    FunctionDeployment,
    ScaleServiceRequest,
)


async def list_functions(request: web.Request) -> web.Response:
    """GET /system/functions: always a JSON array."""
    functions = await request.app[BACKEND].list_functions(namespace_param(request))
    return web.json_response([f.to_wire() for f in functions])


async def deploy(request: web.Request) -> web.Response:
    """POST /system/functions: create; 409 when the function exists."""
    deployment = await read_model(request, FunctionDeployment)
    await request.app[BACKEND].deploy(deployment)
    return web.Response(status=202)


async def update(request: web.Request) -> web.Response:
    """PUT /system/functions: replace; 404 when unknown, so faas-cli falls back to POST."""
    deployment = await read_model(request, FunctionDeployment)
    await request.app[BACKEND].update(deployment)
    return web.Response(status=202)


async def delete(request: web.Request) -> web.Response:
    """DELETE /system/functions: name in the body, namespace in the body or the query."""
    body = await read_model(request, DeleteFunctionRequest)
    namespace = namespace_param(request, body.namespace)
    await request.app[BACKEND].delete(body.function_name, namespace)
    return web.Response(status=202)


async def status(request: web.Request) -> web.Response:
    """GET /system/function/{name}: 404 naming the function and namespace when unknown."""
    name = request.match_info["name"]
    function = await request.app[BACKEND].get_function(name, namespace_param(request))
    return web.json_response(function.to_wire())


async def scale(request: web.Request) -> web.Response:
    """POST /system/scale-function/{name}: name from the URL or serviceName."""
    body = await read_model(request, ScaleServiceRequest)
    name = dns_label(request.match_info.get("name") or body.service_name or "", "function name")
    namespace = namespace_param(request, body.namespace)
    await request.app[BACKEND].scale(name, namespace, body.replicas)
    return web.Response(status=202)


async def endpoints(request: web.Request) -> web.Response:
    """GET /system/endpoints/{name} (fast-gshare's own): the ready replicas' base URLs.

    Worker processes resolve invocations from this; it waits for a starting replica as an
    invocation would, and answers 404 / 503 when the function is unknown / has none ready.
    """
    name = request.match_info["name"]
    urls = await request.app[BACKEND].endpoints(name, namespace_param(request))
    return web.json_response({"urls": urls})
