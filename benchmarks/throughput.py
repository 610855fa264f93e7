"""Throughput at load: single-image ResNet-50 requests through each part of the path, against
the bare batched ceiling, swept over the clients a function.

    python benchmarks/throughput.py [--settings ceiling shared workers alone] \\
        [--clients 1 2 4 8 16 32] [--functions 7] [--sm-percent 14] [--seconds 8] [--workers 1] \\
        [--max-batch-size 16] [--batches-in-flight 1]

Settings (each request one 224 x 224 JPEG; closed-loop clients, --clients of them a function,
spread over --load-processes processes; every point measured --seconds after a ramp):

- ceiling: --functions bare MPS processes at --sm-percent of the SMs, inference only on a batch
  of 16 (the most a replica's batch could hold at 16 clients): what the card can do.
- shared: --functions resnet50 functions at --sm-percent deployed on fast-gshare, and at each
  client count the same replicas called three ways: `direct` (the replica's runtime, no gate,
  no provider), `gates` (the replica's gate) and `full-path` (the provider's /function/ proxy,
  on its default `--workers auto`, then the gate).
- workers: as full-path, the provider run with --workers (default 1: one process).
- alone: one function at 100% of the SMs, direct and through fast-gshare, and one bare MPS
  process at 100%, batch 16, beside it.

Per point: img/s, the p50/p99 spread over the functions, the mean time in the handler
(X-Duration-Seconds) and at the gate (Server-Timing), failed calls, how busy the machine's CPUs
were, and the CPU time a request cost in each kind of process (the provider and its workers,
the gates, the replicas, the MPS server, the load generator), read from /proc.

Prints progress and a table; merges the rows into benchmarks/results/throughput.json (rows of
another card are dropped) and draws throughput-sweep.png where matplotlib is installed
(`--plot` redraws it). Needs torch and torchvision, a GPU and nvidia-cuda-mps-control.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharing import (
    REPO,
    _gates_of,
    _jpeg,
    _percentile_ms,
    _pyplot,
    _shared,
    provider,
    run_bare,
)

from faas_provider.gate.gate import WAIT_TIMING

RESULTS = REPO / "benchmarks" / "results" / "throughput.json"
PLOT = RESULTS.with_name("throughput-sweep.png")
CEILING_BATCH = 16
RAMP_S = 1.5  # from the load processes' start to the measured interval
LATENCY_TARGET_MS = 50.0
ROLES = {  # a process's role, from a word of its command line
    "faas_provider.cli": "provider",
    "faas_provider.api.worker": "provider",
    "faas_provider.gate": "gates",
    "faas_provider.runtime": "replicas",
    "nvidia-cuda-mps-server": "mps",
}
_WAIT = re.compile(rf"{WAIT_TIMING};dur=([0-9.]+)".encode())
_DURATION = re.compile(rb"(?i)\r\nX-Duration-Seconds: ([0-9.]+)")
_CONTENT_LENGTH = re.compile(rb"(?i)\r\nContent-Length: (\d+)")


# --- load: closed-loop clients in several processes -----------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads each answer
    whole (Content-Length bodies only). It costs the load generator a fraction of the CPU
    that aiohttp's client does, CPU that the processes it measures would otherwise lose on the
    same machine."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, error: Exception | None) -> None:
        self._transport = None
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError(f"connection lost: {error}"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0 or self._answer is None or self._answer.done():
            return
        head = bytes(self._buffer[:head_end])
        length = _CONTENT_LENGTH.search(head)
        if length is None:
            self._answer.set_exception(ConnectionError("an answer without Content-Length"))
            return
        whole = head_end + 4 + int(length[1])
        if len(self._buffer) >= whole:
            del self._buffer[:whole]
            self._answer.set_result((int(head[9:12]), head))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """The status and head of the answer to `request`."""
        if self._transport is None:
            raise ConnectionError("the connection is closed")
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _request(url: str, body: bytes) -> tuple[str, int, bytes]:
    """The host, port and bytes of a POST of `body` to `url` (http://host:port/path)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode() + body


def _load_process(
    clients: list[tuple[str, str]], body: bytes, start: float, end: float
) -> dict[str, Any]:
    """Run `clients` ((function, url) each) closed-loop from `start` to `end` (time.monotonic,
    the same clock in every process): per function its latencies, handler and gate-wait
    times, failures; and this process's CPU seconds over the interval."""

    async def run() -> dict[str, Any]:
        names = {name for name, _ in clients}
        latencies: dict[str, list[float]] = {name: [] for name in names}
        handler: dict[str, list[float]] = {name: [] for name in names}
        waited: dict[str, list[float]] = {name: [] for name in names}
        failed: dict[str, int] = dict.fromkeys(names, 0)
        cpu: list[float] = []
        loop = asyncio.get_running_loop()

        async def client(name: str, url: str) -> None:
            host, port, request = _request(url, body)
            connection: _Connection | None = None
            while (began := time.monotonic()) < end:
                try:
                    if connection is None:
                        _, connection = await loop.create_connection(_Connection, host, port)
                    status, head = await connection.send(request)
                except OSError:
                    failed[name] += began >= start
                    if connection is not None:
                        connection.close()
                    connection = None
                    await asyncio.sleep(0.01)
                    continue
                if began < start:
                    continue
                if status != 200:
                    failed[name] += 1
                    continue
                latencies[name].append(time.monotonic() - began)
                if duration := _DURATION.search(head):
                    handler[name].append(float(duration[1]))
                if wait := _WAIT.search(head):
                    waited[name].append(float(wait[1]) / 1000)
            if connection is not None:
                connection.close()

        async def clock() -> None:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            cpu.append(time.process_time())
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            cpu.append(time.process_time())

        await asyncio.gather(clock(), *(client(name, url) for name, url in clients))
        return {
            "latencies": latencies,
            "handler": handler,
            "waited": waited,
            "failed": failed,
            "cpu_s": cpu[1] - cpu[0],
        }

    return asyncio.run(run())


def drive(
    targets: dict[str, str], clients: int, seconds: float, processes: int, body: bytes
) -> dict[str, Any]:
    """`clients` closed-loop clients for each function of `targets` (name -> URL), spread
    round robin over up to `processes` processes, measured for `seconds` after RAMP_S; the
    load processes' results merged, and the CPU seconds every kind of process used meanwhile."""
    every = [(name, url) for name, url in targets.items() for _ in range(clients)]
    count = min(processes, len(every))
    shares = [every[index::count] for index in range(count)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(count) as pool:
        start = time.monotonic() + RAMP_S + 1.0  # the pool's processes start meanwhile
        end = start + seconds
        calls = [pool.apply_async(_load_process, (share, body, start, end)) for share in shares]
        time.sleep(max(0.0, start - time.monotonic()))
        before, busy_before = cpu_by_role(), _cpu_busy_ticks()
        time.sleep(max(0.0, end - time.monotonic()))
        after, busy_after = cpu_by_role(), _cpu_busy_ticks()
        parts = [call.get(timeout=seconds + 120) for call in calls]
    merged: dict[str, Any] = {"latencies": {}, "handler": {}, "waited": {}, "failed": {}}
    for part in parts:
        for key in merged:
            for name, values in part[key].items():
                merged[key][name] = merged[key].get(name, 0 if key == "failed" else []) + values
    cpu = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}
    cpu["clients"] = sum(part["cpu_s"] for part in parts)
    merged["cpu_s"] = cpu
    used, total = (b - a for a, b in zip(busy_before, busy_after, strict=True))
    merged["cpu_busy"] = used / total if total else 0.0
    return merged


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user and system) used so far by the live processes of each role."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = dict.fromkeys(set(ROLES.values()), 0.0)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        words = {part.decode(errors="replace").rsplit("/", 1)[-1] for part in argv}
        role = next((role for word, role in ROLES.items() if word in words), None)
        if role is not None:  # stat(5) fields 14 and 15, counted from 1 with pid and comm
            used[role] += (int(stat[11]) + int(stat[12])) / ticks
    return used


