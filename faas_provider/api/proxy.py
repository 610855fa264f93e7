"""The invocation proxy: /function/{name}[.{namespace}][/path] to a ready replica.

As faas-provider's proxy: no redirects followed, status and headers copied, Content-Type the
response's else the request's else text/plain, X-Forwarded-Host/-For added, the response
streamed as it comes. Unknown function: 404. No reachable replica: 502/503 with
`X-OpenFaaS-Internal: proxy` and a message naming the function.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from faas_provider.api.keys import RESOLVER, SETTINGS, UPSTREAM
from faas_provider.api.limits import BodyLimit, BodyTooLarge, function_limit
from faas_provider.backends.base import NotFound, Unavailable
from faas_provider.models import DEFAULT_NAMESPACE
from faas_provider.upstream import ConnectFailed, UpstreamError, parse_base_url

log = logging.getLogger("fast_gshare.proxy")

ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})
_HOP_BY_HOP = tuple(
    istr(h)
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
        hdrs.EXPECT,  # the proxy answers 100-continue itself
    )
)
INTERNAL = {"X-OpenFaaS-Internal": "proxy"}
BUFFER_LIMIT = 1024 * 1024


def split_name(service: str) -> tuple[str, str]:
    """`name.namespace` split on the last dot; a bare name is in the default namespace."""
    name, dot, namespace = service.rpartition(".")
    if not dot:
        return service, DEFAULT_NAMESPACE
    return name, namespace or DEFAULT_NAMESPACE


def _without_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    copy = headers.copy()
    for name in _HOP_BY_HOP:
        if name in copy:
            copy.popall(name)
    return copy


def _request_headers(request: web.Request) -> CIMultiDict[str]:
    headers = _without_hop_by_hop(request.headers)
    headers.popall(hdrs.CONTENT_LENGTH, None)  # set again for the body as it is sent
    headers["X-Forwarded-Host"] = request.host
    if request.remote:
        headers["X-Forwarded-For"] = request.remote
    return headers


async def invoke(request: web.Request) -> web.StreamResponse:
    """Forward one invocation to a ready replica of the named function."""
    if request.method not in ALLOWED_METHODS:
        raise web.HTTPMethodNotAllowed(request.method, sorted(ALLOWED_METHODS))
    service = request.match_info["service"]
    name, namespace = split_name(service)
    where = f"{name}.{namespace}"
    resolver = request.app[RESOLVER]
    limit = function_limit(request.app[SETTINGS])
    # The path and query exactly as the caller encoded them, less /function/<service>.
    target = request.raw_path[len("/function/") + len(service) :]
    if not target.startswith("/"):
        target = "/" + target
    try:
        base = await resolver.resolve(name, namespace)
        try:
            return await forward(request, base, target, limit)
        except ConnectFailed:
            # The replica went away before the request reached it: another may take it.
            base = await resolver.resolve(name, namespace, fresh=True)
            return await forward(request, base, target, limit)
    except BodyTooLarge as error:
        return web.Response(status=error.status, text=str(error), headers=INTERNAL)
    except NotFound:
        return web.Response(status=404, text=f"function {where} not found")
    except Unavailable as error:
        return web.Response(status=503, text=str(error), headers=INTERNAL)
    except (UpstreamError, TimeoutError) as error:
        return bad_gateway(f"function {where}", error)


def bad_gateway(what: str, error: Exception) -> web.Response:
    """502 with `X-OpenFaaS-Internal: proxy` for an upstream that failed, logged in a line."""
    reason = str(error) or type(error).__name__
    log.warning("%s did not answer: %s", what, reason)
    return web.Response(status=502, text=f"{what} did not answer: {reason}", headers=INTERNAL)


async def forward(
    request: web.Request, base: str, target: str, limit: BodyLimit | None = None
) -> web.StreamResponse:
    """Send `request` to `target` on the upstream at `base` and pass the answer back.

    Errors before the answer started are raised for the caller to report; later ones cut the
    response short. Bodies of known size up to BUFFER_LIMIT go whole, head and body in one
    write each way (on loopback every write is a system call that costs as much as the rest
    of the proxying); larger bodies and answers of unknown length (server-sent events,
    NDJSON) are streamed as they come. A body past `limit` raises BodyTooLarge: at once when
    its length says so, else when it passes the limit, which ends the upstream connection
    before the request is whole.
    """
    length = request.content_length
    if limit is not None:
        limit.check_length(request)
    if not request.body_exists:
        body: bytes | AsyncIterable[bytes] | None = None
    elif length is not None and length <= BUFFER_LIMIT:
        body = await request.read()
    elif limit is not None:
        body = limit.stream(request)
    else:
        body = request.content.iter_any()
    settings = request.app[SETTINGS]
    async with (
        asyncio.timeout(settings.upstream_timeout_s),
        request.app[UPSTREAM].request(
            parse_base_url(base), request.method, target, _request_headers(request), body
        ) as upstream,
    ):
        headers = _without_hop_by_hop(upstream.headers)
        if hdrs.CONTENT_TYPE not in headers:
            headers[hdrs.CONTENT_TYPE] = request.headers.get(hdrs.CONTENT_TYPE, "text/plain")
        if upstream.length is not None and upstream.length <= BUFFER_LIMIT:
            content = await upstream.read()
            if request.method != "HEAD":  # a HEAD answer keeps the length of the body it lacks
                headers.popall(hdrs.CONTENT_LENGTH, None)  # set again from the body
            return web.Response(
                status=upstream.status,
                reason=upstream.reason or None,
                headers=headers,
                body=content or None,
            )
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason or None, headers=headers
        )
        await response.prepare(request)
        try:
            async for chunk in upstream.chunks():
                await response.write(chunk)
        except (UpstreamError, TimeoutError) as error:
            log.warning("answer from %s cut short: %s", base, error or type(error).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
