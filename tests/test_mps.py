"""MpsDaemon against tests/fixtures/fake-mps-control, a stand-in with the real binary's contract."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from faas_provider.gpu.mps import MpsDaemon, MpsError, ServerLoss, _alive, short_id

FAKE = str(Path(__file__).parent / "fixtures" / "fake-mps-control")
UUID = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"


async def eventually(condition: Callable[[], object], timeout_s: float = 15.0) -> None:
    """Wait until `condition()` (a value or an awaitable) is true."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def environment(pid: int | None) -> list[bytes]:
    """The `NAME=value` entries of a process's environment."""
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def control_log(daemon: MpsDaemon) -> str:
    return (daemon.log_dir / "control.log").read_text()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[MpsDaemon]:
    daemon = MpsDaemon(0, UUID, tmp_path, binary=FAKE, command_timeout_s=2.0)  # a loaded CI box
    yield daemon
    await daemon.stop(timeout_s=0.5)


@contextlib.asynccontextmanager
async def watching(
    daemon: MpsDaemon, losses: list[ServerLoss], restarts_fail: bool = False
) -> AsyncIterator[None]:
    """Run `daemon.watch` with fast timings, collecting the losses it reports, for the block's
    duration. Each loss must find the daemon answering, unless `restarts_fail` (the test makes
    its restarts fail; their backoff then stops at 0.1 s)."""

    async def on_lost(loss: ServerLoss) -> None:
        if not restarts_fail:
            assert await daemon.healthy(), "clients are recycled only once the daemon answers"
        losses.append(loss)

    watch = daemon.watch(
        on_lost, interval_s=0.05, ask_every_s=0.05, backoff_s=0.05, max_backoff_s=0.1
    )
    task = asyncio.create_task(watch)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_start_answers_and_stop_leaves_no_process(daemon: MpsDaemon) -> None:
    await daemon.start()
    pid = daemon.pid()
    assert pid is not None and _alive(pid)
    assert await daemon.healthy()
    assert (daemon.log_dir / "control.log").exists()

    await daemon.command("start_server -uid 0")
    [server] = await daemon.server_pids() or []
    assert _alive(server)

    await daemon.stop()
    assert not _alive(pid) and not _alive(server)
    assert not await daemon.healthy()
    # Clients still connected would have had half the timeout before their server went.
    assert "Cmd:quit -t 5" in control_log(daemon)


async def test_daemon_gets_its_gpu_and_directories(tmp_path: Path) -> None:
    daemon = MpsDaemon(3, UUID, tmp_path, binary=FAKE)
    short = short_id(UUID)
    assert short == UUID.removeprefix("GPU-")[:8], "named by UUID: indices change between boots"
    assert daemon.env == {
        "CUDA_VISIBLE_DEVICES": UUID,
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / short / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / short / "log"),
    }
    await daemon.start()
    try:
        environ = environment(daemon.pid())
        assert f"CUDA_VISIBLE_DEVICES={UUID}".encode() in environ
        assert f"CUDA_MPS_PIPE_DIRECTORY={tmp_path / short / 'pipe'}".encode() in environ
    finally:
        await daemon.stop()


def test_client_env(tmp_path: Path) -> None:
    daemon = MpsDaemon(1, UUID, tmp_path)
    assert daemon.client_env(25, 2 * 1024**3) == {
        "CUDA_VISIBLE_DEVICES": UUID,
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "8932f937" / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "8932f937" / "log"),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2048M",
    }
    # Rounded down to whole MiB: the cap never exceeds what was asked for.
    assert daemon.client_env(None, 1500 * 1024**2 + 1)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == (
        "0=1500M"
    )
    bare = daemon.client_env(None, None)
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in bare
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in bare
    for bad in (0, 101):
        with pytest.raises(ValueError, match=r"1\.\.100"):
            daemon.client_env(bad, None)
    with pytest.raises(ValueError, match="1 MiB"):
        daemon.client_env(None, 1000)


async def test_start_failures_are_clear(tmp_path: Path) -> None:
    with pytest.raises(MpsError, match="exited with code 1"):
        await MpsDaemon(0, UUID, tmp_path, binary="false").start()
    # `true` exits 0 but keeps no daemon: no pid file, nothing answers.
    with pytest.raises(MpsError, match=r"did not answer within 0\.3 s"):
        await MpsDaemon(0, UUID, tmp_path, binary="true").start(timeout_s=0.3)
    with pytest.raises(MpsError, match="cannot run"):
        await MpsDaemon(0, UUID, tmp_path, binary=str(tmp_path / "missing")).start()


