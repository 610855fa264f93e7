"""What the time-quota gate adds to a request's start: a token kept while idle vs one the
scheduler must grant again, and how long a neighbour waits for the room an idle gate keeps.

The token service runs in a process of its own, as the provider or the node agent hosts it;
the gates run in this one and speak to it over its real Unix socket. No GPU is needed.

- kept: one gate, requests --gap-ms apart on a 1 s window. Between requests the gate idles
  with its token; a request starts without asking the scheduler.
- asked: the same on a window shorter than the gap. Every request finds its lease over and
  must ask the scheduler (a renewal): the round trip that a gate which gave its token back pays to
  acquire a new one.
- hand-over: two gates at 60% of the SMs each, which cannot hold tokens together. One asks
  while the other idles with the token: the scheduler asks the idle one to yield, it
  releases, the asker is granted. Measured from the ask to the admission.

    python benchmarks/gate.py [--requests 2000] [--gap-ms 5]

Prints a table and writes benchmarks/results/gate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from faas_provider.gate.gate import QuotaGate
from faas_provider.gate.registration import Registration
from faas_provider.gate.service import TokenService

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gate.json"
GPU = "GPU-benchmark"
SETTLE_S = 0.01  # longer than the gate's linger: the holder has reported itself idle


def serve(socket: Path, window_s: float, ready: Any) -> None:
    """The token service alone, until the process is terminated; `ready` is set once it
    listens."""

    async def run() -> None:
        service = TokenService(window_s)
        await service.start(socket)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(run())


class Service:
    """The token service in a process of its own, on a fresh socket; stopped on the way out."""

    def __init__(self, window_s: float) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="gate-benchmark-")
        self.socket = Path(self._scratch.name, "tokens.sock")
        context = multiprocessing.get_context("spawn")
        self._ready = context.Event()
        arguments = (self.socket, window_s, self._ready)
        self._process = context.Process(target=serve, args=arguments, daemon=True)

    async def __aenter__(self) -> Service:
        self._process.start()
        if not await asyncio.to_thread(self._ready.wait, 30):
            raise RuntimeError("the token service did not start in 30 s")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._process.terminate()
        self._process.join()
        self._scratch.cleanup()

    async def gate(self, client: str, sm_percent: int) -> QuotaGate:
        gate = QuotaGate(self.socket, Registration(GPU, client, sm_percent, 1.0, 1.0, client))
        await gate.connect()
        return gate


async def admissions(window_s: float, requests: int, gap_s: float) -> list[float]:
    """Seconds from each request's arrival at a lone gate to its admission."""
    async with Service(window_s) as service:
        gate = await service.gate("lone", 100)
        waits = []
        for _ in range(requests):
            began = time.perf_counter()
            await gate.__aenter__()
            waits.append(time.perf_counter() - began)
            await gate.__aexit__(None, None, None)
            await asyncio.sleep(gap_s)
        await gate.close()
    return waits


async def hand_overs(requests: int) -> list[float]:
    """Seconds from a gate's ask to its admission while the other gate idles with the token."""
    async with Service(1.0) as service:
        gates = [await service.gate("left", 60), await service.gate("right", 60)]
        waits = []
        for turn in range(requests + 1):
            gate = gates[turn % 2]
            began = time.perf_counter()
            await gate.__aenter__()
            if turn:  # the first turn finds nobody holding
                waits.append(time.perf_counter() - began)
            await gate.__aexit__(None, None, None)
            await asyncio.sleep(SETTLE_S)
        for gate in gates:
            await gate.close()
    return waits


def summary(case: str, waits: list[float]) -> dict[str, Any]:
    ordered = sorted(waits)
    return {
        "case": case,
        "requests": len(ordered),
        "mean_us": 1e6 * statistics.fmean(ordered),
        "p50_us": 1e6 * ordered[len(ordered) // 2],
        "p99_us": 1e6 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


async def measure(requests: int, gap_s: float) -> list[dict[str, Any]]:
    rows = []
    for case, run in (
        ("kept", lambda: admissions(1.0, requests, gap_s)),
        ("asked", lambda: admissions(0.8 * gap_s, requests, gap_s)),
        ("hand-over", lambda: hand_overs(requests)),
    ):
        print(f"{case}: {requests} requests ...", flush=True)
        rows.append(summary(case, await run()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per case")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="idle time between requests")
    args = parser.parse_args()
    rows = asyncio.run(measure(args.requests, args.gap_ms / 1000))
    print(f"{'case':<10} {'requests':>8} {'mean us':>8} {'p50 us':>8} {'p99 us':>8}")
    for row in rows:
        print(
            f"{row['case']:<10} {row['requests']:>8} {row['mean_us']:>8.0f} "
            f"{row['p50_us']:>8.0f} {row['p99_us']:>8.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "gate",
        "gap_ms": args.gap_ms,
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores",
        "python": platform.python_version(),
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cases": rows,
    }
    RESULTS.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
