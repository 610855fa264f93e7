"""One replica of a function on this machine: a supervised runtime process.

The replica is started in its own process group, learns its port from the runtime's
`Listening on port: N` line, is ready once `/_/health` answers 200, is health-checked while it
runs, and is restarted with exponential backoff when it exits. Every line it writes goes to
the function's log store; the provider logs one line per lifecycle event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable

import aiohttp

from faas_provider.backends.local.launch import LaunchSpec

log = logging.getLogger("fast_gshare.replica")

_LISTENING = re.compile(r"^Listening on port: (\d+)\s*$")
HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 2.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0
STOP_GRACE_S = 5.0
_READ_BLOCK = 64 * 1024

LineSink = Callable[[str, str], None]
ChangeHook = Callable[[], None]


class Replica:
    """A supervised replica process; `url` is set while it is ready to take requests."""

    def __init__(
        self,
        instance: str,
        spec: LaunchSpec,
        http: aiohttp.ClientSession,
        on_line: LineSink,
        on_change: ChangeHook,
    ) -> None:
        self.instance = instance
        self._spec = spec
        self._http = http
        self._on_line = on_line
        self._on_change = on_change
        self._process: asyncio.subprocess.Process | None = None
        self._port: int | None = None
        self._healthy = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    @property
    def ready(self) -> bool:
        """Whether the process runs and answered its last health check."""
        return self._healthy and self._process is not None and self._process.returncode is None

    @property
    def url(self) -> str:
        """Base URL of the replica's runtime (meaningful while `ready`)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running replica, if any."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        """Start supervising: run the process, restart it when it exits, until `stop`."""
        self._task = asyncio.create_task(self._supervise(), name=f"replica {self.instance}")

    async def stop(self) -> None:
        """Stop the process (SIGTERM to its group, SIGKILL after a grace period) for good."""
        self._stopping = True
        self._set_healthy(False)
        await self._terminate()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST_S
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            code = await self._run_once()
            if self._stopping:
                return
            if loop.time() - started >= STABLE_AFTER_S:
                backoff = BACKOFF_FIRST_S
            self.restarts += 1
            log.warning(
                "replica %s exited (code %s); restarting in %.0f s", self.instance, code, backoff
            )
            self._on_line(self.instance, f"replica exited (code {code}); restarting")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_once(self) -> int | None:
        """Run the process until it exits; return its exit code (negative: killed by signal)."""
        self._port = None
        try:
            process = await asyncio.create_subprocess_exec(
                *self._spec.argv,
                env=self._spec.env,
                cwd=self._spec.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            log.error("replica %s could not start: %s", self.instance, error)
            return None
        self._process = process
        log.info("replica %s started (pid %d)", self.instance, process.pid)
        assert process.stdout is not None and process.stderr is not None
        readers = [
            asyncio.create_task(self._read(process.stdout, look_for_port=True)),
            asyncio.create_task(self._read(process.stderr, look_for_port=False)),
        ]
        try:
            code = await process.wait()
            await asyncio.gather(*readers, return_exceptions=True)
            return code
        finally:
            self._set_healthy(False)
            for reader in readers:
                reader.cancel()

    async def _read(self, stream: asyncio.StreamReader, look_for_port: bool) -> None:
        """Pass the stream's lines on; reads in blocks, so a busy replica's per-request log
        lines cost one wake-up for many, and a line of any length never stalls the pipe."""
        health: asyncio.Task[None] | None = None
        pending = b""
        try:
            while block := await stream.read(_READ_BLOCK):
                *lines, pending = (pending + block).split(b"\n")
                if len(pending) >= _READ_BLOCK:  # an overlong line is passed on in parts
                    lines.append(pending)
                    pending = b""
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if look_for_port and self._port is None and (match := _LISTENING.match(line)):
                        self._port = int(match.group(1))
                        health = asyncio.create_task(self._watch_health())
                    self._on_line(self.instance, line)
            if pending:
                self._on_line(self.instance, pending.decode(errors="replace"))
        finally:
            if health is not None:
                health.cancel()

    async def _watch_health(self) -> None:
        """Mark the replica ready when /_/health answers 200; keep checking while it runs."""
        first = True
        while True:
            was_healthy = self._healthy
            self._set_healthy(await self._check_health())
            if self._healthy and first:
                log.info("replica %s ready on %s", self.instance, self.url)
                first = False
            elif was_healthy and not self._healthy:
                log.warning("replica %s failed its health check", self.instance)
            await asyncio.sleep(0.05 if first else HEALTH_INTERVAL_S)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self._on_change()

    async def _check_health(self) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with self._http.get(f"{self.url}/_/health", timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning(
                "replica %s ignored SIGTERM for %.0f s; killing", self.instance, STOP_GRACE_S
            )
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        log.info("replica %s stopped", self.instance)

    def memory_bytes(self) -> int:
        """Resident memory of the replica process (0 when not running or not on Linux)."""
        pid = self.pid
        if pid is None:
            return 0
        try:
            with open(f"/proc/{pid}/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
