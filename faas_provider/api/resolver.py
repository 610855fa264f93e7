"""Turning a function name into the address of one of its ready replicas, round robin.

In the provider process the endpoint lists come straight from the backend; in an extra worker
process they come from the provider over its control socket and are kept for a short while,
so the hot path costs no round trip. A caller that could not connect asks again with
`fresh=True`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

EndpointSource = Callable[[str, str], Awaitable[list[str]]]
ENDPOINT_TTL_S = 1.0  # how long an extra worker keeps the endpoint lists it was given


class Resolver:
    """Round-robin choice among the ready replicas of each function."""

    def __init__(self, source: EndpointSource, ttl_s: float = 0.0) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._cache: dict[tuple[str, str], tuple[float, list[str]]] = {}
        self._turns: dict[tuple[str, str], int] = {}

    async def resolve(self, name: str, namespace: str, fresh: bool = False) -> str:
        """Base URL of a ready replica of `name` in `namespace` (backend errors pass through)."""
        key = (namespace, name)
        cached = self._cache.get(key)
        now = time.monotonic()
        if fresh or cached is None or now - cached[0] > self._ttl_s:
            urls = await self._source(name, namespace)
            if self._ttl_s > 0:
                self._cache[key] = (now, urls)
        else:
            urls = cached[1]
        turn = (self._turns.get(key, -1) + 1) % len(urls)
        self._turns[key] = turn
        return urls[turn]
