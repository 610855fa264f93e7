"""Request body limits: a body past its limit gets 413 before it is read whole.

`/system/*` carries JSON and `/function/*` whatever a function takes, so each has a limit of
its own (`--max-system-body`, `--max-function-body`). A body that states its length is refused
before a byte of it is read; one sent chunked is counted as it arrives and refused as soon as
it passes the limit. The proxy streams large bodies to the replica: one refused on the way
ends that connection, so the replica never sees the request whole and never runs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from faas_provider.errors import ProviderError
from faas_provider.settings import Settings


class BodyTooLarge(ProviderError):
    """The request body is past the provider's limit for its route (413)."""

    status = 413


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a request body of some routes may have, and the setting that says so."""

    max_bytes: int
    routes: str
    option: str  # the flag without its leading dashes; with "_" for "-", the environment variable

    def refusal(self) -> BodyTooLarge:
        """The 413 error: the limit and how to change it."""
        return BodyTooLarge(
            f"request body too large: {self.routes} takes at most {quantity(self.max_bytes)} "
            f"({self.max_bytes} bytes); send less, or start the provider with --{self.option} "
            f"(or the environment variable {self.option.replace('-', '_')}) set higher, "
            f"e.g. --{self.option} {quantity(2 * self.max_bytes)}"
        )

    def check_length(self, request: web.Request) -> None:
        """Refuse a body whose Content-Length is past the limit, before reading any of it."""
        if request.content_length is not None and request.content_length > self.max_bytes:
            raise self.refusal()

    async def read(self, request: web.Request) -> bytes:
        """The whole body, refused as soon as it passes the limit."""
        return b"".join([chunk async for chunk in self.stream(request)])

    async def stream(self, request: web.Request) -> AsyncIterator[bytes]:
        """The body piece by piece as it arrives, refused as soon as it passes the limit."""
        self.check_length(request)
        seen = 0
        async for chunk in request.content.iter_any():
            seen += len(chunk)
            if seen > self.max_bytes:
                raise self.refusal()
            yield chunk


def system_limit(settings: Settings) -> BodyLimit:
    """The limit of every route but /function/*."""
    return BodyLimit(settings.max_system_body, "/system/*", "max-system-body")


def function_limit(settings: Settings) -> BodyLimit:
    """The limit of invocations, /function/*."""
    return BodyLimit(settings.max_function_body, "/function/*", "max-function-body")


def quantity(count: int) -> str:
    """`count` bytes as a quantity in the largest binary unit that divides it: 2Mi, 1536Ki."""
    for unit, size in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if count % size == 0:
            return f"{count // size}{unit}"
    return str(count)
