"""`fast-gshare top`: who uses my GPU, refreshed every second in the terminal.

It reads the provider's /metrics (and, on a cluster, the node agents' with `--node-metrics`),
once a second, and shows per GPU the functions placed there: SM share, quota request and
limit, the share of the GPU's time each used over the last interval, requests per second and
p99 latency over it, replicas ready of desired and pending, and why the pending ones wait; then
the GPUs' utilisation and memory as NVML reads them, each function's memory against its caps,
and the requests waiting at its gates. What `nvidia-smi` cannot show. When
a source does not answer it says so in a line and keeps trying.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

Labels = tuple[tuple[str, str], ...]
FUNCTION_COLUMNS = ("req/s", "p99", "ready", "pending")
UTILIZATION = "fast_gshare_gpu_utilization_ratio"
GPU_MEMORY_USED = "fast_gshare_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = "fast_gshare_gpu_memory_total_bytes"


@dataclass
class Sample:
    """The metrics of every source at one moment: (name, labels) -> value."""

    at: float
    values: dict[tuple[str, Labels], float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def series(self, name: str) -> dict[Labels, float]:
        """The samples of metric `name`, by labels."""
        return {labels: v for (n, labels), v in self.values.items() if n == name}


async def scrape(session: aiohttp.ClientSession, urls: list[str]) -> Sample:
    """One look at every source's /metrics."""
    sample = Sample(time.monotonic())
    for url in urls:
        try:
            async with session.get(f"{url.rstrip('/')}/metrics") as answer:
                if answer.status != 200:
                    raise aiohttp.ClientError(f"HTTP {answer.status}")
                text = await answer.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            sample.problems.append(f"{url} does not answer ({error or type(error).__name__})")
            continue
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                sample.values[key] = sample.values.get(key, 0.0) + s.value
    return sample


def _label(labels: Labels, name: str) -> str:
    return dict(labels).get(name, "")


def _per_second(now: Sample, before: Sample | None, name: str) -> dict[Labels, float]:
    """The rate of counter `name` between two samples, by labels (none for the first)."""
    if before is None or now.at <= before.at:
        return {}
    earlier = before.series(name)
    return {
        labels: max(0.0, value - earlier.get(labels, 0.0)) / (now.at - before.at)
        for labels, value in now.series(name).items()
    }


def _p99(now: Sample, before: Sample | None, function: str) -> float | None:
    """The 99th percentile latency of `function`'s calls between two samples, in seconds."""
    if before is None:
        return None
    name = "fast_gshare_function_invocation_duration_seconds_bucket"
    buckets: dict[float, float] = defaultdict(float)
    earlier = before.series(name)
    for labels, value in now.series(name).items():
        if _label(labels, "function_name") == function:
            le = _label(labels, "le")
            buckets[math.inf if le == "+Inf" else float(le)] += value - earlier.get(labels, 0.0)
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= 0.99 * total:
            return bound
    return None


