"""One replica of a function on this machine: a supervised runtime process.

The replica is started in its own process group, learns its port from the runtime's
`Listening on port: N` line, is ready once `/_/health` answers 200, is health-checked while it
runs (not ready from its first failed check, checked again every second then, and restarted
after FAILED_CHECKS_TO_RESTART failures in a row: a runtime that says it lost its GPU never
answers 200 again), and is restarted with exponential backoff when it exits (at once, and
with no longer backoff after, when the provider recycled it). Every line it writes goes to the
function's log store; the provider logs one line per lifecycle event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from multidict import CIMultiDict

from faas_provider.api.resolver import ENDPOINT_TTL_S
from faas_provider.backends.local.launch import LaunchSpec
from faas_provider.upstream import UpstreamError, UpstreamPool

log = logging.getLogger("fast_gshare.replica")

_LISTENING = re.compile(r"^Listening on port: (\d+)\s*$")
HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 2.0
RECHECK_S = 1.0  # between the checks of a replica that failed its last one
FAILED_CHECKS_TO_RESTART = 3
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0
STOP_GRACE_S = 5.0
# a replica taken out of the endpoint lists serves this long more before it is ended: the
# provider's workers may still hand out its address that long
WITHDRAW_S = ENDPOINT_TTL_S + 0.5
_READ_BLOCK = 64 * 1024

_LAST_LINE_WAIT_S = 1.0

LineSink = Callable[[str, str], None]
_Exit = tuple[int | None, str | None]  # exit code (None: never started) and last stderr line
ChangeHook = Callable[[], None]


class ChildProcess(Protocol):
    """What supervising a replica's process needs of it (asyncio.subprocess.Process has it)."""

    pid: int
    returncode: int | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    async def wait(self) -> int: ...


# starts argv with env in cwd, in a session of its own, stdin from /dev/null, stdout and stderr
# piped; the last argument is the secrets view it enters first (secret_view.py), or None
ProcessStarter = Callable[
    [list[str], dict[str, str], Path, dict[str, Any] | None], Awaitable[ChildProcess]
]


async def exec_process(
    argv: list[str], env: dict[str, str], cwd: Path, view: dict[str, Any] | None
) -> ChildProcess:
    """A ProcessStarter without the fork server: exec `argv`; it has no secrets view."""
    assert view is None, "only the fork server's children enter a secrets view"
    return await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


