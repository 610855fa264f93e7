"""Warm starts for replica processes: a fork server that imports the runtime, the gate and the
heavy libraries functions use (torch) once, and forks every replica from there.

`python -m faas_provider.runtime` with a ResNet-50 handler spends most of its start importing
torch and torchvision; forked from the server, a replica starts in the time its own handler
takes to load. The child takes its environment, directory and output pipes and runs the module
as `python -m` would. The server never touches a GPU: CUDA starts in each child, after the fork,
from that child's environment (its MPS pipe directory, SM share and memory cap). A child is
exec'd from the fork instead ("cold"), as without the server, when its command is not
`python -m`, when its environment changes what a preloaded library reads at import
(`PYTHON*`, `LD_*`, `OMP_*`, ...), and every child is once a preload opened a GPU device or
started a thread, after which a fork would not be safe.

Each child starts in a session of its own and, when its function's secrets are to be seen at
/var/openfaas/secrets, in a mount namespace of its own (`secret_view.enter`). The provider
talks to the server in JSON lines over the server's stdin and stdout; a child's stdout and
stderr come to the provider through FIFOs that the provider made; the server reaps its
children and reports their exits. When the server dies its children run on: the provider then
learns of their ends by watching /proc (exit code unknown: 255, as asyncio reports a child it
cannot wait for) and starts a new server for the next replica.

    python -m faas_provider.backends.local.forkserver --parent-pid PID [--preload torch,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import importlib
import itertools
import json
import logging
import os
import runpy
import selectors
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from faas_provider.gpu.share import THREADS_VARIABLE
from faas_provider.processes import parent_alive

log = logging.getLogger("fast_gshare.forkserver")

# always imported before the server says it is ready: what every replica and gate runs
BASE_MODULES = ("faas_provider.runtime.__main__", "faas_provider.gate.__main__")
DEFAULT_PRELOAD = ("torch", "torchvision")
# variables that a preloaded library or the interpreter reads when it starts, not later
START_TIME_VARIABLES = ("PYTHON", "LD_", "OMP_", "MKL_", "OPENBLAS_", "MALLOC_", "TORCH_")
EXIT_UNKNOWN = 255  # asyncio's code for a child whose exit status it cannot learn
ORPHAN_POLL_S = 0.2
READY_TIMEOUT_S = 60.0
_STREAM_LIMIT = 2**16
OUTPUTS = ("stdout", "stderr")
# Room for a child's command line and environment where /proc shows them (ps, nvidia-smi,
# /proc/PID/environ): the server starts with this much padding in both, which a child rewrites.
TITLE_ROOM = 4096
ENV_ROOM = 16384
_ROOM_VARIABLE = "FAST_GSHARE_FORK_ROOM"


# ---- the provider's side ---------------------------------------------------------------------


class ForkedProcess:
    """A child of the fork server, as the provider sees it: the parts of
    asyncio.subprocess.Process that supervising a replica needs."""

    def __init__(
        self,
        pid: int,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        cold: str | None,
    ) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.cold = cold  # why it was exec'd rather than run warm in the fork; None: it was not
        self.returncode: int | None = None
        self._ended = asyncio.Event()

    async def wait(self) -> int:
        """Its exit code, once it has ended."""
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def ended(self, code: int) -> None:
        """Record its end (the fork server's report, or EXIT_UNKNOWN)."""
        if self.returncode is None:
            self.returncode = code
            self._ended.set()


class ForkServer:
    """The provider's handle on its fork server: started once, restarted when it died."""

    def __init__(self, env: dict[str, str], preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self._env = env
        self._preload = list(preload)
        self._process: asyncio.subprocess.Process | None = None
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._ids = itertools.count()
        self._fifos: Path | None = None  # made by the first start, removed by close
        self._early_exits: dict[int, int] = {}  # exits reported before their spawn returned
        self._relays: set[asyncio.Task[None]] = set()  # of the servers' stderr
        self._watches: set[asyncio.Task[None]] = set()  # of children a dead server left
        self._reader: asyncio.Task[None] | None = None
        self._preloaded = asyncio.Event()
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the server and wait until it has imported the runtime and the gate; OSError
        saying why when it cannot."""
        self._fifos = self._fifos or Path(tempfile.mkdtemp(prefix="fast-gshare-fifos-"))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            "--parent-pid",
            str(os.getpid()),
            "--preload",
            ",".join(self._preload),
            "--room",
            " " * TITLE_ROOM,
            env={**self._env, _ROOM_VARIABLE: " " * ENV_ROOM},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C meant for the provider is not its to take
        )
        self._process = process
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[-1] = ready
        self._reader = asyncio.create_task(self._read_replies(process))
        self._background(self._relay_stderr(process), self._relays)
        try:
            said = await asyncio.wait_for(ready, READY_TIMEOUT_S)
        except (TimeoutError, OSError) as error:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise OSError(f"the fork server did not start: {error}") from None
        log.info("fork server ready (pid %d, %.1f s)", process.pid, said["seconds"])

    async def preloaded(self) -> None:
        """Wait until the server has tried every preload (spawns need not: they are answered
        between two preloads, warm with what has been imported so far)."""
        await self._preloaded.wait()

    async def spawn(
        self, argv: list[str], env: dict[str, str], cwd: Path, view: dict[str, Any] | None = None
    ) -> ForkedProcess:
        """Start `argv` as a child of the server, in a session of its own, with stdin from
        /dev/null; `view` (secret_view.SecretView.request) gives it its secrets' mount
        namespace. OSError when it could not be started."""
        await self._alive()
        assert self._fifos is not None
        request_id = next(self._ids)
        out_path, err_path = self._fifos / f"{request_id}.out", self._fifos / f"{request_id}.err"
        os.mkfifo(out_path, 0o600)
        os.mkfifo(err_path, 0o600)
        readers = [os.open(path, os.O_RDONLY | os.O_NONBLOCK) for path in (out_path, err_path)]
        request = {"id": request_id, "argv": argv, "env": env, "cwd": str(cwd), "view": view}
        request |= {"stdout": str(out_path), "stderr": str(err_path)}
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        try:
            assert self._process is not None and self._process.stdin is not None
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            await self._process.stdin.drain()
            said = await reply
            if "error" in said:
                raise OSError(said["error"])
        except BaseException:
            for reader in readers:
                os.close(reader)
            raise
        finally:
            self._replies.pop(request_id, None)
            out_path.unlink()
            err_path.unlink()
        stdout, stderr = [await _stream_reader(reader) for reader in readers]
        child = ForkedProcess(said["pid"], stdout, stderr, said["cold"])
        if child.pid in self._early_exits:
            child.ended(self._early_exits.pop(child.pid))
        else:
            self._children[child.pid] = child
        if said["cold"] and argv[0] == sys.executable:  # a Python process that could be warm
            log.info("pid %d exec'd, not forked warm: %s", child.pid, said["cold"])
        return child

    async def close(self) -> None:
        """Stop the server. Its children, the replicas, are stopped by their owners: one that
        still runs is watched from /proc until it ends, so that its owner learns of the end."""
        process = self._process
        if process is not None and process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._reader is not None:  # it ends with the server, handing its children to /proc
            await asyncio.wait([self._reader])
        for task in self._relays:
            task.cancel()
        if self._fifos is not None:
            with contextlib.suppress(OSError):
                self._fifos.rmdir()

    async def _alive(self) -> None:
        """Make sure a server runs, starting a new one when the last one died. When this returns,
        the reader of the server's replies runs, so a reply future made before the next await
        is answered or failed."""
        if self._reader is not None and not self._reader.done():
            return
        if self._starting is None or self._starting.done():
            if self._process is not None:
                log.warning(
                    "fork server exited (code %s); starting a new one", self._process.returncode
                )
            self._starting = asyncio.create_task(self.start())
        await asyncio.shield(self._starting)

    async def _read_replies(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            said = json.loads(line)
            if "exited" in said:
                child = self._children.pop(said["exited"], None)
                if child is not None:
                    child.ended(said["code"])
                else:
                    self._early_exits[said["exited"]] = said["code"]
            elif "preloaded" in said:
                log.info("fork server preloaded %s in %.1f s", said["preloaded"], said["seconds"])
            elif "skipped" in said:
                log.info("fork server did not preload %s: %s", said["skipped"], said["why"])
            elif "preloads_done" in said:
                self._preloaded.set()
            elif "cold" in said and "id" not in said:
                log.warning("fork server forks no more warm replicas: %s", said["cold"])
            else:
                future = self._replies.get(said.get("id", -1))
                if future is not None and not future.done():
                    future.set_result(said)
        await process.wait()
        gone = OSError(f"the fork server exited (code {process.returncode})")
        for future in list(self._replies.values()):
            if not future.done():
                future.set_exception(gone)
        orphans = list(self._children.values())
        if orphans:
            log.warning(
                "fork server exited (code %s); watching its %d child(ren) from /proc",
                process.returncode,
                len(orphans),
            )
        for child in orphans:
            self._background(self._watch_orphan(child), self._watches)

    async def _watch_orphan(self, child: ForkedProcess) -> None:
        # not our child, so there is nothing to wait on: /proc tells, zombies included
        while _pid_runs(child.pid):  # noqa: ASYNC110
            await asyncio.sleep(ORPHAN_POLL_S)
        self._children.pop(child.pid, None)
        child.ended(EXIT_UNKNOWN)

    async def _relay_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log.warning("fork server: %s", line.decode(errors="replace").rstrip())

    def _background(self, work: Any, tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _stream_reader(fd: int) -> asyncio.StreamReader:
    """An asyncio reader of the pipe `fd` (owned by the reader from now on)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
    pipe = os.fdopen(fd, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


def _pid_runs(pid: int) -> bool:
    """Whether `pid` runs (a zombie that nobody reaps has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ---- the server ------------------------------------------------------------------------------


class _BecomeChild(Exception):
    """Raised in a fresh fork: leave the server's loop and run the child."""

    def __init__(self, request: dict[str, Any], cold: str | None) -> None:
        self.request = request
        self.cold = cold


class _Server:
    """The fork server's loop: requests on stdin, replies and exits on stdout, one thread."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self.is_parent = os.getppid() == parent_pid
        self.start_env = {k: v for k, v in os.environ.items() if k != _ROOM_VARIABLE}
        self.unsafe = _fork_unsafe()  # why forks are no longer warm (None: they are)
        self.pending = b""
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.wakeup_w = wakeup_w
        self.selector = selectors.DefaultSelector()
        self.selector.register(0, selectors.EVENT_READ)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)

    def say(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def serve(self, preload: list[str]) -> int:
        """Answer requests, importing `preload` one module at a time in between; the exit code
        when stdin ends or the provider is gone."""
        pending = list(preload)
        while True:
            for key, _ in self.selector.select(0 if pending else 1.0):
                if key.fd == self.wakeup_r:
                    self.reap()
                elif not self.read_requests():
                    return 0
            if pending:
                self.preload(pending.pop(0))
                if not pending:
                    self.say({"preloads_done": True})
            elif not parent_alive(self.parent_pid, self.is_parent):
                return 0

    def preload(self, module: str) -> None:
        began = time.monotonic()
        try:
            importlib.import_module(module)
        except Exception as error:  # an import may fail in any way: say so
            self.say({"skipped": module, "why": f"{type(error).__name__}: {error}"})
            return
        self.say({"preloaded": module, "seconds": time.monotonic() - began})
        if self.unsafe is None and (unsafe := _fork_unsafe()) is not None:
            self.unsafe = f"preloading {module}: {unsafe}"
            self.say({"cold": self.unsafe})

    def read_requests(self) -> bool:
        """Handle the requests that arrived; False at the end of stdin."""
        block = os.read(0, 1 << 20)
        if not block:
            return False
        *lines, self.pending = (self.pending + block).split(b"\n")
        for line in lines:
            self.spawn(json.loads(line))
        return True

    def spawn(self, request: dict[str, Any]) -> None:
        cold = self.unsafe or self.cold_reason(request["argv"], request["env"])
        try:
            pipes = [os.open(request[name], os.O_WRONLY | os.O_NONBLOCK) for name in OUTPUTS]
        except OSError as error:
            self.say({"id": request["id"], "error": f"cannot open its output pipes: {error}"})
            return
        for pipe in pipes:
            os.set_blocking(pipe, True)
        # the preloaded libraries' objects live as long as the child: out of its collections
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os.dup2(pipes[0], 1)
            os.dup2(pipes[1], 2)
            for fd in (*pipes, self.wakeup_r, self.wakeup_w):
                os.close(fd)
            raise _BecomeChild(request, cold)
        for pipe in pipes:
            os.close(pipe)
        self.say({"id": request["id"], "pid": pid, "cold": cold})

    def cold_reason(self, argv: list[str], env: dict[str, str]) -> str | None:
        """Why `argv` with `env` must be exec'd rather than run in the fork; None when it may."""
        if len(argv) < 3 or argv[0] != sys.executable or argv[1] != "-m":
            return f"{argv[0]} is not `{sys.executable} -m`"
        changed = sorted(
            name
            for name in set(env) | set(self.start_env)
            if name.startswith(START_TIME_VARIABLES)
            and env.get(name) != self.start_env.get(name)
            and not (name == THREADS_VARIABLE and _torch_threads(env) is not None)
        )
        if changed:
            return f"its environment sets {', '.join(changed)}, read when a process starts"
        return None

    def reap(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wakeup_r, 4096):
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork_unsafe() -> str | None:
    """Why forking this process is no longer safe: a Python thread besides this one (it may hold
    a lock the child would wait on forever), or a GPU device open (CUDA initialised, which a
    child cannot use). Native pools idle on a futex (OpenMP's) are not a reason: they start
    again in the child, as in PyTorch's forked DataLoader workers."""
    if threading.active_count() > 1:
        return f"{threading.active_count() - 1} Python thread(s) besides the main one run"
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if (target := os.readlink(f"/proc/self/fd/{fd}")).startswith("/dev/nvidia"):
                return f"{target} is open (CUDA was initialised)"
    return None


def _run_child(request: dict[str, Any], cold: str | None) -> int:
    """In the fresh fork: become the requested process; its exit code when it runs here."""
    from faas_provider.backends.local.secret_view import enter

    for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    try:
        os.chdir(cwd)  # first: the view may cover the directory's path, not the directory
        if request["view"] is not None:
            enter(request["view"])
        if cold:
            os.execvpe(argv[0], argv, env)
    except OSError as error:
        os.write(2, f"cannot start {argv[0]}: {error}\n".encode())
        return 127
    os.environ.clear()  # and libc's environ no longer points into the first environment
    os.environ.update(env)
    if (threads := _torch_threads(env)) is not None:
        sys.modules["torch"].set_num_threads(threads)
    _show_in_proc(argv, env)
    sys.path[0] = cwd  # where `python -m` puts the working directory
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [argv[2], *argv[3:]]
    for module in BASE_MODULES:  # imported for their imports; each runs afresh as __main__
        sys.modules.pop(module, None)
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:  # as the interpreter would: traceback, exit 1
        traceback.print_exc()
        return 1
    return 0


def _torch_threads(env: dict[str, str]) -> int | None:
    """The thread count `env`'s OMP_NUM_THREADS gives torch, when torch is imported here and the
    value is a count that torch.set_num_threads can apply again in the fork (OpenMP read the
    variable at torch's import); None otherwise."""
    value = env.get(THREADS_VARIABLE, "")
    if "torch" not in sys.modules or not value.isdecimal() or int(value) < 1:
        return None
    return int(value)


def _show_in_proc(argv: list[str], env: dict[str, str]) -> None:
    """Write `argv` and `env` over the memory that /proc/self/cmdline and /proc/self/environ
    show (the first ones, no longer read by anything), cut to fit, so that ps, nvidia-smi and
    whoever reads /proc see the replica rather than the fork server."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    if len(fields) < 49:  # before Linux 3.5 /proc does not say where they are: leave them
        return
    # stat(5) fields 48..51, counted from 1 with pid and comm before the ")"
    arg_start, arg_end, env_start, env_end = (int(field) for field in fields[45:49])
    for start, end, items in (
        (arg_start, arg_end, argv),
        (env_start, env_end, [f"{name}={value}" for name, value in env.items()]),
    ):
        shown = b"".join(item.encode(errors="replace") + b"\0" for item in items)
        shown = shown[: end - start - 1].ljust(end - start, b"\0")
        ctypes.memmove(start, shown, end - start)


def main(argv: list[str] | None = None) -> int:
    """Run the fork server until stdin ends or the provider is gone; in a child, the child."""
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--preload", default=",".join(DEFAULT_PRELOAD))
    parser.add_argument("--room", default="", help="padding: room for a child's command line")
    args = parser.parse_args(argv)
    began = time.monotonic()
    for module in BASE_MODULES:
        importlib.import_module(module)
    server = _Server(args.parent_pid)
    server.say({"id": -1, "ready": True, "seconds": time.monotonic() - began})
    try:
        preload = [name for name in args.preload.split(",") if name]
        if not preload:
            server.say({"preloads_done": True})
        return server.serve(preload)
    except _BecomeChild as child:
        server.selector.close()
        return _run_child(child.request, child.cold)


if __name__ == "__main__":
    sys.exit(main())