def _cpu_busy_ticks() -> tuple[int, int]:
    """The machine's CPU ticks (busy, all) so far, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def row(setting: str, clients: int, seconds: float, measured: dict[str, Any]) -> dict[str, Any]:
    """One point of the sweep from `drive`'s figures."""
    latencies = measured["latencies"]
    requests = sum(len(times) for times in latencies.values())
    p50 = [_percentile_ms(sorted(times), 0.50) for times in latencies.values() if times]
    p99 = [_percentile_ms(sorted(times), 0.99) for times in latencies.values() if times]
    handler = [t for times in measured["handler"].values() for t in times]
    waited = [t for times in measured["waited"].values() for t in times]
    return {
        "setting": setting,
        "clients": clients,
        "functions": len(latencies),
        "requests": requests,
        "failed": sum(measured["failed"].values()),
        "img_per_s": requests / seconds,
        "p50_ms_max": max(p50, default=float("nan")),
        "p99_ms_min": min(p99, default=float("nan")),
        "p99_ms_max": max(p99, default=float("nan")),
        "handler_ms_mean": 1000 * sum(handler) / len(handler) if handler else None,
        "gate_wait_ms_mean": 1000 * sum(waited) / len(waited) if waited else None,
        "cpu_busy": measured["cpu_busy"],
        "cpu_ms_per_request": {
            role: 1000 * used / requests if requests else None
            for role, used in sorted(measured["cpu_s"].items())
        },
    }


