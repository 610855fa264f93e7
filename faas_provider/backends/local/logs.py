"""In-memory log store of the local backend: a bounded history per function plus live followers."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from faas_provider.backends.base import LogQuery
from faas_provider.models import LogMessage, utcnow

_FOLLOWER_QUEUE = 10_000


class LogStore:
    """Keeps the last `history` lines of each function and fans new lines out to followers."""

    def __init__(self, history: int = 10_000) -> None:
        self._history = history
        self._lines: dict[tuple[str, str], deque[LogMessage]] = {}
        self._followers: dict[tuple[str, str], set[asyncio.Queue[LogMessage]]] = {}

    def append(self, name: str, namespace: str, instance: str, text: str) -> None:
        """Record one line written by replica `instance` of a function."""
        message = LogMessage(
            name=name, namespace=namespace, instance=instance, timestamp=utcnow(), text=text
        )
        key = (namespace, name)
        self._lines.setdefault(key, deque(maxlen=self._history)).append(message)
        for queue in self._followers.get(key, ()):
            if queue.full():
                queue.get_nowait()  # a follower that reads too slowly loses its oldest lines
            queue.put_nowait(message)

    def forget(self, name: str, namespace: str) -> None:
        """Drop a deleted function's history."""
        self._lines.pop((namespace, name), None)

    async def read(self, query: LogQuery) -> AsyncIterator[LogMessage]:
        """Stored lines matching `query` (the last `tail` of them), then new ones if following."""
        key = (query.namespace, query.name)
        queue: asyncio.Queue[LogMessage] = asyncio.Queue(_FOLLOWER_QUEUE)
        if query.follow:
            self._followers.setdefault(key, set()).add(queue)
        try:
            stored = [m for m in self._lines.get(key, ()) if _matches(m, query)]
            if query.tail is not None:
                stored = stored[-query.tail :]
            for message in stored:
                yield message
            while query.follow:
                message = await queue.get()
                if _matches(message, query):
                    yield message
        finally:
            followers = self._followers.get(key)
            if followers is not None:
                followers.discard(queue)


def _matches(message: LogMessage, query: LogQuery) -> bool:
    if query.instance and message.instance != query.instance:
        return False
    return query.since is None or message.timestamp >= query.since
