"""The invocation proxy: /function/{name}[.{namespace}][/path] to a ready replica.

As faas-provider's proxy: no redirects followed, status and headers copied, Content-Type the
response's else the request's else text/plain, X-Forwarded-Host/-For added, the response
streamed as it comes. Unknown function: 404. No reachable replica: 502/503 with
`X-OpenFaaS-Internal: proxy` and a message naming the function.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from faas_provider.api.keys import RESOLVER, UPSTREAM
from faas_provider.backends.base import NotFound, Unavailable
from faas_provider.models import DEFAULT_NAMESPACE

log = logging.getLogger("fast_gshare.proxy")

ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION,
        hdrs.KEEP_ALIVE,
        hdrs.PROXY_AUTHENTICATE,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.TE,
        hdrs.TRAILER,
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
        hdrs.HOST,
    )
)
INTERNAL = {"X-OpenFaaS-Internal": "proxy"}


def split_name(service: str) -> tuple[str, str]:
    """`name.namespace` split on the last dot; a bare name is in the default namespace."""
    name, dot, namespace = service.rpartition(".")
    if not dot:
        return service, DEFAULT_NAMESPACE
    return name, namespace or DEFAULT_NAMESPACE


def _request_headers(request: web.Request) -> CIMultiDict[str]:
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
    )
    headers["X-Forwarded-Host"] = request.host
    if request.remote:
        headers["X-Forwarded-For"] = request.remote
    return headers


async def invoke(request: web.Request) -> web.StreamResponse:
    """Forward one invocation to a ready replica of the named function."""
    if request.method not in ALLOWED_METHODS:
        raise web.HTTPMethodNotAllowed(request.method, sorted(ALLOWED_METHODS))
    name, namespace = split_name(request.match_info["service"])
    where = f"{name}.{namespace}"
    resolver = request.app[RESOLVER]
    suffix = "/" + request.match_info.get("path", "")
    if request.query_string:
        suffix += f"?{request.query_string}"
    try:
        base = await resolver.resolve(name, namespace)
        try:
            return await forward(request, request.app[UPSTREAM], base + suffix)
        except aiohttp.ClientConnectorError:
            # The replica went away before the request reached it: another may take it.
            base = await resolver.resolve(name, namespace, fresh=True)
            return await forward(request, request.app[UPSTREAM], base + suffix)
    except NotFound:
        return web.Response(status=404, text=f"function {where} not found")
    except Unavailable as error:
        return web.Response(status=503, text=str(error), headers=INTERNAL)
    except (aiohttp.ClientError, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        log.warning("invocation of %s failed: %s", where, reason)
        return web.Response(
            status=502, text=f"function {where} did not answer: {reason}", headers=INTERNAL
        )


async def forward(
    request: web.Request, session: aiohttp.ClientSession, url: str
) -> web.StreamResponse:
    """Send `request` to `url` and stream the answer back; client errors before the answer
    started are raised for the caller to report, later ones cut the response short."""
    body = request.content if request.body_exists else None
    async with session.request(
        request.method,
        url,
        headers=_request_headers(request),
        data=body,
        allow_redirects=False,
        auto_decompress=False,
    ) as upstream:
        headers = CIMultiDict(
            (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        if hdrs.CONTENT_TYPE not in headers:
            headers[hdrs.CONTENT_TYPE] = request.headers.get(hdrs.CONTENT_TYPE, "text/plain")
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("answer from %s cut short: %s", url, error or type(error).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
