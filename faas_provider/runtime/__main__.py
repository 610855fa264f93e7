"""Run one function replica.

    python -m faas_provider.runtime --port 0 [--host 127.0.0.1] [--handler DIR] [--parent-pid PID]

Binds the host (127.0.0.1 unless told), loads the function, then prints the one line
`Listening on port: N` on stdout; every log line goes to stderr. SIGTERM or SIGINT: stop
accepting, give requests in flight SHUTDOWN_GRACE_S to finish, exit 0. When the --parent-pid
process is gone: kill in-flight fprocess children and exit 0 at once. A handler that fails to
import: exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from faas_provider.processes import watch_parent
from faas_provider.runtime.watchdog import RUNTIME, RuntimeConfig, create_runtime_app

log = logging.getLogger("fast_gshare.runtime")

DEFAULT_HOST = "127.0.0.1"
SHUTDOWN_GRACE_S = 3.0  # below the local backend's 5 s between SIGTERM and SIGKILL


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The runtime's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m faas_provider.runtime",
        description="Serve one function replica with the OpenFaaS watchdog's semantics.",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})"
    )
    parser.add_argument("--port", type=int, default=0, help="port; 0 lets the OS pick (default)")
    parser.add_argument(
        "--handler",
        type=Path,
        metavar="DIR",
        help="call handle(event, context) of DIR/handler.py instead of forking $fprocess",
    )
    parser.add_argument(
        "--parent-pid", type=int, metavar="PID", help="exit as soon as this process is gone"
    )
    return parser.parse_args(argv)


async def serve(config: RuntimeConfig, host: str = DEFAULT_HOST) -> int:
    """Bind, load the function, announce the port and serve until stopped; the exit status."""
    app = create_runtime_app(config)
    runtime = app[RUNTIME]
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, config.port), family=family)
    except OSError as error:
        log.error("Cannot listen on %s:%d: %s", host, config.port, error)
        return 1
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]

    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[bool] = loop.create_future()  # result: drain requests in flight?

    def stop(message: str, drain: bool) -> None:
        if not stopped.done():
            log.info("%s", message)
            stopped.set_result(drain)

    def on_signal(name: str) -> None:
        stop(
            f"{name}: no new connections; {runtime.inflight} requests in flight get "
            f"{SHUTDOWN_GRACE_S:g}s to finish",
            drain=True,
        )

    def on_parent_gone() -> None:
        stop(f"Parent process {config.parent_pid} is gone; exiting.", drain=False)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum.name)
    watcher = None
    if config.parent_pid is not None:
        watcher = asyncio.create_task(watch_parent(config.parent_pid, on_parent_gone))

    starting = asyncio.ensure_future(runtime.start())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        if (error := starting.exception()) is not None:
            log.error("Cannot load the function", exc_info=error)
            return 1
        print(f"Listening on port: {port}", flush=True)

    if await stopped:
        runtime.draining = True
        await runner.cleanup()  # waits for requests in flight, then closes the runtime
    else:
        runtime.close()
    if watcher is not None:
        watcher.cancel()
    log.info("Exiting.")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, serve until told to stop, and exit with serve's status."""
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%Y/%m/%d %H:%M:%S",
    )
    try:
        config = RuntimeConfig.from_env(
            os.environ, port=args.port, handler_dir=args.handler, parent_pid=args.parent_pid
        )
    except ValueError as error:
        log.error("%s", error)
        sys.exit(2)
    code = asyncio.run(serve(config, args.host))
    logging.shutdown()
    # A handle() call that overran exec_timeout still holds a pool thread, which a normal
    # interpreter exit would wait for: leave without joining it.
    os._exit(code)


if __name__ == "__main__":
    main()
