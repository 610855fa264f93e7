"""What the provider's invocation path costs: echo through the provider vs straight to a replica.

Starts `fast-gshare up` as a real process (once per worker count) with an in-process echo
function, then drives closed-loop clients (a separate process, keep-alive connections as the
gateway keeps them) at each concurrency, first straight at the replicas, then through
/function/echo. Reports requests/s, p50/p99, the latency the provider adds, and the CPU time
the provider's processes (not the replicas, not the clients) spend per proxied request.

    python benchmarks/proxy.py [--duration 5] [--workers 1 2] [--concurrency 1 32]

Prints a table and writes benchmarks/results/proxy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "proxy.json"
ECHO_HANDLER = "def handle(event, context):\n    return event.body\n"
STACK = textwrap.dedent(
    """
    functions:
      echo:
        image: bench/echo:1
        labels: {com.openfaas.scale.min: "REPLICAS"}
    """
)
PAYLOAD = b"x" * 64
WARMUP_S = 1.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _provider_pids(provider_pid: int) -> list[int]:
    """The provider process and its worker processes (not its replicas)."""
    pids = [provider_pid]
    for task in Path(f"/proc/{provider_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(int(child))
    return pids


async def _drive(urls: list[str], concurrency: int, duration_s: float) -> dict[str, float]:
    """Closed-loop clients: each sends, waits for the whole answer, sends again."""
    latencies: list[float] = []
    errors = served = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + WARMUP_S, start + WARMUP_S + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(index: int) -> None:
            nonlocal errors, served
            turn = index
            while (sent := loop.time()) < stop_at:
                url = urls[turn % len(urls)]
                turn += 1
                async with session.post(url, data=PAYLOAD) as response:
                    body = await response.read()
                done = loop.time()
                if response.status != 200 or body != PAYLOAD:
                    errors += 1
                    continue
                served += 1
                if sent >= measure_from:
                    latencies.append(done - sent)

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    latencies.sort()
    return {
        "requests": len(latencies),
        "served_with_warmup": served,
        "errors": errors,
        "rps": len(latencies) / duration_s,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def _load_process(urls: list[str], concurrency: int, duration_s: float, out: Any) -> None:
    out.send(asyncio.run(_drive(urls, concurrency, duration_s)))


def drive(urls: list[str], concurrency: int, duration_s: float) -> dict[str, float]:
    """Run the clients in their own process, so their CPU is not counted as the provider's."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_load_process, args=(urls, concurrency, duration_s, send))
    process.start()
    result = receive.recv()
    process.join()
    return result


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def measure(workers: int, replicas: int, concurrencies: list[int], duration_s: float) -> list[dict]:
    """Start a provider with `workers` processes and measure every concurrency against it."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "functions" / "echo").mkdir(parents=True)
        (root / "functions" / "echo" / "handler.py").write_text(ECHO_HANDLER)
        (root / "stack.yml").write_text(STACK.replace("REPLICAS", str(replicas)))
        port = _free_port()
        command = [sys.executable, "-m", "faas_provider.cli", "up", "--stack", "stack.yml"]
        command += ["--port", str(port), "--state-dir", "state", "--workers", str(workers)]
        command += ["--log-level", "WARNING"]
        provider = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                if provider.poll() is not None:
                    raise SystemExit(f"the provider exited (code {provider.returncode})")
                try:
                    if len(_get_json(f"{base}/system/endpoints/echo")["urls"]) == replicas:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            direct = [u + "/" for u in _get_json(f"{base}/system/endpoints/echo")["urls"]]
            pids = _provider_pids(provider.pid)
            for concurrency in concurrencies:
                print(f"  workers={workers} clients={concurrency}: straight to the replicas ...")
                straight = drive(direct, concurrency, duration_s)
                print(f"  workers={workers} clients={concurrency}: through the provider ...")
                cpu_before = _cpu_seconds(pids)
                proxied = drive([f"{base}/function/echo"], concurrency, duration_s)
                cpu = _cpu_seconds(pids) - cpu_before
                served = proxied["served_with_warmup"]  # the CPU window covers warm-up too
                rows.append(
                    {
                        "workers": workers,
                        "clients": concurrency,
                        "direct": straight,
                        "proxied": proxied,
                        "added_p50_ms": proxied["p50_ms"] - straight["p50_ms"],
                        "added_p99_ms": proxied["p99_ms"] - straight["p99_ms"],
                        "provider_cpu_us_per_request": 1e6 * cpu / served,
                        "rps_ratio": proxied["rps"] / straight["rps"],
                    }
                )
        finally:
            provider.send_signal(signal.SIGTERM)
            provider.wait(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--replicas", type=int, default=2, help="echo replicas (default 2)")
    args = parser.parse_args()
    print(f"proxy benchmark on {platform.node()} ({os.cpu_count()} cores)", flush=True)
    rows = []
    for workers in args.workers:
        rows += measure(workers, args.replicas, args.concurrency, args.duration)
    header = (
        f"{'workers':>7} {'clients':>7} {'direct r/s':>10} {'proxied r/s':>11} {'ratio':>5} "
        f"{'p50 +ms':>7} {'p99 +ms':>7} {'CPU us/req':>10} {'errors':>6}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['workers']:>7} {r['clients']:>7} {r['direct']['rps']:>10.0f} "
            f"{r['proxied']['rps']:>11.0f} {r['rps_ratio']:>5.2f} {r['added_p50_ms']:>7.2f} "
            f"{r['added_p99_ms']:>7.2f} {r['provider_cpu_us_per_request']:>10.0f} "
            f"{r['direct']['errors'] + r['proxied']['errors']:>6}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "proxy",
        "machine": {"node": platform.node(), "cores": os.cpu_count(), "python": sys.version},
        "duration_s": args.duration,
        "replicas": args.replicas,
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(document, indent=1))
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
