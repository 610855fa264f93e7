"""Handler for /system/logs: NDJSON, one flushed line per message, optionally following."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime

from aiohttp import web

from faas_provider.api.keys import BACKEND
from faas_provider.api.params import namespace_param
from faas_provider.backends.base import LogQuery

_DISCONNECT_CHECK_S = 1.0


def _query(request: web.Request) -> LogQuery:
    params = request.query
    name = params.get("name", "")
    if not name:
        raise web.HTTPBadRequest(text="query parameter name is required: ?name=<function>")
    tail: int | None = None
    if params.get("tail"):
        try:
            tail = int(params["tail"])  # as faas-provider: <= 0 means every line
        except ValueError:
            raise web.HTTPUnprocessableEntity(
                text=f"tail must be a whole number of lines, not {params['tail']!r}"
            ) from None
    since: datetime | None = None
    if params.get("since"):
        try:
            since = datetime.fromisoformat(params["since"])
            if since.tzinfo is None:
                raise ValueError("no time zone")
        except ValueError:
            raise web.HTTPUnprocessableEntity(
                text=f"since must be an RFC 3339 time such as 2026-01-02T15:04:05Z, "
                f"not {params['since']!r}"
            ) from None
    follow = params.get("follow", "").lower() in ("1", "true", "yes")
    return LogQuery(
        name=name,
        namespace=namespace_param(request),
        instance=params.get("instance") or None,
        tail=tail if tail is not None and tail > 0 else None,
        since=since,
        follow=follow,
    )


async def logs(request: web.Request) -> web.StreamResponse:
    """GET /system/logs?name=&namespace=&instance=&tail=&since=&follow=; 404 for unknown names."""
    query = _query(request)
    backend = request.app[BACKEND]
    await backend.get_function(query.name, query.namespace)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)

    async def pump() -> None:
        async for message in backend.logs(query):
            line = json.dumps(message.to_wire(), separators=(",", ":")) + "\n"
            await response.write(line.encode())

    # Nothing else tells a follower that its client went away while no line comes.
    task = asyncio.ensure_future(pump())
    while not task.done():
        await asyncio.wait({task}, timeout=_DISCONNECT_CHECK_S)
        transport = request.transport
        if transport is None or transport.is_closing():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
                await task
            return response
    with contextlib.suppress(ConnectionResetError):
        task.result()
        await response.write_eof()
    return response
