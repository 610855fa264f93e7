"""The time-quota gate: a reverse proxy in front of one GPU replica that runs requests only
while the replica holds a token of its GPU's scheduler.

A request that finds no valid lease waits for one; requests that start under a lease run to
the end even past it (the scheduler charges the overrun as debt). When the lease is over, the
gate asks to renew it; when the scheduler says no, no new request starts until the running
ones finish, the token is returned and a new one is granted. A gate idle for a short linger
(default 2 ms) tells the scheduler so and keeps its token, uncharged: its next request starts
without a round trip. It gives the token back when the scheduler asks it to (someone waits for
the room it keeps), or when its lease is over at the end of a request.
The same gate runs as a sidecar on Kubernetes and as a process beside each replica locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger("fast_gshare.gate")


class SchedulerUnavailable(Exception):
    """The token service cannot be reached."""


@dataclass(frozen=True)
class Registration:
    """Who the gate speaks for: the GPU, the replica and its share."""

    gpu: str
    client: str
    sm_percent: int
    quota_request: float
    quota_limit: float


class QuotaGate:
    """Admits requests while this replica holds a token; `async with gate:` around each one."""

    def __init__(self, socket_path: Path, registration: Registration, linger_s: float = 0.002):
        self._socket_path = socket_path
        self._registration = registration
        self._linger_s = linger_s
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._answer: asyncio.Future[float] | None = None
        self._condition = asyncio.Condition()
        self._holding = False
        self._idle_reported = False
        self._lease_end = 0.0
        self._renewal_refused = False
        self._in_flight = 0
        self._linger: asyncio.TimerHandle | None = None

    async def connect(self) -> None:
        """Connect and register with the token service."""
        try:
            reader, self._writer = await asyncio.open_unix_connection(self._socket_path)
        except OSError as error:
            raise SchedulerUnavailable(f"token service at {self._socket_path}: {error}") from error
        r = self._registration
        hello = {
            "gpu": r.gpu,
            "client": r.client,
            "sm": r.sm_percent,
            "request": r.quota_request,
            "limit": r.quota_limit,
        }
        self._writer.write(json.dumps(hello).encode() + b"\n")
        self._holding = self._idle_reported = False
        self._reading = asyncio.create_task(self._read(reader, self._writer))

    @property
    def connected(self) -> bool:
        """Whether the gate is registered with a live token service."""
        return self._writer is not None and not self._writer.is_closing()

    async def close(self) -> None:
        """Leave the token service (which returns any token held)."""
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._condition:
            if self._idle_reported:  # it kept its token while idle and runs again
                self._idle_reported = False
                self._send(b'{"op": "busy"}\n')
            while not (self._holding and loop.time() < self._lease_end):
                if self._holding and not self._renewal_refused:
                    lease = await self._ask("renew")
                    self._renewal_refused = lease == 0
                    self._lease_end = loop.time() + lease
                elif self._holding and self._in_flight:
                    await self._condition.wait()  # lease over: let the running ones finish
                elif self._holding:
                    self._release()
                else:
                    lease = await self._ask("acquire")
                    self._holding, self._renewal_refused = True, False
                    self._lease_end = loop.time() + lease
            self._in_flight += 1
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        async with self._condition:
            self._in_flight -= 1
            if self._in_flight == 0 and self._holding:
                if loop.time() >= self._lease_end:
                    self._release()
                else:
                    self._linger = loop.call_later(self._linger_s, self._report_idle)
            self._condition.notify_all()

    async def _ask(self, op: str) -> float:
        """Send `acquire` or `renew`; the lease granted, in seconds (0: renewal refused)."""
        if not self.connected:
            await self.connect()
        assert self._writer is not None
        self._answer = asyncio.get_running_loop().create_future()
        try:
            self._writer.write(b'{"op": "%s"}\n' % op.encode())
            return await self._answer
        except ConnectionError as error:
            self._writer.close()
            raise SchedulerUnavailable(f"token service connection lost: {error}") from error
        finally:
            self._answer = None

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The service's answers to `_ask`, and its requests to yield, until the connection
        ends; then the token is gone with it."""
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if message.get("op") == "yield":
                    if self._idle_reported and self._in_flight == 0 and self._answer is None:
                        self._release()
                elif self._answer is not None and not self._answer.done():
                    self._answer.set_result(float(message["lease_s"]))
        except (ConnectionError, ValueError, KeyError) as error:
            log.warning("token service connection: %s", error)
        finally:
            writer.close()
            if self._writer is writer:
                self._holding = self._idle_reported = False
                if self._answer is not None and not self._answer.done():
                    lost = SchedulerUnavailable("token service closed the connection")
                    self._answer.set_exception(lost)

    def _send(self, message: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(message)

    def _release(self) -> None:
        self._holding = self._idle_reported = False
        self._send(b'{"op": "release"}\n')

    def _report_idle(self) -> None:
        self._linger = None
        if self._in_flight == 0 and self._holding and self._answer is None:
            self._idle_reported = True
            self._send(b'{"op": "idle"}\n')