async def test_a_running_daemon_is_adopted(
    daemon: MpsDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fast_gshare.gpu.mps")
    await daemon.start()
    pid = daemon.pid()
    await MpsDaemon(0, UUID, daemon.pipe_dir.parents[1], binary=FAKE).start()
    assert daemon.pid() == pid and _alive(pid)
    assert "already running" in caplog.text


async def test_watch_restarts_a_killed_daemon(
    daemon: MpsDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fast_gshare.gpu.mps")
    await daemon.start()
    old = daemon.pid()
    assert old is not None
    losses: list[ServerLoss] = []
    async with watching(daemon, losses):
        os.kill(old, signal.SIGKILL)
        await eventually(lambda: losses)
        await asyncio.sleep(0.2)  # several more looks
    assert daemon.pid() != old and await daemon.healthy()
    assert losses == [ServerLoss(daemon=f"{old} exited")]
    assert caplog.text.count("MPS daemon for GPU 0 started") == 2
    assert f"MPS daemon for GPU 0 exited (pid {old}); restarting in 0 s" in caplog.text


async def test_a_daemon_that_will_not_restart_is_reported_once(
    daemon: MpsDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    await daemon.start()
    old = daemon.pid()
    assert old is not None
    daemon.binary = "false"  # every restart from now on fails
    losses: list[ServerLoss] = []
    async with watching(daemon, losses, restarts_fail=True):
        os.kill(old, signal.SIGKILL)
        await eventually(lambda: caplog.text.count("did not restart") >= 3)
    assert losses == [ServerLoss(daemon=f"{old} exited")]
    assert "restarting in 0 s" in caplog.text, "the first try is at once"
    assert "restarting in 0.05 s" in caplog.text, "the next tries back off"
    assert "restarting in 0.1 s" in caplog.text, "up to max_backoff_s"


async def test_a_daemon_that_restarts_after_failing_is_reported_again(daemon: MpsDaemon) -> None:
    await daemon.start()
    old, binary = daemon.pid(), daemon.binary
    assert old is not None
    daemon.binary = "false"  # the restarts fail until the binary is back
    losses: list[ServerLoss] = []
    async with watching(daemon, losses, restarts_fail=True):
        os.kill(old, signal.SIGKILL)
        await eventually(lambda: losses)
        await asyncio.sleep(0.3)  # a few more failed tries
        daemon.binary = binary
        await eventually(lambda: len(losses) == 2)
    assert losses[0] == ServerLoss(daemon=f"{old} exited")
    back = losses[1].daemon
    assert back is not None and back.startswith(f"{daemon.pid()} started after ")
    assert back.endswith(" failed restart(s)") and await daemon.healthy()


async def test_a_daemon_killed_with_its_server_is_one_loss(daemon: MpsDaemon) -> None:
    await daemon.start()
    losses: list[ServerLoss] = []
    async with watching(daemon, losses):
        await daemon.command("start_server -uid 0")  # as a client's first connection does
        [server] = await daemon.server_pids() or []
        await asyncio.sleep(0.2)  # the watch has read of the server in the log
        old = daemon.pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        os.kill(server, signal.SIGKILL)
        await eventually(lambda: losses)
        await asyncio.sleep(0.2)
    assert losses == [ServerLoss(servers=(server,), daemon=f"{old} exited")]
    assert str(losses[0]) == f"control daemon {old} exited; server {server} ended"


async def test_a_server_that_dies_under_a_live_daemon_is_a_loss(daemon: MpsDaemon) -> None:
    await daemon.start()
    losses: list[ServerLoss] = []
    async with watching(daemon, losses):
        await daemon.command("start_server -uid 0")
        [server] = await daemon.server_pids() or []
        await asyncio.sleep(0.2)
        os.kill(server, signal.SIGKILL)
        await eventually(lambda: losses)
        await asyncio.sleep(0.2)
        assert losses == [ServerLoss(servers=(server,))], "the daemon lives: no restart"
        # The daemon starts another server for the next client, watched as the first was.
        await daemon.command("start_server -uid 0")
        [second] = await daemon.server_pids() or []
        assert second != server
        await asyncio.sleep(0.2)
        os.kill(second, signal.SIGKILL)
        await eventually(lambda: len(losses) == 2)
    assert losses[1] == ServerLoss(servers=(second,))


async def test_a_server_of_an_adopted_daemon_is_watched(daemon: MpsDaemon) -> None:
    await daemon.start()
    await daemon.command("start_server -uid 0")  # before the watch: known from the daemon
    [server] = await daemon.server_pids() or []
    losses: list[ServerLoss] = []
    async with watching(daemon, losses):
        os.kill(server, signal.SIGKILL)
        await eventually(lambda: losses)
    assert losses == [ServerLoss(servers=(server,))]


async def test_watch_kills_and_restarts_a_daemon_that_stopped_answering(
    daemon: MpsDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fast_gshare.gpu.mps")
    await daemon.start()
    await daemon.command("start_server -uid 0")
    [server] = await daemon.server_pids() or []
    old = daemon.pid()
    losses: list[ServerLoss] = []
    async with watching(daemon, losses):
        await daemon.command("fake_hang")  # no answer comes
        await eventually(lambda: losses, timeout_s=15)  # the watch's question times out too
    assert not _alive(old) and not _alive(server)
    assert daemon.pid() != old and await daemon.healthy()
    assert losses == [ServerLoss(servers=(server,), daemon=f"{old} stopped answering")]
    assert f"MPS daemon for GPU 0 stopped answering (pid {old}); restarting" in caplog.text
    assert f"did not quit within 1 s; killed pids [{old}]" in caplog.text


async def test_watch_reports_a_fault_once(daemon: MpsDaemon) -> None:
    # A fault from before this daemon started is history, not news.
    daemon.log_dir.mkdir(parents=True)
    old_fault = "[2024-01-01 00:00:00.000 Server 1] Server encountered a fatal exception\n"
    (daemon.log_dir / "server.log").write_text(old_fault)
    await daemon.start()
    await daemon.command("start_server -uid 0")
    losses: list[ServerLoss] = []
    async with watching(daemon, losses):
        await asyncio.sleep(0.2)
        assert losses == []
        await daemon.command("fake_fault")
        await eventually(lambda: losses)
        await asyncio.sleep(0.2)  # several more checks
    [loss] = losses
    assert loss.fault is not None and "encountered a fatal GPU error" in loss.fault
    assert (loss.servers, loss.daemon) == ((), None), "the server lives on after a fault"
