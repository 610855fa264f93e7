"""NVIDIA MPS control daemons, one per GPU: start, health, fault watch, restart, clean stop.

Each GPU gets its own `nvidia-cuda-mps-control -d`, with `CUDA_VISIBLE_DEVICES` set to that
GPU's UUID and its own pipe and log directories, so the daemons of several GPUs never meet and
one GPU's trouble stays on that GPU. A replica becomes an MPS client of its GPU through the
environment `MpsDaemon.client_env` gives it; CUDA reads that environment once, when the
replica's context is created.

The MPS server (`nvidia-cuda-mps-server`) is a child the daemon starts on a client's first
connection ("Starting new server N" in `control.log`); it ends when its daemon dies. Clients
lose their server three ways, and their CUDA contexts are then of no more use:
- a fatal GPU error in one client is reported to every client of that server, and the server
  takes no new clients (they fail with error 807, "MPS server is not ready") until all of them
  have exited; then it recreates its context and serves again. It says so in its log
  (`server.log`: "Server is handling a fatal GPU error.");
- the server process ends (killed, crashed) while the daemon lives on;
- the daemon ends or stops answering, and its servers with it.
`MpsDaemon.watch` sees all three, restarts a lost daemon, and then calls the provider back,
which recycles that GPU's replicas, so that the new ones connect to a working daemon. Other
GPUs keep serving.

Only the standard library is used, so the module also runs where the provider's other
dependencies are not installed (the GPU check in benchmarks/mps_check.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fast_gshare.gpu.mps")

CONTROL_BINARY = "nvidia-cuda-mps-control"
PID_FILE = "nvidia-cuda-mps-control.pid"
LOG_FILES = ("control.log", "server.log")
MIB = 1024**2

# Log lines after which a server's clients have lost their GPU: a client's fatal GPU error as
# the server reports it (server.log), a server's own fatal exception or a server that ended
# with an error (control.log).
FAULT_LINE = re.compile(r"fatal GPU error|fatal exception|Server \d+ exited with status [1-9]")
# The daemon's line (control.log) for a server it starts.
SERVER_STARTED = re.compile(r"Starting new server (\d+)")


@dataclass(frozen=True)
class ServerLoss:
    """How a GPU's MPS clients lost their server, as one look of `MpsDaemon.watch` saw it."""

    fault: str | None = None  # the first fault line new in the logs
    servers: tuple[int, ...] = ()  # server processes that ended
    daemon: str | None = None  # what became of the control daemon: "12 exited"

    def __str__(self) -> str:
        parts = []
        if self.daemon is not None:
            parts.append(f"control daemon {self.daemon}")
        if self.servers:
            parts.append(f"server {', '.join(map(str, self.servers))} ended")
        if self.fault is not None:
            parts.append(f"the server reported a fault: {self.fault}")
        return "; ".join(parts)


LossCallback = Callable[[ServerLoss], Awaitable[None]]


def pipe_dir(base_dir: Path | str, gpu_uuid: str) -> Path:
    """The pipe directory of a GPU's daemon under `base_dir`: named by the GPU's UUID, not its
    index (indices may change between boots), and short (a socket's path holds 107 bytes)."""
    return Path(base_dir) / short_id(gpu_uuid) / "pipe"


def short_id(gpu_uuid: str) -> str:
    """The first 8 hex digits of a GPU's UUID (`GPU-8f2e1a3b-…` -> `8f2e1a3b`): its MPS
    directory's name and its share of a function's Deployment name."""
    digits = "".join(c for c in gpu_uuid.lower().removeprefix("gpu-") if c in "0123456789abcdef")
    return digits[:8] or "gpu"


