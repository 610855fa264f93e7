"""`fast-gshare top` as a person uses it: in a real terminal (tmux), against a running provider
with known traffic, read back from the screen (capture-pane); then with the provider gone."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faas_provider.api.app import create_app
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.readings import GpuReader
from faas_provider.node.agent import NodeAgent
from faas_provider.settings import Settings
from tests.conftest import ECHO, REPO, faas_cli_deploy, wait_available
from tests.fake_nvml import FakeNvml, replica_processes

VIRTUAL = GpuDevice(0, "virtual-0", "virtual", 16 * 1024**3, virtual=True)


@contextlib.contextmanager
def terminal(command: list[str]) -> Iterator[str]:
    """`command` in a detached tmux session 160x40; the session's name."""
    if shutil.which("tmux") is None:
        pytest.skip("no tmux (Debian: apt-get install tmux)")
    name = f"fast-gshare-top-{id(command)}"
    # the size is the terminal's: not a COLUMNS the test run's environment may carry
    sized = ["env", "-u", "COLUMNS", "-u", "LINES", *command]
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "40", *sized],
        check=True,
        cwd=REPO,
    )
    try:
        yield name
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)


def screen(session: str) -> str:
    """What the terminal shows now."""
    shown = subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], check=True, capture_output=True, text=True
    )
    return shown.stdout


def row_of(shown: str, function: str) -> list[str]:
    """The cells of `function`'s row in a table on the screen."""
    line = next(line for line in shown.splitlines() if f" {function} " in line)
    return [cell.strip() for cell in line.split("│")[1:-1]]


async def until_shown(session: str, *texts: str, timeout_s: float = 15.0) -> str:
    """The screen once it shows every one of `texts`."""
    for _ in range(int(timeout_s / 0.2)):
        shown = screen(session)
        if all(text in shown for text in texts):
            return shown
        await asyncio.sleep(0.2)
    raise AssertionError(f"the terminal never showed {texts}:\n{screen(session)}")


async def test_top_shows_each_gpus_functions_with_their_shares_and_load(
    aiohttp_client: Any, settings: Settings, functions_root: Path
) -> None:
    nvml = FakeNvml({VIRTUAL.uuid: 37}, replica_processes, process_bytes=512 * 1024**2)
    node = NodeAgent([VIRTUAL], window_s=0.1, reader=GpuReader(nvml))
    backend = LocalBackend(settings.local.state_dir, functions_root, node=node)
    client = await aiohttp_client(create_app(backend, settings))
    gpu = {"fastgshare/gpu_sm_partition": "40", "fastgshare/gpu_quota_request": "0.5"}
    assert await faas_cli_deploy(client, {**ECHO, "service": "shared", "annotations": gpu}) == 202
    assert await faas_cli_deploy(client, ECHO) == 202
    waiting = {**ECHO, "service": "waiting", "annotations": {"fastgshare/gpu_sm_partition": "90"}}
    assert await faas_cli_deploy(client, waiting) == 202
    for name in ("shared", "echo"):
        await wait_available(client, name)
    url = f"http://127.0.0.1:{client.server.port}"
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            await client.post("/function/shared", data=b"x")
            await asyncio.sleep(0.02)

    load = asyncio.create_task(traffic())
    command = [sys.executable, "-m", "faas_provider.cli", "top", "--url", url, "--interval", "0.5"]
    try:
        with terminal(command) as session:
            shown = await until_shown(session, "GPU virtual-0", "shared", "echo", "req/s")
            await asyncio.sleep(1.5)  # a few refreshes under load
            for _ in range(20):  # a second process of it was seen for a moment once: wait it out
                shown = screen(session)
                cells = row_of(shown, "shared.openfaas-fn")
                if cells[4:6] == ["0.5 GiB", "0"]:
                    break
                await asyncio.sleep(0.5)
            assert cells[:3] == ["shared.openfaas-fn", "40%", "0.50..1.00"], shown
            assert cells[3].endswith("%") and 0 < int(cells[3][:-1]) <= 100, "GPU time used"
            assert cells[4:6] == ["0.5 GiB", "0"], "its replica's memory (NVML), none queued"
            assert float(cells[6]) > 5, f"shared is called ~40 times a second: {cells}"
            assert cells[7].endswith(" ms"), cells
            assert cells[8:] == ["1/1", ""], cells
            assert "busy 37%  memory" in shown, "the GPU as NVML reads it"
            assert row_of(shown, "waiting.openfaas-fn")[-2:] == ["0/1", "1"], "pending"
            assert (
                "waiting.openfaas-fn: 1 pending: GPU 0 has 80 of 100 SM-time left, the replica "
                "needs 90" in " ".join(shown.split())
            ), "and why"
            assert "Functions on no GPU now" in shown and "echo.openfaas-fn" in shown
            stop.set()
            await load
            await client.close()  # the provider goes away
            gone = await until_shown(session, "does not answer")
            assert url in gone
    finally:
        stop.set()
        await asyncio.gather(load, return_exceptions=True)
