"""Handlers for /system/profiles/{name} (fast-gshare's own): a function's profile, as
`fast-gshare profile` stores it and the autoscaler reads it."""

from __future__ import annotations

from aiohttp import web

from faas_provider.api.keys import AUTOSCALER, BACKEND
from faas_provider.api.params import dns_label, namespace_param, read_model
from faas_provider.profile.model import Profile


async def get_profile(request: web.Request) -> web.Response:
    """GET /system/profiles/{name}?namespace=: the profile; 404 when the function or its
    profile is unknown."""
    name = dns_label(request.match_info["name"], "name")
    profile = await request.app[BACKEND].get_profile(name, namespace_param(request))
    return web.json_response(profile.model_dump(mode="json"))


async def put_profile(request: web.Request) -> web.Response:
    """PUT /system/profiles/{name}?namespace=: store (replace) the function's profile; 400
    when it is not one or names another function, 404 when the function is unknown."""
    name = dns_label(request.match_info["name"], "name")
    namespace = namespace_param(request)
    profile = await read_model(request, Profile)
    if profile.function != f"{name}.{namespace}":
        raise web.HTTPBadRequest(
            text=f"the profile is of {profile.function}, not {name}.{namespace}"
        )
    await request.app[BACKEND].store_profile(name, namespace, profile)
    if AUTOSCALER in request.app:
        request.app[AUTOSCALER].profile_changed(profile.function)
    return web.Response(status=202)
