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

A replica may run several requests at once (handler threads, batches, forked processes) whose
work queues on the GPU, so the requests admitted under a lease can keep it busy well past the
lease's end, at the expense of whoever waits. While someone waits (the scheduler has asked the
gate to yield), the gate therefore starts a request only when nothing runs or when the work
admitted, at the replica's measured pace (busy time per completed request), is expected to end
by the lease's end. Nobody waiting, it admits every request as it comes.

The gate tells the token service how many requests wait at it to be admitted, when that
changes, at most every QUEUE_REPORT_S: the node agent's metrics show each function's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from pathlib import Path
from types import TracebackType

from faas_provider.gate.registration import Registration

log = logging.getLogger("fast_gshare.gate")

WAIT_TIMING = "gate-wait"  # the Server-Timing entry of each answer: how long it waited to start


class SchedulerUnavailable(Exception):
    """The token service cannot be reached."""


class WorkEstimate:
    """When the requests a replica is running will be done, from its measured pace. Pure: every
    method takes the current time (seconds) and the number of requests running.

    The pace is the busy time per completed request: the mean, over the last PACE_SAMPLES
    completions, of each one's time since the one before it (or since the replica got busy).
    It holds for work that queues on one device (k requests running end about k paces after
    the last completion) as for batches (a batch of k costs about k paces)."""

    PACE_SAMPLES = 16  # completions the pace is the mean of: a few batches' worth

    def __init__(self) -> None:
        self._took: deque[float] = deque(maxlen=self.PACE_SAMPLES)
        self._mark = 0.0  # the last completion, or when the replica got busy
        self._end = 0.0  # when the requests running are expected to be done

    @property
    def pace_s(self) -> float:
        """The measured busy time per completed request; 0 until a request has completed."""
        return sum(self._took) / len(self._took) if self._took else 0.0

    def started(self, now: float, running: int) -> None:
        """A request starts; `running` were running before it."""
        if running == 0:
            self._mark = self._end = now
        self._end = max(now, self._end) + self.pace_s

    def finished(self, now: float, running: int) -> None:
        """A request ended; `running` still run."""
        self._took.append(now - self._mark)
        self._mark = now
        self._end = now + running * self.pace_s

    def fits(self, now: float, deadline: float) -> bool:
        """Whether one more request, started now, is expected to end by `deadline`."""
        return max(now, self._end) + self.pace_s <= deadline


class QuotaGate:
    """Admits requests while this replica holds a token; `async with gate:` around each one."""

    QUEUE_REPORT_S = 0.05  # how soon, and how often at most, the queue's length is reported

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
        self._yield_asked = False  # someone waits for the room this gate's token keeps
        self._in_flight = 0
        self._work = WorkEstimate()
        self._linger: asyncio.TimerHandle | None = None
        self._queued = 0  # requests at the gate not admitted yet
        self._queue_told = 0  # what the token service was last told of them
        self._queue_report: asyncio.TimerHandle | None = None

    async def connect(self) -> None:
        """Connect and register with the token service."""
        try:
            reader, self._writer = await asyncio.open_unix_connection(self._socket_path)
        except OSError as error:
            raise SchedulerUnavailable(f"token service at {self._socket_path}: {error}") from error
        self._writer.write(self._registration.message())
        self._holding = self._idle_reported = False
        self._queue_told = 0
        self._queue_changed(0)
        self._reading = asyncio.create_task(self._read(reader, self._writer))

    @property
    def connected(self) -> bool:
        """Whether the gate is registered with a live token service."""
        return self._writer is not None and not self._writer.is_closing()

    async def close(self) -> None:
        """Leave the token service (which returns any token held)."""
        if self._writer is not None:
            self._writer.close()
        if self._queue_report is not None:
            self._queue_report.cancel()
            self._queue_report = None
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading

    async def __aenter__(self) -> None:
        self._queue_changed(+1)
        try:
            await self._admit()
        finally:
            self._queue_changed(-1)

    async def _admit(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._condition:
            if self._idle_reported:  # it kept its token while idle and runs again
                self._idle_reported = False
                self._send(b'{"op": "busy"}\n')
            while not self._may_start(loop.time()):
                leased = loop.time() < self._lease_end
                if self._holding and leased:
                    await self._condition.wait()  # someone waits: this one would overrun
                elif self._holding and not self._renewal_refused:
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
            self._work.started(loop.time(), self._in_flight)
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
            self._work.finished(loop.time(), self._in_flight)
            if self._in_flight == 0 and self._holding:
                if loop.time() >= self._lease_end:
                    self._release()
                else:
                    self._linger = loop.call_later(self._linger_s, self._report_idle)
            self._condition.notify_all()

    def _may_start(self, now: float) -> bool:
        """Whether a request may start now: under a lease and, while someone waits, when
        nothing runs or it is expected to end by the lease's end."""
        if not (self._holding and now < self._lease_end):
            return False
        return (
            not self._yield_asked or self._in_flight == 0 or self._work.fits(now, self._lease_end)
        )

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
                    else:
                        self._yield_asked = True
                elif self._answer is not None and not self._answer.done():
                    # A new lease, or a refusal: the yields that follow are asked anew.
                    self._yield_asked = False
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
        self._holding = self._idle_reported = self._yield_asked = False
        self._send(b'{"op": "release"}\n')

    def _queue_changed(self, change: int) -> None:
        """Count requests coming to and leaving the gate's queue; the token service hears the
        count QUEUE_REPORT_S later, when it is not what it heard last (so a gate that admits
        at once sends nothing, and a busy one at most a line every QUEUE_REPORT_S)."""
        self._queued += change
        if self._queue_report is None and self._queued != self._queue_told:
            loop = asyncio.get_running_loop()
            self._queue_report = loop.call_later(self.QUEUE_REPORT_S, self._report_queue)

    def _report_queue(self) -> None:
        self._queue_report = None
        if self._queued != self._queue_told and self.connected:
            self._queue_told = self._queued
            self._send(b'{"op": "queue", "n": %d}\n' % self._queued)

    def _report_idle(self) -> None:
        self._linger = None
        if self._in_flight == 0 and self._holding and self._answer is None:
            self._idle_reported = True
            self._send(b'{"op": "idle"}\n')