def view(now: Sample, before: Sample | None) -> RenderableType:
    """What the terminal shows for one refresh."""
    parts: list[RenderableType] = [Text(problem, style="bold red") for problem in now.problems]
    replicas = {
        (_label(labels, "function_name"), _label(labels, "state")): value
        for labels, value in now.series("fast_gshare_function_replicas").items()
    }
    calls: dict[str, float] = defaultdict(float)
    for labels, rate in _per_second(now, before, "fast_gshare_function_invocations_total").items():
        calls[_label(labels, "function_name")] += rate
    used = {
        (_label(labels, "function_name"), _label(labels, "gpu")): rate
        for labels, rate in _per_second(now, before, "fast_gshare_gpu_time_seconds_total").items()
    }

    def share(name: str, function: str, gpu: str) -> float | None:
        for labels, value in now.series(name).items():
            if (_label(labels, "function_name"), _label(labels, "gpu")) == (function, gpu):
                return value
        return None

    on_gpu: dict[str, list[str]] = defaultdict(list)
    for labels in now.series("fast_gshare_function_gates"):
        on_gpu[_label(labels, "gpu")].append(_label(labels, "function_name"))
    gpus = {
        _label(labels, "gpu"): (_label(labels, "node"), value)
        for labels, value in now.series("fast_gshare_gpu_footprint_allocated_ratio").items()
    }
    busy = {_label(labels, "gpu"): v for labels, v in now.series(UTILIZATION).items()}
    in_use = {_label(labels, "gpu"): v for labels, v in now.series(GPU_MEMORY_USED).items()}
    total = {_label(labels, "gpu"): v for labels, v in now.series(GPU_MEMORY_TOTAL).items()}
    for gpu in sorted(set(gpus) | set(on_gpu)):
        node, footprint = gpus.get(gpu, ("", math.nan))
        title = f"GPU {gpu}" + (f" on {node}" if node else "")
        if not math.isnan(footprint):
            title += f"  placed {footprint:.0%} of its SM-time"
        if gpu in busy:
            title += f"  busy {busy[gpu]:.0%}"
        if gpu in in_use and gpu in total:
            title += f"  memory {_gib(in_use[gpu])} of {_gib(total[gpu])}"
        table = Table(title=title, title_justify="left")
        table.add_column("function", min_width=24, no_wrap=True)
        for column in ("SM", "quota", "GPU time", "memory", "queued", *FUNCTION_COLUMNS):
            table.add_column(column, justify="right")
        for function in sorted(on_gpu.get(gpu, [])):
            sm = share("fast_gshare_function_sm_share_ratio", function, gpu)
            low = share("fast_gshare_function_quota_request_ratio", function, gpu)
            high = share("fast_gshare_function_quota_limit_ratio", function, gpu)
            held = share("fast_gshare_function_memory_used_bytes", function, gpu)
            cap = share("fast_gshare_function_memory_limit_bytes", function, gpu)
            queued = share("fast_gshare_function_queued_requests", function, gpu)
            time_used = used.get((function, gpu))
            on_this_gpu = [
                "-" if sm is None else f"{sm:.0%}",
                "-" if low is None else f"{low:.2f}..{high:.2f}",
                "-" if time_used is None else f"{time_used:.0%}",
                ("-" if held is None else _gib(held)) + ("" if cap is None else f" / {_gib(cap)}"),
                "-" if queued is None else f"{queued:.0f}",
            ]
            table.add_row(function, *on_this_gpu, *_load(function, now, before, calls, replicas))
        parts.append(table)
    shared = {function for functions in on_gpu.values() for function in functions}
    plain = sorted(f for (f, state) in replicas if state == "desired" and f not in shared)
    if plain:
        table = Table(
            title="Functions on no GPU now: plain ones, and GPU-shared ones waiting for room",
            title_justify="left",
        )
        table.add_column("function", min_width=24, no_wrap=True)
        for column in FUNCTION_COLUMNS:
            table.add_column(column, justify="right")
        for function in plain:
            table.add_row(function, *_load(function, now, before, calls, replicas))
        parts.append(table)
    for labels in sorted(now.series("fast_gshare_function_pending_info")):
        function, reason = _label(labels, "function_name"), _label(labels, "reason")
        count = replicas.get((function, "pending"), 0)
        parts.append(Text(f"{function}: {count:.0f} pending: {reason}", style="yellow"))
    if len(parts) == len(now.problems):
        parts.append(Text("no functions yet"))
    return Group(*parts)


def _load(
    function: str,
    now: Sample,
    before: Sample | None,
    calls: dict[str, float],
    replicas: dict[tuple[str, str], float],
) -> list[str]:
    """The FUNCTION_COLUMNS cells of `function`: its calls and its replicas."""
    p99 = _p99(now, before, function)
    available = replicas.get((function, "available"), 0)
    ready = f"{available:.0f}/{replicas.get((function, 'desired'), 0):.0f}"
    pending = replicas.get((function, "pending"), 0)
    return [
        "-" if before is None else f"{calls.get(function, 0.0):.1f}",
        "-" if p99 is None else f"{p99 * 1000:.0f} ms",
        ready,
        f"{pending:.0f}" if pending else "",
    ]


def _gib(count: float) -> str:
    return f"{count / 1024**3:.1f} GiB"


async def top(urls: list[str], interval_s: float = 1.0) -> None:
    """Refresh the view every `interval_s` until interrupted."""
    timeout = aiohttp.ClientTimeout(total=max(0.5, interval_s * 0.8))
    before: Sample | None = None
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with Live(Text("reading the provider's metrics..."), auto_refresh=False) as live:
            while True:
                now = await scrape(session, urls)
                live.update(view(now, before), refresh=True)
                before = now if not now.problems else None
                await asyncio.sleep(interval_s)
