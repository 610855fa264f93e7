"""Forwarding one HTTP request to an upstream and passing its answer back, as faas-provider's
proxy does: no redirects followed, status and headers copied, Content-Type the response's else
the request's else text/plain, X-Forwarded-Host/-For added, the answer streamed as it comes.

Used by the provider's invocation proxy and worker processes and by the time-quota gate, which
runs as a sidecar and imports nothing of the provider API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from faas_provider.upstream import UpstreamError, UpstreamPool, parse_base_url

log = logging.getLogger("fast_gshare.proxy")

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
SERVER_TIMING = "Server-Timing"  # the W3C header a browser's developer tools show


class BodyLimit(Protocol):
    """A limit on request bodies (api/limits.py has the provider's)."""

    def check_length(self, request: web.Request) -> None:
        """Raise when the stated Content-Length is past the limit."""

    def stream(self, request: web.Request) -> AsyncIterator[bytes]:
        """The body as it arrives, raising as soon as it passes the limit."""


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


def bad_gateway(what: str, error: Exception) -> web.Response:
    """502 with `X-OpenFaaS-Internal: proxy` for an upstream that failed, logged in a line."""
    reason = str(error) or type(error).__name__
    log.warning("%s did not answer: %s", what, reason)
    return web.Response(status=502, text=f"{what} did not answer: {reason}", headers=INTERNAL)


async def forward(
    request: web.Request,
    pool: UpstreamPool,
    base: str,
    target: str,
    timeout_s: float,
    limit: BodyLimit | None = None,
    timing: str | None = None,
) -> web.StreamResponse:
    """Send `request` to `target` on the upstream at `base` through `pool`, and pass the
    answer back, with `timing` added as a Server-Timing entry; TimeoutError when it is not
    whole within `timeout_s`.

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
    async with (
        asyncio.timeout(timeout_s),
        pool.request(
            parse_base_url(base), request.method, target, _request_headers(request), body
        ) as upstream,
    ):
        headers = _without_hop_by_hop(upstream.headers)
        if timing is not None:
            headers.add(SERVER_TIMING, timing)
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
