"""Handlers for /system/secrets: names only on GET, never values."""

from __future__ import annotations

from aiohttp import web

from faas_provider.api.keys import BACKEND
from faas_provider.api.params import namespace_param, read_model
from faas_provider.models import Secret


async def list_secrets(request: web.Request) -> web.Response:
    """GET /system/secrets?namespace=: `[{"name", "namespace"}]`."""
    secrets = await request.app[BACKEND].list_secrets(namespace_param(request))
    return web.json_response([{"name": s.name, "namespace": s.namespace} for s in secrets])


async def _secret(request: web.Request) -> Secret:
    secret = await read_model(request, Secret)
    secret.namespace = namespace_param(request, secret.namespace)
    return secret


async def create_secret(request: web.Request) -> web.Response:
    """POST /system/secrets: 201, or 409 when it exists."""
    await request.app[BACKEND].create_secret(await _secret(request))
    return web.Response(status=201)


async def update_secret(request: web.Request) -> web.Response:
    """PUT /system/secrets: 202, or 404 when unknown."""
    await request.app[BACKEND].update_secret(await _secret(request))
    return web.Response(status=202)


async def delete_secret(request: web.Request) -> web.Response:
    """DELETE /system/secrets: body `{"name", "namespace"}`."""
    secret = await _secret(request)
    await request.app[BACKEND].delete_secret(secret.name, secret.namespace or "")
    return web.Response(status=202)
