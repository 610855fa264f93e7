"""A long run: steady calls through the provider's proxy while other functions come and go.

Starts `fast-gshare up` as a real process with an in-process echo function (2 replicas), then
for --minutes calls /function/echo at a steady --rate (open loop: a call is sent on schedule
whether or not the last one has answered), while other functions are deployed, called, scaled
up, scaled to zero and removed, one after another. Every few seconds it samples the provider
process: resident memory, open file descriptors, child processes. It reports failed calls
(anything but 200 with the body sent), memory after warm-up against memory at its end, and
the descriptors and processes left behind: when the churn is over, and after the provider
stops.

    python benchmarks/soak.py [--minutes 10] [--rate 100]

Prints progress lines and a table, writes benchmarks/results/soak.json, and exits 1 when a
check is unmet (a failed call, memory growing past 10% after warm-up, anything left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "soak.json"
ECHO_HANDLER = "def handle(event, context):\n    return event.body\n"
STACK = textwrap.dedent(
    """
    functions:
      echo:
        image: bench/echo:1
        labels: {com.openfaas.scale.min: "2"}
    """
)
SAMPLE_EVERY_S = 5.0
PROGRESS_EVERY_S = 30.0
CALL_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found.update(int(child) for child in (task / "children").read_text().split())
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count: it holds nothing but its entry)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Sample:
    at_s: float
    calls: int
    failed: int
    rss_mib: float
    fds: int
    children: int


@dataclass
class Run:
    """What the load and the churn saw."""

    calls: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cycles: int = 0
    churn_errors: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    children_seen: set[int] = field(default_factory=set)


async def _load(session: aiohttp.ClientSession, base: str, rate: float, until: float, run: Run):
    """Call echo at `rate` per second until `until`, each call with a body of its own."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def call(index: int) -> None:
        body = f"call {index}".encode()
        sent = loop.time()
        try:
            async with session.post(f"{base}/function/echo", data=body) as response:
                answer = await response.read()
            ok = response.status == 200 and answer == body
            reason = f"status {response.status}: {answer[:200]!r}"
        except (aiohttp.ClientError, TimeoutError) as error:
            ok, reason = False, f"{type(error).__name__}: {error}"
        run.calls += 1
        if ok:
            run.latencies.append(loop.time() - sent)
        else:
            run.failed += 1
            if len(run.failures) < 20:
                run.failures.append(reason)

    start = loop.time()
    index = 0
    while (due := start + index / rate) < until:
        await asyncio.sleep(max(0.0, due - loop.time()))
        task = asyncio.create_task(call(index))
        pending.add(task)
        task.add_done_callback(pending.discard)
        index += 1
    await asyncio.gather(*pending)


async def _churn(session: aiohttp.ClientSession, base: str, until: float, run: Run) -> None:
    """Deploy, call, scale up, scale to zero and remove other functions, one after another."""
    loop = asyncio.get_running_loop()

    async def expect(method: str, path: str, statuses: tuple[int, ...], **kwargs: Any) -> Any:
        async with session.request(method, base + path, **kwargs) as response:
            text = await response.text()
            if response.status not in statuses:
                raise RuntimeError(f"{method} {path}: {response.status} {text[:200]}")
            return text

    async def available(name: str, count: int) -> None:
        for _ in range(600):
            status = json.loads(await expect("GET", f"/system/function/{name}", (200,)))
            if status["availableReplicas"] == count:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} never had {count} available replicas")

    while loop.time() < until:
        name = f"churn-{run.cycles % 4}"
        try:
            deployment = {"service": name, "image": "bench/echo:1"}
            await expect("POST", "/system/functions", (202,), json=deployment)
            await available(name, 1)
            await expect("POST", f"/function/{name}", (200,), data=b"hello")
            await expect("POST", f"/system/scale-function/{name}", (202,), json={"replicas": 2})
            await available(name, 2)
            await expect("POST", f"/system/scale-function/{name}", (202,), json={"replicas": 0})
            await available(name, 0)
            await expect("DELETE", "/system/functions", (202,), json={"functionName": name})
            run.cycles += 1
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as error:
            run.churn_errors.append(str(error))
            await session.delete(base + "/system/functions", json={"functionName": name})
        await asyncio.sleep(1.0)


async def _sample(pid: int, started: float, until: float, run: Run, warmup_s: float) -> None:
    """Sample the provider every SAMPLE_EVERY_S; a progress line every PROGRESS_EVERY_S."""
    loop = asyncio.get_running_loop()
    last_progress = started
    while True:
        children = _children(pid)
        run.children_seen |= children
        sample = Sample(
            at_s=loop.time() - started,
            calls=run.calls,
            failed=run.failed,
            rss_mib=_rss_bytes(pid) / 1024**2,
            fds=_open_fds(pid),
            children=len(children),
        )
        run.samples.append(sample)
        if loop.time() - last_progress >= PROGRESS_EVERY_S:
            last_progress = loop.time()
            phase = "warm-up" if sample.at_s < warmup_s else "measured"
            print(
                f"  {sample.at_s / 60:5.1f} min ({phase}): {sample.calls} calls, "
                f"{sample.failed} failed, {run.cycles} churn cycles, RSS {sample.rss_mib:.1f} "
                f"MiB, {sample.fds} fds, {sample.children} child processes",
                flush=True,
            )
        if loop.time() >= until:
            return
        await asyncio.sleep(min(SAMPLE_EVERY_S, max(0.0, until - loop.time())))


