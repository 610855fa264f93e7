"""The fork server: replicas forked warm from one process that imported their libraries once,
exec'd where a fork would not do, and supervised through the server's reports."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from faas_provider.backends.local.forkserver import EXIT_UNKNOWN, ForkedProcess, ForkServer
from faas_provider.backends.local.launch import python_environment

# a module the child runs: what it sees, then exit 3
CHILD = """
import gc, json, os, sys
print(json.dumps({
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "colour": os.environ.get("COLOUR"),
    "preloaded": "slow_library" in sys.modules,
    "path0": sys.path[0],
    "session": os.getsid(0) == os.getpid(),
    "frozen": gc.get_freeze_count() > 1000,
}), flush=True)
print("said on stderr", file=sys.stderr, flush=True)
if "--wait" in sys.argv:
    sys.stdin.read()  # /dev/null: at once
    import time
    time.sleep(60)
sys.exit(3)
"""


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A directory with `slow_library` (a stand-in for torch: 0.3 s to import) and the child."""
    root = tmp_path / "lib"
    root.mkdir()
    (root / "slow_library.py").write_text("import time\ntime.sleep(0.3)\n")
    (root / "threaded_library.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "child_module.py").write_text(CHILD)
    return root


def server_env(library: Path) -> dict[str, str]:
    env = python_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(library), env["PYTHONPATH"]])
    return env


@pytest.fixture
async def forks(library: Path) -> AsyncIterator[ForkServer]:
    server = ForkServer(server_env(library), preload=["slow_library", "no_such_library"])
    await server.start()
    await server.preloaded()
    yield server
    await server.close()


def proc(pid: int, name: str = "") -> bytes | None:
    """/proc/PID/NAME's bytes (b"" for the directory itself), None when the process is gone."""
    path = Path(f"/proc/{pid}", name)
    if not path.exists():
        return None
    return path.read_bytes() if name else b""


async def run(
    forks: ForkServer, tmp_path: Path, *args: str, extra: dict[str, str] | None = None
) -> tuple[ForkedProcess, dict[str, Any], str]:
    """Run the child module with the server's own environment (and `extra`) in work/."""
    argv = [sys.executable, "-m", "child_module", *args]
    env = {**server_env(tmp_path / "lib"), "COLOUR": "teal", **(extra or {})}
    child = await forks.spawn(argv, env, tmp_path / "work")
    assert child.stdout is not None and child.stderr is not None
    seen = json.loads(await child.stdout.readline())
    said = (await child.stderr.readline()).decode().strip()
    return child, seen, said


