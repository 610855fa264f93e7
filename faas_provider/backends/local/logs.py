"""In-memory log store of the local backend: a bounded history per function plus live followers."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import NamedTuple

from faas_provider.backends.base import LogQuery
from faas_provider.models import LogMessage

_FOLLOWER_QUEUE = 10_000


class _Line(NamedTuple):
    """A stored line: cheap to keep, made into a LogMessage only when read."""

    timestamp: float
    instance: str
    text: str


class LogStore:
    """Keeps the last `history` lines of each function and fans new lines out to followers."""

    def __init__(self, history: int = 10_000) -> None:
        self._history = history
        self._lines: dict[tuple[str, str], deque[_Line]] = {}
        self._followers: dict[tuple[str, str], set[asyncio.Queue[_Line]]] = {}

    def append(self, name: str, namespace: str, instance: str, text: str) -> None:
        """Record one line written by replica `instance` of a function."""
        line = _Line(time.time(), instance, text)
        key = (namespace, name)
        lines = self._lines.get(key)
        if lines is None:
            lines = self._lines[key] = deque(maxlen=self._history)
        lines.append(line)
        for queue in self._followers.get(key, ()):
            if queue.full():
                queue.get_nowait()  # a follower that reads too slowly loses its oldest lines
            queue.put_nowait(line)

    def forget(self, name: str, namespace: str) -> None:
        """Drop a deleted function's history."""
        self._lines.pop((namespace, name), None)

    async def read(self, query: LogQuery) -> AsyncIterator[LogMessage]:
        """Stored lines matching `query` (the last `tail` of them), then new ones if following."""
        key = (query.namespace, query.name)
        queue: asyncio.Queue[_Line] = asyncio.Queue(_FOLLOWER_QUEUE)
        if query.follow:
            self._followers.setdefault(key, set()).add(queue)
        since = query.since.timestamp() if query.since is not None else None
        try:
            stored = [line for line in self._lines.get(key, ()) if _matches(line, query, since)]
            if query.tail is not None:
                stored = stored[-query.tail :]
            for line in stored:
                yield _message(line, query)
            while query.follow:
                line = await queue.get()
                if _matches(line, query, since):
                    yield _message(line, query)
        finally:
            followers = self._followers.get(key)
            if followers is not None:
                followers.discard(queue)


def _matches(line: _Line, query: LogQuery, since: float | None) -> bool:
    if query.instance and line.instance != query.instance:
        return False
    return since is None or line.timestamp >= since


def _message(line: _Line, query: LogQuery) -> LogMessage:
    return LogMessage(
        name=query.name,
        namespace=query.namespace,
        instance=line.instance,
        timestamp=datetime.fromtimestamp(line.timestamp, UTC),
        text=line.text,
    )
