"""The node's token service: one QuotaScheduler per GPU, spoken to over a Unix socket.

The protocol is JSON lines on one connection per gate. The gate's first line registers it
(gate/registration.py):
`{"gpu": "GPU-…", "client": "resnet50-0", "sm": 14, "request": 1.0, "limit": 1.0,
"function": "resnet50.openfaas-fn"}` (and `"memory"`, its memory cap in bytes, if it has one); then
`{"op": "acquire"}` is answered `{"lease_s": 0.087}` once a token is granted,
`{"op": "renew"}` from a holder whose lease ran out is answered at once, `{"lease_s": 0.1}`
to keep the token or `{"lease_s": 0}` to give it back, and `{"op": "release"}` returns it
(no answer). `{"op": "idle"}` says the holder runs nothing now and keeps its token, uncharged;
`{"op": "busy"}` that it runs again (no answer to either). While a client that could run waits
for the room holders keep, the service sends each of them `{"op": "yield"}` (in the same write
as a grant it follows): a gate still idle when it reads that releases its token; a busy one
starts no request that would run past its lease. `{"op": "queue", "n": 3}` says how many requests
wait at the gate to be admitted (no answer). A closed connection returns its token and removes
the client, so a gate that dies frees its share. A connection whose first line is
`{"op": "stats"}` is answered the GPU time charged to every client since it registered,
`{"GPU-…": {"resnet50-0": 12.5}}`, and closed. The local backend runs this service inside
the provider; on Kubernetes the node agent runs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from faas_provider.gate.registration import Registration
from faas_provider.gate.scheduler import QuotaScheduler

log = logging.getLogger("fast_gshare.scheduler")


@dataclass(frozen=True)
class FunctionUsage:
    """One function's use of one GPU, as its gates registered it and were charged."""

    gpu: str
    function: str  # name.namespace
    share: Registration | None  # one of its gates' registration; None when none is left
    charged_s: float  # GPU time charged to its gates since the service started
    gates: int = 0  # gates registered now
    waited_s: float = 0.0  # seconds its gates waited for tokens, since the service started
    grants: int = 0  # tokens granted to its gates, since the service started
    queued: int = 0  # requests waiting at its gates now, as they last said
    memory_limit_bytes: int | None = None  # the memory caps of its gates registered now, summed