def bare_row(setting: str, result: dict[str, Any]) -> dict[str, Any]:
    """The point for a run of bare processes (sharing.run_bare)."""
    per_process = result["per_process"]
    return {
        "setting": setting,
        "clients": result["batch"],
        "functions": result["processes"],
        "img_per_s": result["aggregate_img_s"],
        "p50_ms_max": max(p["p50_ms"] for p in per_process),
        "p99_ms_min": min(p["p99_ms"] for p in per_process),
        "p99_ms_max": max(p["p99_ms"] for p in per_process),
    }


def show(point: dict[str, Any]) -> None:
    """One line for a point, as soon as it is measured."""
    cpu = point.get("cpu_ms_per_request") or {}
    spent = " ".join(f"{role} {ms:.2f}" for role, ms in cpu.items() if ms)
    handler = point.get("handler_ms_mean")
    print(
        f"  {point['setting']:<34} {point['clients']:>3} clients: {point['img_per_s']:7.0f} img/s, "
        f"p99 {point['p99_ms_min']:.1f}-{point['p99_ms_max']:.1f} ms"
        + (f", handler {handler:.1f} ms" if handler is not None else "")
        + (f", failed {point['failed']}" if point.get("failed") else "")
        + (f"; CPU ms a request: {spent}; CPUs {point['cpu_busy']:.0%} busy" if cpu else ""),
        flush=True,
    )


# --- finding the replicas and gates of a deployment -------------------------------------------


