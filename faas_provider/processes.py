"""Process lifetimes: how a process started by the provider notices that the provider is gone,
and how a long-running command notices that it is told to stop.

The runtime, the gates and the extra workers each get `--parent-pid` and end when that
process ends, so nothing outlives a provider killed with -9.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

PARENT_CHECK_INTERVAL_S = 1.0


def parent_alive(pid: int, is_parent: bool) -> bool:
    """Whether process `pid` still runs.

    For our own parent the test is whether we still are its child: a parent killed with -9
    may linger as an unreaped zombie, which `kill(pid, 0)` still finds.
    """
    if is_parent:
        return os.getppid() == pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


async def watch_parent(pid: int, on_gone: Callable[[], None]) -> None:
    """Call `on_gone` once process `pid` is gone, checking every PARENT_CHECK_INTERVAL_S."""
    is_parent = os.getppid() == pid
    while True:
        if not parent_alive(pid, is_parent):
            on_gone()
            return
        await asyncio.sleep(PARENT_CHECK_INTERVAL_S)


def stop_on_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM (handled from now on in the running loop)."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    return stopped
