"""A real Prometheus server for the tests (Debian's `prometheus` package): it scrapes the
targets a test gives it every 500 ms, and the test asks it questions through its HTTP API, as
a dashboard would. Without the binary the tests that need it are skipped, saying why."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

SCRAPE_INTERVAL = "500ms"


class Prometheus:
    """A running Prometheus and its query API."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector `expression` evaluates to now."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}/api/v1/query", params={"query": expression}) as answer,
        ):
            body = await answer.json()
        assert body["status"] == "success", f"{expression}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expression: str, timeout_s: float = 20.0) -> float:
        """The single value of `expression`, once Prometheus has one."""
        for _ in range(int(timeout_s / 0.25)):
            result = await self.query(expression)
            if result:
                return float(result[0]["value"][1])
            await asyncio.sleep(0.25)
        raise AssertionError(f"Prometheus had no value for {expression} in {timeout_s} s")

    async def settled(self, expression: str, expected: float, timeout_s: float = 20.0) -> float:
        """The value of `expression` once it equals `expected` (or the last seen, after
        `timeout_s`): scrapes lag what was sent by up to an interval."""
        seen = float("nan")
        for _ in range(int(timeout_s / 0.25)):
            result = await self.query(expression)
            if result:
                seen = float(result[0]["value"][1])
                if seen == expected:
                    return seen
            await asyncio.sleep(0.25)
        return seen


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(directory: Path, targets: list[str]) -> AsyncIterator[Prometheus]:
    """A Prometheus scraping `targets` (host:port, path /metrics), its data under `directory`."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{"job_name": "fast-gshare", "static_configs": [{"targets": targets}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = directory / "prometheus.log"
    with log.open("w") as stderr:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{server.url}/-/ready") as ready,
                ):
                    if ready.status == 200:
                        break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"Prometheus did not start: {log.read_text()[-2000:]}")
        scraped = await server.settled("count(up == 1)", len(targets))
        assert scraped == len(targets), f"Prometheus scraped {scraped} of {targets}"
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