async def test_a_child_runs_warm_as_python_m_would_run_it(
    forks: ForkServer, library: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    child, seen, said = await run(forks, tmp_path, "a", "--b")
    assert child.cold is None
    assert seen == {
        "argv": ["a", "--b"],
        "cwd": str(work),
        "colour": "teal",
        "preloaded": True,  # imported once by the server, not by the child
        "path0": str(work),
        "session": True,
        "frozen": True,  # the server's objects: out of the child's garbage collections
    }
    assert said == "said on stderr"
    assert await child.wait() == 3
    # the server reaped it; its pid is no zombie left behind
    assert proc(child.pid) is None


async def test_ps_and_proc_show_the_child_not_the_server(forks: ForkServer, tmp_path: Path) -> None:
    child, _, _ = await run(forks, tmp_path, "--wait")
    command = (proc(child.pid, "cmdline") or b"").rstrip(b"\0").split(b"\0")
    environ = (proc(child.pid, "environ") or b"").split(b"\0")
    os.kill(child.pid, signal.SIGKILL)
    assert command == [sys.executable.encode(), b"-m", b"child_module", b"--wait"]
    assert b"COLOUR=teal" in environ
    assert await child.wait() == -signal.SIGKILL


async def test_a_child_whose_environment_a_preload_read_at_import_is_execd(
    forks: ForkServer, tmp_path: Path
) -> None:
    child, seen, _ = await run(forks, tmp_path, extra={"OMP_NUM_THREADS": "1"})
    assert child.cold is not None and "OMP_NUM_THREADS" in child.cold
    assert seen["preloaded"] is False and seen["colour"] == "teal" and seen["frozen"] is False
    assert await child.wait() == 3


STAND_IN_TORCH = """
threads = None


def set_num_threads(count):
    global threads
    threads = count
"""


async def test_a_childs_torch_thread_count_is_set_in_the_fork_not_by_an_exec(
    library: Path, tmp_path: Path
) -> None:
    """OMP_NUM_THREADS, read by OpenMP when torch is imported, is given to the preloaded torch
    through set_num_threads in the fork; a value that is no count is left to an exec'd child."""
    (library / "torch.py").write_text(STAND_IN_TORCH)
    (tmp_path / "work" / "threads_child.py").write_text(
        "import sys\nprint(getattr(sys.modules.get('torch'), 'threads', 'no torch'), flush=True)\n"
    )
    server = ForkServer(server_env(library), preload=["torch"])
    await server.start()
    await server.preloaded()
    try:
        said = {}
        for value in ("2", "all"):
            env = {**server_env(library), "OMP_NUM_THREADS": value}
            child = await server.spawn(
                [sys.executable, "-m", "threads_child"], env, tmp_path / "work"
            )
            assert child.stdout is not None
            said[value] = ((await child.stdout.readline()).decode().strip(), child.cold)
            assert await child.wait() == 0
    finally:
        await server.close()
    assert said["2"] == ("2", None)
    assert said["all"][0] == "no torch" and "OMP_NUM_THREADS" in (said["all"][1] or "")


async def test_a_forked_child_of_the_real_torch_runs_the_threads_it_is_given(
    tmp_path: Path,
) -> None:
    """With torch itself preloaded (where it is installed: the GPU machines)."""
    pytest.importorskip("torch")
    work = tmp_path / "work"
    work.mkdir()
    (work / "threads_child.py").write_text("import torch\nprint(torch.get_num_threads())\n")
    server = ForkServer(python_environment(), preload=["torch"])
    await server.start()
    await server.preloaded()
    try:
        env = python_environment({"OMP_NUM_THREADS": "3"})
        child = await server.spawn([sys.executable, "-m", "threads_child"], env, work)
        assert child.stdout is not None
        assert (await child.stdout.readline()).strip() == b"3" and child.cold is None
        assert await child.wait() == 0
    finally:
        await server.close()


async def test_a_command_that_is_not_python_m_is_execd(forks: ForkServer, tmp_path: Path) -> None:
    child = await forks.spawn(
        ["sh", "-c", "echo $COLOUR; exit 4"],
        {"COLOUR": "red", "PATH": os.environ["PATH"]},
        tmp_path,
    )
    assert child.cold is not None
    assert child.stdout is not None
    assert await child.stdout.read() == b"red\n"
    assert await child.wait() == 4


async def test_a_missing_program_is_exit_127_with_the_reason(
    forks: ForkServer, tmp_path: Path
) -> None:
    child = await forks.spawn(["no-such-program"], dict(os.environ), tmp_path)
    assert child.stderr is not None
    said = (await child.stderr.read()).decode()
    assert await child.wait() == 127
    assert "cannot start no-such-program" in said


async def test_children_outlive_a_dead_server_and_the_next_spawn_starts_a_new_one(
    forks: ForkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    child, _, _ = await run(forks, tmp_path, "--wait")
    server = forks._process
    assert server is not None
    with caplog.at_level(logging.INFO, logger="fast_gshare.forkserver"):
        server.kill()
        await server.wait()
        await asyncio.sleep(0.3)
        assert proc(child.pid) is not None  # it runs on
        os.kill(child.pid, signal.SIGKILL)
        # no longer the server's to report: seen from /proc, its code unknown
        assert await asyncio.wait_for(child.wait(), 5) == EXIT_UNKNOWN
        again, _, _ = await run(forks, tmp_path)
        assert again.cold is None and await again.wait() == 3
    said = [record.getMessage() for record in caplog.records]
    assert any("watching its 1 child(ren) from /proc" in line for line in said), said
    assert any("starting a new one" in line for line in said), said


async def test_a_preload_that_starts_a_thread_makes_every_later_child_cold(
    library: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forks = ForkServer(server_env(library), preload=["threaded_library"])
    with caplog.at_level(logging.INFO, logger="fast_gshare.forkserver"):
        await forks.start()
        await forks.preloaded()
        try:
            child, seen, _ = await run(forks, tmp_path)
        finally:
            await forks.close()
    assert child.cold is not None and "Python thread" in child.cold
    assert seen["colour"] == "teal"
    said = [record.getMessage() for record in caplog.records]
    assert any("forks no more warm replicas" in line for line in said), said


async def test_preloads_are_logged_and_a_missing_one_is_skipped(
    library: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forks = ForkServer(server_env(library), preload=["slow_library", "no_such_library"])
    with caplog.at_level(logging.INFO, logger="fast_gshare.forkserver"):
        await forks.start()
        await forks.preloaded()
        await forks.close()
    said = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("fork server preloaded slow_library in 0.") for line in said), said
    assert any("did not preload no_such_library: ModuleNotFoundError" in line for line in said), (
        said
    )


async def test_a_child_that_runs_when_the_server_is_closed_is_still_seen_to_end(
    forks: ForkServer, tmp_path: Path
) -> None:
    """Its owner stops it after the close (a replica whose stop began first): it learns of
    the end from /proc."""
    child, _, _ = await run(forks, tmp_path, "--wait")
    await forks.close()
    assert proc(child.pid) is not None
    os.kill(child.pid, signal.SIGKILL)
    assert await asyncio.wait_for(child.wait(), 5) == EXIT_UNKNOWN