class TokenService:
    """Serves the token protocol for every GPU of the node."""

    def __init__(self, window_s: float = 0.1) -> None:
        self.window_s = window_s
        self._schedulers: dict[str, QuotaScheduler] = {}
        self._writers: dict[tuple[str, str], asyncio.StreamWriter] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._server: asyncio.Server | None = None
        self._socket_path: Path | None = None
        self._registered: dict[tuple[str, str], Registration] = {}  # by (gpu, client)
        # by (gpu, function): GPU time charged to its gates that have gone; seconds its gates
        # waited for tokens, and tokens granted
        self._retired: dict[tuple[str, str], float] = {}
        self._waits: dict[tuple[str, str], list[float]] = {}
        self._asked: dict[tuple[str, str], float] = {}  # by (gpu, client): asked for a token at
        self._queued: dict[tuple[str, str], int] = {}  # by (gpu, client): requests waiting there

    async def start(self, socket_path: Path) -> None:
        """Listen on `socket_path` (mode 0600)."""
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240 - once, at start
        self._server = await asyncio.start_unix_server(self._serve, path=str(socket_path))
        self._socket_path = socket_path
        socket_path.chmod(0o600)  # noqa: ASYNC240 - once, at start
        log.info("token service on %s (window %.0f ms)", socket_path, self.window_s * 1000)

    async def close(self) -> None:
        """Stop listening, drop every connection and remove the socket."""
        for timer in self._timers.values():
            timer.cancel()
        for writer in list(self._writers.values()):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)

    def usage(self) -> list[FunctionUsage]:
        """Each function's use of each GPU: its gates' share, and the GPU time charged to all
        its gates since the service started (those gone included, so it only grows)."""
        found: dict[tuple[str, str], FunctionUsage] = {
            key: FunctionUsage(key[0], key[1], None, charged)
            for key, charged in self._retired.items()
        }
        charged_by_gpu = self.charged_total()
        for (gpu, client), registration in self._registered.items():
            key = (gpu, registration.function)
            held = found.get(key, FunctionUsage(gpu, registration.function, None, 0.0))
            cap = registration.memory_bytes
            if held.memory_limit_bytes is not None:
                cap = held.memory_limit_bytes + (cap or 0)
            found[key] = replace(
                held,
                share=registration,
                charged_s=held.charged_s + charged_by_gpu[gpu].get(client, 0.0),
                gates=held.gates + 1,
                queued=held.queued + self._queued.get((gpu, client), 0),
                memory_limit_bytes=cap,
            )
        for key, (waited, grants) in self._waits.items():
            held = found.get(key, FunctionUsage(key[0], key[1], None, 0.0))
            found[key] = replace(held, waited_s=waited, grants=int(grants))
        return sorted(found.values(), key=lambda use: (use.gpu, use.function))

    def charged_total(self) -> dict[str, dict[str, float]]:
        """Seconds of GPU time charged to each registered client since it registered, by GPU."""
        now = _now()
        return {gpu: s.charged_total(now) for gpu, s in self._schedulers.items()}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key: tuple[str, str] | None = None
        try:
            first = json.loads(await reader.readline() or b"null")
            if isinstance(first, dict) and first.get("op") == "stats":
                writer.write(json.dumps(self.charged_total()).encode() + b"\n")
                await writer.drain()
                return
            registration = Registration.from_message(first)
            gpu, client = registration.gpu, registration.client
            scheduler = self._schedulers.get(gpu)
            if scheduler is None:
                scheduler = self._schedulers[gpu] = QuotaScheduler(self.window_s, _now())
            scheduler.register(
                client,
                registration.sm_percent,
                registration.quota_request,
                registration.quota_limit,
            )
            key = (gpu, client)
            old = self._writers.pop(key, None)
            if old is not None:
                old.close()
            self._writers[key] = writer
            self._registered[key] = registration
            log.info("gate %s registered on GPU %s", client, gpu)
            while line := await reader.readline():
                message = json.loads(line)
                op = message.get("op")
                if op == "queue":
                    self._queued[key] = max(0, int(message["n"]))
                    continue  # nothing to schedule
                if op == "acquire":
                    self._asked.setdefault(key, _now())
                    scheduler.want(client, _now())
                elif op == "renew":
                    now = _now()
                    renewal = scheduler.renew(client, now)
                    lease = max(0.0, renewal.lease_end - now) if renewal is not None else 0.0
                    writer.write(b'{"lease_s": %.6f}\n' % lease)
                elif op == "release":
                    scheduler.release(client, _now())
                elif op == "idle":
                    scheduler.idle(client, _now())
                elif op == "busy":
                    scheduler.busy(client, _now())
                self._kick(gpu)
        except (ValueError, KeyError, TypeError) as error:
            log.warning("token service: bad message from a gate: %s", error)
        except ConnectionError:
            pass
        finally:
            if key is not None and self._writers.get(key) is writer:
                del self._writers[key]
                self._retire(key)
                log.info("gate %s left GPU %s", key[1], key[0])
                self._kick(key[0])
            writer.close()

    def _granted(self, key: tuple[str, str], now: float) -> None:
        """Count a grant to gate `key`, and how long it waited for it, for its function."""
        asked = self._asked.pop(key, now)
        registration = self._registered.get(key)
        if registration is not None:
            waits = self._waits.setdefault((key[0], registration.function), [0.0, 0])
            waits[0] += now - asked
            waits[1] += 1

    def _retire(self, key: tuple[str, str]) -> None:
        """Remove gate `key` (gpu, client), keeping what it was charged in its function's sum."""
        gpu, client = key
        now = _now()
        scheduler = self._schedulers[gpu]
        registration = self._registered.pop(key)
        self._asked.pop(key, None)
        self._queued.pop(key, None)
        charged = scheduler.charged_total(now).get(client, 0.0)
        retired = (gpu, registration.function)
        self._retired[retired] = self._retired.get(retired, 0.0) + charged
        scheduler.unregister(client, now)

    def _kick(self, gpu: str) -> None:
        """Hand out what tokens can be granted now, ask idle holders in the way of a waiting
        client to yield theirs, and look again when the window ends."""
        scheduler = self._schedulers[gpu]
        now = _now()
        messages: dict[str, bytes] = {}
        for grant in scheduler.schedule(now):
            messages[grant.client] = b'{"lease_s": %.6f}\n' % max(0.0, grant.lease_end - now)
            self._granted((gpu, grant.client), now)
        for client in scheduler.in_the_way(now):
            messages[client] = messages.get(client, b"") + b'{"op": "yield"}\n'
        for client, message in messages.items():
            writer = self._writers.get((gpu, client))
            if writer is not None:
                writer.write(message)  # one write: a grant and its request to yield read as one
        timer = self._timers.pop(gpu, None)
        if timer is not None:
            timer.cancel()
        if scheduler.waiting():
            loop = asyncio.get_running_loop()
            delay = max(0.0, scheduler.window_end - now)
            self._timers[gpu] = loop.call_later(delay, self._kick, gpu)


def _now() -> float:
    return asyncio.get_running_loop().time()