class Replica:
    """A supervised replica process; `url` is set while it is ready to take requests."""

    def __init__(
        self,
        instance: str,
        spec: LaunchSpec,
        http: UpstreamPool,
        start_process: ProcessStarter,
        on_line: LineSink,
        on_change: ChangeHook,
    ) -> None:
        self.instance = instance
        self._spec = spec
        self._http = http
        self._start_process = start_process
        self._on_line = on_line
        self._on_change = on_change
        self._processes: list[ChildProcess] = []
        self._port: int | None = None
        self._healthy = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._exits: asyncio.Queue[_Exit] = asyncio.Queue()
        self._helpers: set[asyncio.Task[None]] = set()
        self._recycled = False
        self._unhealthy = False
        self._ending: asyncio.Task[None] | None = None
        self.restarts: Counter[str] = Counter()  # by reason: exited, unhealthy, recycled

    @property
    def ready(self) -> bool:
        """Whether the processes run and the replica answered its last health check."""
        return self._healthy and bool(self._processes) and self._all_running()

    @property
    def url(self) -> str:
        """Base URL of the replica: its gate's when it has one (meaningful while `ready`)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running runtime, if any."""
        process = self._processes[0] if self._processes else None
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        """Start supervising: run the process, restart it when it exits, until `stop`."""
        self._task = asyncio.create_task(self._supervise(), name=f"replica {self.instance}")

    async def stop(self, withdraw_s: float = 0.0) -> None:
        """Take the replica out of service, and `withdraw_s` later stop its processes (SIGTERM
        to their groups, SIGKILL after a grace period) for good; meanwhile it answers what was
        sent to it from endpoint lists read before."""
        self._stopping = True
        self._set_healthy(False)
        if withdraw_s > 0:
            await asyncio.sleep(withdraw_s)
        await self._terminate()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for helper in self._helpers:  # the cancel may have cut the supervisor's clean-up short
            helper.cancel()

    async def recycle(self) -> None:
        """Take the replica out of service and end its processes now; the supervisor starts
        them again at once. Calls meanwhile wait for it to be ready again."""
        self._set_healthy(False)
        self._recycled = bool(self._processes)
        await self._terminate()

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST_S
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            code, last_line = await self._run_once()
            if self._stopping:
                return
            reason = "recycled" if self._recycled else "unhealthy" if self._unhealthy else "exited"
            self.restarts[reason] += 1
            self._unhealthy = False
            if self._recycled:  # asked for, not a crash: at once, and no longer backoff after
                self._recycled = False
                log.info("replica %s recycled; starting it again", self.instance)
                self._on_line(self.instance, "replica recycled; restarting")
                continue
            if loop.time() - started >= STABLE_AFTER_S:
                backoff = BACKOFF_FIRST_S
            why = f"code {code}: {last_line}" if last_line else f"code {code}"
            log.warning("replica %s exited (%s); restarting in %.0f s", self.instance, why, backoff)
            self._on_line(self.instance, f"replica exited ({why}); restarting")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_once(self) -> _Exit:
        """Run the runtime (and its gate) until one exits; its exit code and last stderr line."""
        self._port = None
        self._exits = asyncio.Queue()
        try:
            on_port = self._start_gate if self._spec.gate_argv else self._serving
            await self._spawn(self._spec.argv, on_port)
            return await self._exits.get()
        except OSError as error:
            log.error("replica %s could not start: %s", self.instance, error)
            return None, None
        finally:
            self._set_healthy(False)
            await self._terminate()
            for helper in self._helpers:
                helper.cancel()
            self._processes = []

    async def _spawn(self, argv: list[str], on_port: Callable[[int], None]) -> None:
        runtime = not self._processes  # the runtime first, then its gate, which needs no view
        view = self._spec.secret_view if runtime else None
        process = await self._start_process(argv, self._spec.env, self._spec.cwd, view)
        self._processes.append(process)
        what = "replica" if runtime else "gate"
        log.info("%s %s started (pid %d)", what, self.instance, process.pid)
        assert process.stdout is not None and process.stderr is not None
        self._in_background(self._read(process.stdout, on_port))
        errors = asyncio.create_task(self._read(process.stderr, None))
        self._in_background(self._report_exit(process, errors))

    async def _report_exit(self, process: ChildProcess, errors: asyncio.Task[str | None]) -> None:
        """Queue the process's exit with the last line it wrote to stderr (its reader ends with
        the pipe, unless a child of the process still holds it: then no line)."""
        code = await process.wait()
        try:
            last_line = await asyncio.wait_for(asyncio.shield(errors), _LAST_LINE_WAIT_S)
        except TimeoutError:
            last_line = None
        finally:
            errors.cancel()
        self._exits.put_nowait((code, last_line))

    def _in_background(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    def _start_gate(self, runtime_port: int) -> None:
        """The runtime listens: put its gate in front of it."""
        assert self._spec.gate_argv is not None
        argv = [*self._spec.gate_argv, "--upstream", f"http://127.0.0.1:{runtime_port}"]
        self._in_background(self._spawn_or_report(argv))

    async def _spawn_or_report(self, argv: list[str]) -> None:
        try:
            await self._spawn(argv, self._serving)
        except OSError as error:
            log.error("gate of %s could not start: %s", self.instance, error)
            self._exits.put_nowait((None, None))

    def _serving(self, port: int) -> None:
        """The replica's front (runtime or gate) listens: check it until it is healthy."""
        self._port = port
        self._in_background(self._watch_health())

    def _all_running(self) -> bool:
        return all(process.returncode is None for process in self._processes)

    async def _read(
        self, stream: asyncio.StreamReader, on_port: Callable[[int], None] | None
    ) -> str | None:
        """Pass the stream's lines on until it ends; the last line that was not blank. Reads in
        blocks, so a busy replica's per-request log lines cost one wake-up for many, and a line
        of any length never stalls the pipe."""
        pending = b""
        last: str | None = None
        while block := await stream.read(_READ_BLOCK):
            *lines, pending = (pending + block).split(b"\n")
            if len(pending) >= _READ_BLOCK:  # an overlong line is passed on in parts
                lines.append(pending)
                pending = b""
            for raw in lines:
                line = raw.decode(errors="replace")
                if on_port is not None and (match := _LISTENING.match(line)):
                    on_port(int(match.group(1)))
                    on_port = None
                self._on_line(self.instance, line)
                last = line.strip() or last
        if pending:
            line = pending.decode(errors="replace")
            self._on_line(self.instance, line)
            last = line.strip() or last
        return last

    async def _watch_health(self) -> None:
        """Mark the replica ready when /_/health answers 200; keep checking while it runs, and
        restart it once it has failed FAILED_CHECKS_TO_RESTART checks in a row. The checks end
        once its processes are being ended (a stop, a recycle): a process told to go closes
        its port, which is no failure."""
        first = True
        failures = 0
        while not self._ending_processes():
            failure = await self._check_health()
            if self._ending_processes():
                return
            self._set_healthy(failure is None)
            if failure is None:
                if first:
                    log.info("replica %s ready on %s", self.instance, self.url)
                first = False
                failures = 0
            elif not first:  # a replica still loading is not failing
                failures += 1
                if failures == FAILED_CHECKS_TO_RESTART:
                    log.warning(
                        "replica %s failed %d health checks in a row (%s); restarting it",
                        self.instance,
                        failures,
                        failure,
                    )
                    self._unhealthy = True
                    await self._terminate()
                    return
                if failures == 1:
                    log.warning("replica %s failed its health check (%s)", self.instance, failure)
            await asyncio.sleep(0.05 if first else RECHECK_S if failures else HEALTH_INTERVAL_S)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            self._on_change()

    async def _check_health(self) -> str | None:
        """Ask /_/health; None when it answers 200, else what it said instead."""
        try:
            async with (
                asyncio.timeout(HEALTH_TIMEOUT_S),
                self._http.request(
                    ("127.0.0.1", self._port or 0), "GET", "/_/health", CIMultiDict(), None
                ) as response,
            ):
                said = (await response.read()).decode(errors="replace").strip()
        except TimeoutError:
            return f"no answer within {HEALTH_TIMEOUT_S:g} s"
        except UpstreamError as error:
            return str(error) or type(error).__name__
        if response.status == 200:
            return None
        return f"{response.status} {said[:200]}".rstrip()

    def _ending_processes(self) -> bool:
        """Whether the replica is being stopped or recycled, or its processes are being ended."""
        ending = self._ending is not None and not self._ending.done()
        return self._stopping or self._recycled or ending

    async def _terminate(self) -> None:
        """End the processes (one ending at a time: callers that come meanwhile wait for it)."""
        if self._ending is None or self._ending.done():
            self._ending = asyncio.create_task(self._end_processes())
        await asyncio.shield(self._ending)

    async def _end_processes(self) -> None:
        """SIGTERM to each process group, the gate's first and alone: it finishes the requests
        it let in, on a runtime still serving; then the runtime's. SIGKILL to one that ignores
        SIGTERM for STOP_GRACE_S."""
        running = [p for p in self._processes if p.returncode is None]
        if not running:
            return
        for process in reversed(running):
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