def _listening_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def gates_and_replicas(names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The URL of each function's gate and of the replica behind it (one replica each)."""
    gates, replicas = {}, {}
    for name in names:
        pid, argv, _ = next(_gates_of(name), (0, [], {}))
        if not pid:
            raise RuntimeError(f"no gate found for {name}")
        (port,) = _listening_ports(pid)
        gates[name] = f"http://127.0.0.1:{port}/"
        replicas[name] = argv[argv.index("--upstream") + 1] + "/"
    return gates, replicas


def through_provider(base: str, names: Iterable[str]) -> dict[str, str]:
    """The provider's invocation URL of each function."""
    return {name: f"{base}/function/{name}" for name in names}


# --- settings --------------------------------------------------------------------------------


def ceiling(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """--functions bare MPS processes at --sm-percent, batch 16, inference only."""
    result = run_bare("ceiling", args.functions, args.sm_percent, args.seconds, batch=CEILING_BATCH)
    yield bare_row(f"bare MPS {args.functions} x {args.sm_percent}%, batch 16", result)


def _sweep(
    args: argparse.Namespace, ways: dict[str, dict[str, str]], body: bytes
) -> Iterator[dict[str, Any]]:
    """At each client count, every way (setting -> targets) in turn."""
    for clients in args.clients:
        for setting, targets in ways.items():
            print(f"{setting}: {clients} client(s) a function", flush=True)
            measured = drive(targets, clients, args.seconds, args.load_processes, body)
            point = row(setting, clients, args.seconds, measured)
            show(point)
            yield point


def _deployment(args: argparse.Namespace, count: int, sm: int) -> dict[str, dict[str, Any]]:
    names = [f"resnet50-{index}" for index in range(count)] if count > 1 else ["resnet50"]
    environment = {
        "max_batch_size": str(args.max_batch_size),
        "batches_in_flight": str(args.batches_in_flight),
        "RESNET50_GPU_WAIT": args.gpu_wait,
    }
    return dict.fromkeys(names, _shared(sm, environment=environment))


def shared(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The functions at --sm-percent, called direct, through their gates, and through it all."""
    functions = _deployment(args, args.functions, args.sm_percent)
    body = _jpeg()
    print(f"shared: deploying {len(functions)} functions at {args.sm_percent}% SMs", flush=True)
    with provider(functions) as base:
        gates, replicas = gates_and_replicas(list(functions))
        full = through_provider(base, functions)
        yield from _sweep(args, {"direct": replicas, "gates": gates, "full-path": full}, body)


def workers(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """As full-path, with the provider's invocations spread over --workers processes."""
    functions = _deployment(args, args.functions, args.sm_percent)
    body = _jpeg()
    print(f"workers: deploying {len(functions)} functions, --workers {args.workers}", flush=True)
    with provider(functions, "--workers", str(args.workers)) as base:
        full = through_provider(base, functions)
        yield from _sweep(args, {f"full-path, --workers {args.workers}": full}, body)


def alone(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One function at 100% of the SMs, direct and through fast-gshare; one bare process at
    100%, batch 16, beside it."""
    result = run_bare("alone-ceiling", 1, 100, args.seconds, batch=CEILING_BATCH)
    yield bare_row("bare MPS 1 x 100%, batch 16", result)
    functions = _deployment(args, 1, 100)
    body = _jpeg()
    print("alone: deploying one function at 100% SMs", flush=True)
    with provider(functions) as base:
        _, replicas = gates_and_replicas(list(functions))
        ways = {"alone, direct": replicas, "alone, full-path": through_provider(base, functions)}
        yield from _sweep(args, ways, body)


SETTINGS = {"ceiling": ceiling, "shared": shared, "workers": workers, "alone": alone}


# --- results ---------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    """The sweep as a table: one line a point."""
    print(f"{'setting':<36} {'clients':>7} {'img/s':>7} {'p99 ms (min-max)':>17} {'handler':>8}")
    for point in rows:
        handler = point.get("handler_ms_mean")
        print(
            f"{point['setting']:<36} {point['clients']:>7} {point['img_per_s']:>7.0f} "
            f"{point['p99_ms_min']:>8.1f}-{point['p99_ms_max']:<8.1f} "
            f"{'' if handler is None else f'{handler:.1f} ms':>8}"
        )


def save(rows: list[dict[str, Any]], card: str, torch_version: str) -> dict[str, Any]:
    """Merge `rows` into RESULTS: a (setting, clients) point measured again replaces the old
    one; the points of another card are dropped."""
    document: dict[str, Any] = {"benchmark": "throughput", "card": card, "rows": []}
    if RESULTS.exists():
        saved = json.loads(RESULTS.read_text())
        if saved.get("card") == card:
            document = saved
    keys = {(point["setting"], point["clients"]) for point in rows}
    kept = [p for p in document["rows"] if (p["setting"], p["clients"]) not in keys]
    document |= {
        "torch": torch_version,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rows": kept + rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return document


def plot(document: dict[str, Any]) -> None:
    """img/s and p99 against clients a function, one line a setting; the bare ceilings and the
    latency target dashed."""
    plt = _pyplot()
    if plt is None:
        return
    figure, (rates, tails) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    swept: dict[str, list[dict[str, Any]]] = {}
    for point in document["rows"]:
        if point["setting"].startswith("bare MPS"):
            line = rates.axhline(point["img_per_s"], linestyle="--", linewidth=1, color="gray")
            rates.text(0.9, point["img_per_s"], f" {point['setting']}", va="bottom", fontsize=8)
            line.set_label(None)
        else:
            swept.setdefault(point["setting"], []).append(point)
    for setting, points in swept.items():
        points.sort(key=lambda p: p["clients"])
        clients = [p["clients"] for p in points]
        rates.plot(clients, [p["img_per_s"] for p in points], marker="o", label=setting)
        tails.plot(clients, [p["p99_ms_max"] for p in points], marker="o", label=setting)
    tails.axhline(LATENCY_TARGET_MS, linestyle="--", linewidth=1, color="red")
    tails.text(0.9, LATENCY_TARGET_MS, " 50 ms", va="bottom", fontsize=8, color="red")
    for axes, label in (
        (rates, "images per second, all functions"),
        (tails, "p99, worst function (ms)"),
    ):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("closed-loop clients a function")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    rates.set_ylim(bottom=0)
    tails.set_yscale("log")
    rates.legend(fontsize=8)
    figure.suptitle(f"ResNet-50, one JPEG a request, on {document['card']}")
    figure.tight_layout()
    figure.savefig(PLOT)
    print(f"drew {PLOT.relative_to(REPO)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--functions", type=int, default=7)
    parser.add_argument("--sm-percent", type=int, default=14)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds a point")
    parser.add_argument("--workers", type=int, default=1, help="the provider's --workers (1)")
    parser.add_argument("--load-processes", type=int, default=7)
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="the functions' max_batch_size (16)"
    )
    parser.add_argument(
        "--batches-in-flight", type=int, default=1, help="the functions' batches_in_flight (1)"
    )
    parser.add_argument(
        "--gpu-wait", choices=["block", "spin"], default="block", help="RESNET50_GPU_WAIT (block)"
    )
    parser.add_argument("--plot", action="store_true", help="only redraw the saved results")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(RESULTS.read_text()))
        return
    import torch

    from faas_provider.gpu.discovery import discover_gpus

    card = discover_gpus()[0].name  # through NVML: no CUDA context in this process
    rows: list[dict[str, Any]] = []
    try:
        for setting in args.settings:
            rows.extend(SETTINGS[setting](args))
    finally:
        if rows:
            print_table(rows)
            plot(save(rows, card, torch.__version__))


if __name__ == "__main__":
    main()