async def _soak(base: str, pid: int, minutes: float, rate: float, warmup_s: float) -> Run:
    run = Run()
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = loop.time()
        until = started + 60 * minutes
        await asyncio.gather(
            _load(session, base, rate, until, run),
            _churn(session, base, until, run),
            _sample(pid, started, until, run, warmup_s),
        )
        run.samples.append(
            Sample(
                at_s=loop.time() - started,
                calls=run.calls,
                failed=run.failed,
                rss_mib=_rss_bytes(pid) / 1024**2,
                fds=_open_fds(pid),
                children=len(_children(pid)),
            )
        )
    return run


def _wait_ready(base: str, provider: subprocess.Popen[bytes], replicas: int) -> None:
    for _ in range(600):
        if provider.poll() is not None:
            raise SystemExit(f"the provider exited (code {provider.returncode})")
        try:
            with urllib.request.urlopen(f"{base}/system/function/echo", timeout=5) as response:
                if json.loads(response.read())["availableReplicas"] == replicas:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("echo never became ready")


def soak(minutes: float, rate: float, warmup_s: float) -> dict[str, Any]:
    """Run the provider, soak it, stop it; the figures."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "functions" / "echo").mkdir(parents=True)
        (root / "functions" / "echo" / "handler.py").write_text(ECHO_HANDLER)
        (root / "stack.yml").write_text(STACK)
        port = _free_port()
        command = [sys.executable, "-m", "faas_provider.cli", "up", "--stack", "stack.yml"]
        command += ["--port", str(port), "--state-dir", "state", "--log-level", "WARNING"]
        provider = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, provider, 2)
            children_before = _children(provider.pid)
            run = asyncio.run(_soak(base, provider.pid, minutes, rate, warmup_s))
            time.sleep(2.0)  # let the last removal's replicas exit
            end_fds = _open_fds(provider.pid)
            end_children = _children(provider.pid)
        finally:
            provider.send_signal(signal.SIGTERM)
            provider.wait(timeout=60)
        time.sleep(1.0)
        left_running = sorted(pid for pid in run.children_seen if _alive(pid))
    measured = [s for s in run.samples if s.at_s >= warmup_s]
    rss_at_warmup = measured[0].rss_mib
    latencies = sorted(run.latencies)
    return {
        "minutes": minutes,
        "rate": rate,
        "warmup_s": warmup_s,
        "calls": run.calls,
        "failed": run.failed,
        "failures": run.failures,
        "achieved_rate": run.calls / (60 * minutes),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "churn_cycles": run.cycles,
        "churn_errors": run.churn_errors,
        "rss_mib_at_warmup": rss_at_warmup,
        "rss_mib_max_after_warmup": max(s.rss_mib for s in measured),
        "rss_mib_at_end": measured[-1].rss_mib,
        "rss_growth_after_warmup": max(s.rss_mib for s in measured) / rss_at_warmup - 1,
        "fds_at_warmup": measured[0].fds,
        "fds_max_after_warmup": max(s.fds for s in measured),
        "fds_after_churn": end_fds,
        "children_before": len(children_before),
        "children_after_churn": len(end_children),
        "children_left_after_stop": left_running,
        "samples": [s.__dict__ for s in run.samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second (100)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before memory is compared (default: a fifth)"
    )
    args = parser.parse_args()
    warmup_s = args.warmup if args.warmup is not None else 60 * args.minutes / 5
    print(
        f"soak on {platform.node()} ({os.cpu_count()} cores): {args.minutes:g} min at "
        f"{args.rate:g} calls/s, memory compared after {warmup_s:g} s",
        flush=True,
    )
    result = soak(args.minutes, args.rate, warmup_s)
    rows = [
        ("calls (failed)", f"{result['calls']} ({result['failed']})"),
        ("achieved rate", f"{result['achieved_rate']:.1f} calls/s"),
        ("latency p50 / p99", f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f} ms"),
        ("churn cycles (errors)", f"{result['churn_cycles']} ({len(result['churn_errors'])})"),
        (
            "provider RSS after warm-up / max / end",
            f"{result['rss_mib_at_warmup']:.1f} / {result['rss_mib_max_after_warmup']:.1f} / "
            f"{result['rss_mib_at_end']:.1f} MiB ({100 * result['rss_growth_after_warmup']:+.1f}%)",
        ),
        (
            "provider fds after warm-up / max / after churn",
            f"{result['fds_at_warmup']} / {result['fds_max_after_warmup']} / "
            f"{result['fds_after_churn']}",
        ),
        (
            "child processes before / after churn",
            f"{result['children_before']} / {result['children_after_churn']}",
        ),
        ("processes left running after stop", str(len(result["children_left_after_stop"]))),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for failure in result["failures"][:5] + result["churn_errors"][:5]:
        print(f"  {failure}")
    result["unmet"] = unmet(result)
    print("all checks met" if not result["unmet"] else "unmet: " + "; ".join(result["unmet"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "soak",
        "machine": {"node": platform.node(), "cores": os.cpu_count(), "python": sys.version},
        **result,
    }
    RESULTS.write_text(json.dumps(document, indent=1))
    print(f"wrote {RESULTS.relative_to(REPO)}")
    if result["unmet"]:
        raise SystemExit(1)


def unmet(result: dict[str, Any]) -> list[str]:
    """What the run should show and did not: no failed call, memory flat within 10% after the
    warm-up, no descriptor or process more than before the churn, none left after the stop."""
    checks = {
        "0 failed calls": result["failed"] == 0 and not result["churn_errors"],
        "RSS within 10% after warm-up": result["rss_growth_after_warmup"] <= 0.10,
        "no descriptor left by the churn": result["fds_after_churn"] <= result["fds_at_warmup"],
        "no process left by the churn": result["children_after_churn"] == result["children_before"],
        "no process left after stop": not result["children_left_after_stop"],
    }
    return [name for name, met in checks.items() if not met]


if __name__ == "__main__":
    main()
