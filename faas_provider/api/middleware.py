"""Cross-cutting concerns wrapped around every handler in one place: errors and auth (the
metrics' middleware is faas_provider/metrics.py's)."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from faas_provider.errors import ProviderError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PREFIXES = ("/function/", "/healthz", "/metrics")


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "invalid request: " + "; ".join(parts)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn backend errors and invalid bodies into clear plain-text answers."""
    try:
        return await handler(request)
    except ProviderError as error:
        return web.Response(status=error.status, text=str(error))
    except ValidationError as error:
        return web.Response(status=400, text=describe_validation_error(error))


def basic_auth(user: str, password: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """faas-provider's basic auth: everything but /function/*, /healthz and /metrics.

    Requests on the provider's Unix control socket are trusted: only its own worker
    processes (which check auth themselves) and the local user can reach it.
    """
    expected_user, expected_password = user.encode(), password.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(OPEN_PREFIXES) or on_unix_socket(request):
            return await handler(request)
        given_user, given_password = _credentials(request.headers.get("Authorization", ""))
        user_ok = hmac.compare_digest(given_user, expected_user)
        password_ok = hmac.compare_digest(given_password, expected_password)
        if not (user_ok and password_ok):
            return web.Response(
                status=401,
                text="invalid credentials",
                headers={"WWW-Authenticate": 'Basic realm="Restricted"'},
            )
        return await handler(request)

    return check


def on_unix_socket(request: web.Request) -> bool:
    """Whether `request` came in on the provider's Unix control socket."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


def _credentials(header: str) -> tuple[bytes, bytes]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return b"", b""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b"", b""
    user, _, password = decoded.partition(b":")
    return user, password