def client_share_env(sm_percent: int | None, memory_limit_bytes: int | None) -> dict[str, str]:
    """An MPS client's SM percentage and pinned-memory cap, as CUDA reads them at context start.

    The client sees its one GPU as device 0 (`CUDA_VISIBLE_DEVICES` or, in a container,
    `NVIDIA_VISIBLE_DEVICES` names it by UUID), so the cap reads `0=<MiB>M` (rounded down: the
    cap never exceeds the request).
    """
    env = {}
    if sm_percent is not None:
        if not 1 <= sm_percent <= 100:
            raise ValueError(f"SM percentage must be 1..100, not {sm_percent}")
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(sm_percent)
    if memory_limit_bytes is not None:
        if memory_limit_bytes < MIB:
            raise ValueError(f"memory limit must be at least 1 MiB, not {memory_limit_bytes}")
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={memory_limit_bytes // MIB}M"
    return env


class MpsError(RuntimeError):
    """An MPS control daemon did not start or answer as asked."""


class MpsDaemon:
    """The MPS control daemon of one GPU, with its own pipe and log directories."""

    def __init__(
        self,
        gpu_index: int,
        gpu_uuid: str,
        base_dir: Path | str,
        binary: str = CONTROL_BINARY,
        command_timeout_s: float = 5.0,
    ) -> None:
        self.gpu_index = gpu_index
        self.gpu_uuid = gpu_uuid
        self.pipe_dir = pipe_dir(base_dir, gpu_uuid)
        self.log_dir = self.pipe_dir.parent / "log"
        self.binary = binary
        self.command_timeout_s = command_timeout_s
        self._log_offsets: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        """The variables that tie the daemon, its servers and its clients to this GPU."""
        return {
            "CUDA_VISIBLE_DEVICES": self.gpu_uuid,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    def client_env(self, sm_percent: int | None, memory_limit_bytes: int | None) -> dict[str, str]:
        """Environment for a replica that is an MPS client of this GPU (see `client_share_env`)."""
        return {**self.env, **client_share_env(sm_percent, memory_limit_bytes)}

    def pid(self) -> int | None:
        """The control daemon's pid, from the pid file it keeps in its pipe directory."""
        try:
            return int((self.pipe_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        """True while the daemon's process lives (asks it nothing)."""
        pid = self.pid()
        return pid is not None and _alive(pid)

    async def start(self, timeout_s: float = 10.0) -> None:
        """Start the daemon (or adopt one already answering) and wait until it answers."""
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._mark_logs()
        if await self.healthy():
            log.info(
                "MPS daemon for GPU %d already running (pid %s); adopted",
                self.gpu_index,
                self.pid(),
            )
            return
        # The daemon forks itself away; its output goes to a file it can keep writing to.
        with tempfile.TemporaryFile() as output:
            try:
                process = await asyncio.create_subprocess_exec(
                    self.binary,
                    "-d",
                    env={**os.environ, **self.env},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                )
            except OSError as error:
                raise MpsError(f"cannot run {self.binary}: {error}") from error
            code = await process.wait()
            output.seek(0)
            said = output.read().decode(errors="replace").strip()
        if code != 0:
            raise MpsError(
                f"{self.binary} -d for GPU {self.gpu_index} exited with code {code}: "
                f"{said or 'no output'} (log: {self.log_dir / 'control.log'})"
            )
        deadline = time.monotonic() + timeout_s
        while not await self.healthy():
            if time.monotonic() > deadline:
                raise MpsError(
                    f"MPS daemon for GPU {self.gpu_index} did not answer within {timeout_s:g} s "
                    f"(log: {self.log_dir / 'control.log'})"
                )
            await asyncio.sleep(0.1)
        log.info(
            "MPS daemon for GPU %d started (pid %s, pipes in %s)",
            self.gpu_index,
            self.pid(),
            self.pipe_dir,
        )

    async def healthy(self) -> bool:
        """True while the daemon's process lives and it answers `get_server_list`."""
        return self.running() and await self.server_pids() is not None

    async def server_pids(self) -> list[int] | None:
        """The pids of this daemon's MPS servers, or None when the daemon does not answer."""
        answer = await self.command("get_server_list")
        if answer is None:
            return None
        return [int(word) for word in answer.split() if word.isdigit()]

    async def command(self, line: str) -> str | None:
        """Send one command to the daemon; its answer, or None when it does not answer."""
        try:
            process = await asyncio.create_subprocess_exec(
                self.binary,
                env={**os.environ, **self.env},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            return None
        try:
            out, _ = await asyncio.wait_for(
                process.communicate(f"{line}\n".encode()), self.command_timeout_s
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return None
        return out.decode(errors="replace") if process.returncode == 0 else None

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the daemon and its servers within about `timeout_s`.

        `quit -t` gives clients still connected half of it; then the daemon shuts its servers
        down itself. A daemon still there at `timeout_s` is killed, with its servers. A daemon
        that is already gone has taken its servers with it.
        """
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        servers = await self.server_pids() or []
        await self.command(f"quit -t {max(1, round(timeout_s / 2))}")
        left = await _wait_gone([pid, *servers], timeout_s)
        if not left:
            log.info("MPS daemon for GPU %d stopped", self.gpu_index)
            return
        owned = [p for p in left if self._owns(p)]
        for p in owned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        log.warning(
            "MPS daemon for GPU %d did not quit within %g s; killed pids %s",
            self.gpu_index,
            timeout_s,
            owned,
        )
        await _wait_gone(owned, 2.0)

    async def watch(
        self,
        on_lost: LossCallback,
        interval_s: float = 0.25,
        ask_every_s: float = 60.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        """Watch the daemon and its servers until cancelled; call `on_lost` once per loss.

        Every `interval_s` (a look reads a few /proc files and the logs' new lines): a fault
        line new in the logs, a server process gone (those the daemon named when asked, and
        those its log says it started since), or a daemon whose process is gone, are one loss.
        Every `ask_every_s` the daemon must also answer `get_server_list` (each question costs
        five lines in control.log); one that does not is treated as gone. A lost daemon is
        restarted at once (after a failed restart, `backoff_s` later, doubled after each
        further one up to `max_backoff_s`) before `on_lost` is called, so that the clients
        started anew find a working daemon; a daemon that will not restart is reported once,
        after its first try, and once more when a later try succeeds, so that its clients, which
        ran without MPS meanwhile, become its clients again.
        """
        delay = 0.0  # a daemon that ran until now is restarted at once
        servers = set(await self.server_pids() or [])
        next_question = time.monotonic() + ask_every_s
        daemon_up = True
        failed_restarts = 0
        while True:
            await asyncio.sleep(interval_s)
            faults, started = await asyncio.to_thread(self._read_logs)
            servers.update(started)
            daemon = None
            restarted = False
            if not self.running() or time.monotonic() >= next_question:
                answer = await self.server_pids() if self.running() else None
                if answer is not None:
                    servers.update(pid for pid in answer if _alive(pid))
                else:
                    state = "stopped answering" if self.running() else "exited"
                    if daemon_up:
                        daemon = f"{self.pid()} {state}"
                    daemon_up = await self._restart(state, delay)
                    if daemon_up and failed_restarts:  # its clients ran without MPS meanwhile
                        daemon = f"{self.pid()} started after {failed_restarts} failed restart(s)"
                    failed_restarts = 0 if daemon_up else failed_restarts + 1
                    delay = 0.0 if daemon_up else min(max(delay * 2, backoff_s), max_backoff_s)
                    restarted = True
                next_question = time.monotonic() + ask_every_s
            ended = tuple(sorted(pid for pid in servers if not _alive(pid)))
            servers.difference_update(ended)
            if restarted:
                servers.clear()  # the new daemon starts servers of its own
            if faults or ended or daemon is not None:
                await on_lost(ServerLoss(faults[0] if faults else None, ended, daemon))

    async def _restart(self, state: str, delay: float) -> bool:
        """Restart a daemon that exited or stopped answering, after `delay`; whether it runs."""
        log.warning(
            "MPS daemon for GPU %d %s (pid %s); restarting in %g s",
            self.gpu_index,
            state,
            self.pid(),
            delay,
        )
        await asyncio.sleep(delay)
        try:
            await self.stop(timeout_s=1.0)
            await self.start()
        except MpsError as error:
            log.error("MPS daemon for GPU %d did not restart: %s", self.gpu_index, error)
            return False
        return True

    def _mark_logs(self) -> None:
        """Remember where the logs end now: only lines written after this count as faults."""
        for name in LOG_FILES:
            try:
                self._log_offsets[name] = (self.log_dir / name).stat().st_size
            except FileNotFoundError:
                self._log_offsets[name] = 0

    def _read_logs(self) -> tuple[list[str], list[int]]:
        """From the lines written to the logs since the last look: the fault lines, and the
        pids of the servers the daemon started."""
        faults: list[str] = []
        started: list[int] = []
        for name in LOG_FILES:
            try:
                with (self.log_dir / name).open("rb") as file:
                    size = os.fstat(file.fileno()).st_size
                    offset = self._log_offsets.get(name, 0)
                    if size < offset:  # truncated or replaced: read it from the start
                        offset = 0
                    file.seek(offset)
                    data = file.read(size - offset)
            except FileNotFoundError:
                continue
            complete = data.rfind(b"\n") + 1  # a half-written last line waits for next time
            self._log_offsets[name] = offset + complete
            for line in data[:complete].decode(errors="replace").splitlines():
                if FAULT_LINE.search(line):
                    faults.append(line.strip())
                elif match := SERVER_STARTED.search(line):
                    started.append(int(match.group(1)))
        return faults, started

    def _owns(self, pid: int) -> bool:
        """True if `pid` runs with this daemon's pipe directory (the daemon or one of its
        servers): a pid reused by an unrelated process is never killed."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}".encode() in environ


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, waiting for its parent to reap it, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` for `pids` to end; those still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [pid for pid in pids if _alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)
