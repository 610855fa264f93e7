"""Handlers for /system/namespaces and /system/namespace/{name}."""

from __future__ import annotations

from aiohttp import web

from faas_provider.api.keys import BACKEND
from faas_provider.api.params import dns_label, read_model
from faas_provider.models import NamespaceRequest


def _name(request: web.Request, body: NamespaceRequest | None = None) -> str:
    return dns_label(
        request.match_info.get("name") or (body.name if body else None) or "", "namespace"
    )


async def list_namespaces(request: web.Request) -> web.Response:
    """GET /system/namespaces: a JSON array of names."""
    return web.json_response(await request.app[BACKEND].list_namespaces())


async def get_namespace(request: web.Request) -> web.Response:
    """GET /system/namespace/{name}: name, labels and annotations."""
    return web.json_response(await request.app[BACKEND].get_namespace(_name(request)))


async def create_namespace(request: web.Request) -> web.Response:
    """POST /system/namespace/{name}, or /system/namespace/ with the name in the body (as
    faas-cli sends it): 201, or 409 when it exists."""
    body = await read_model(request, NamespaceRequest) if request.can_read_body else None
    body = body or NamespaceRequest()
    name = _name(request, body)
    await request.app[BACKEND].create_namespace(name, body.labels, body.annotations)
    return web.Response(status=201)


async def update_namespace(request: web.Request) -> web.Response:
    """PUT /system/namespace/{name}: replace labels and annotations."""
    body = await read_model(request, NamespaceRequest)
    await request.app[BACKEND].update_namespace(_name(request), body.labels, body.annotations)
    return web.Response(status=202)


async def delete_namespace(request: web.Request) -> web.Response:
    """DELETE /system/namespace/{name}: 409 while functions use it."""
    await request.app[BACKEND].delete_namespace(_name(request))
    return web.Response(status=202)
