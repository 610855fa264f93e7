"""What `fast-gshare profile` shows and writes: progress while it measures, a table at the
end, the profile as JSON and as a PNG (profile/plot.py), beside the copy the provider keeps."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from faas_provider.profile.model import Measurement, Profile, RateMeasurement
from faas_provider.profile.runner import Grid, profile_function


async def measure(
    url: str,
    name: str,
    namespace: str,
    body: bytes,
    grid: Grid,
    latency_slo_ms: float | None,
    console: Console,
) -> Profile:
    """Profile `name`, with a progress bar and a line per setting measured."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"profiling {name}", total=grid.size)

        def update(line: str, result: Measurement | RateMeasurement | None) -> None:
            if result is None:
                progress.update(task, description=line)
                return
            errors = f", {result.errors} errors" if result.errors else ""
            if isinstance(result, RateMeasurement):
                progress.console.print(
                    f"  {result.sm_percent:>3}% SMs  quota {result.quota:<4g}  Poisson "
                    f"{result.offered_rps:7.1f} req/s: p99 {result.p99_ms:6.1f} ms{errors}"
                )
                return
            progress.advance(task)
            progress.console.print(
                f"  {result.sm_percent:>3}% SMs  quota {result.quota:<4g}  "
                f"{result.concurrency:>2} in flight: {result.throughput_rps:7.1f} req/s, "
                f"p99 {result.p99_ms:6.1f} ms{errors}"
            )

        return await profile_function(url, name, namespace, body, grid, latency_slo_ms, update)


def report(profile: Profile, out: Path, console: Console) -> None:
    """The tables, the JSON file `out` and its PNG beside it."""
    console.print(table(profile))
    if profile.open_loop:
        console.print(poisson_table(profile))
    out.write_text(json.dumps(profile.model_dump(mode="json"), indent=1) + "\n")
    console.print(f"wrote {out}; the provider keeps it as {profile.function}'s profile")
    try:
        from faas_provider.profile.plot import plot_profile
    except ImportError:
        console.print("no PNG: matplotlib is not installed (pip install 'fast-gshare[plot]')")
        return
    picture = out.with_suffix(".png")
    plot_profile(profile, picture)
    console.print(f"drew {picture}")


def table(profile: Profile) -> Table:
    """Every setting measured, the best within the target marked."""
    target = profile.latency_slo_ms
    best = (
        {(c.sm_percent, c.quota, c.concurrency) for c in profile.capacities(target)}
        if (target is not None)
        else set()
    )
    title = f"{profile.function} on {profile.gpu_model}" + (
        f": * the most within p99 <= {target:g} ms per SM partition and quota" if target else ""
    )
    shown = Table(title=title, title_justify="left")
    for column in ("SMs", "quota", "footprint", "in flight", "req/s", "p50 ms", "p95 ms",
                   "p99 ms", "errors"):  # fmt: skip
        shown.add_column(column, justify="right")
    for m in profile.measurements:
        mark = " *" if (m.sm_percent, m.quota, m.concurrency) in best else ""
        shown.add_row(
            f"{m.sm_percent}%", f"{m.quota:g}", f"{m.footprint:.3f}", str(m.concurrency),
            f"{m.throughput_rps:.1f}{mark}", f"{m.p50_ms:.1f}", f"{m.p95_ms:.1f}",
            f"{m.p99_ms:.1f}", str(m.errors),
        )  # fmt: skip
    return shown


def poisson_table(profile: Profile) -> Table:
    """Every Poisson run, the rate each (SM partition, quota) serves within the target marked."""
    target = profile.latency_slo_ms
    kept = (
        {(c.sm_percent, c.quota, c.throughput_rps) for c in profile.capacities(target)}
        if target is not None
        else set()
    )
    shown = Table(title=f"Poisson arrivals: * what it serves within p99 <= {target:g} ms",
                  title_justify="left")  # fmt: skip
    for column in ("SMs", "quota", "offered req/s", "answered req/s", "p50 ms", "p95 ms",
                   "p99 ms", "errors"):  # fmt: skip
        shown.add_column(column, justify="right")
    for r in profile.open_loop:
        mark = " *" if (r.sm_percent, r.quota, r.offered_rps) in kept else ""
        shown.add_row(
            f"{r.sm_percent}%", f"{r.quota:g}", f"{r.offered_rps:.1f}{mark}",
            f"{r.answered_rps:.1f}", f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}",
            str(r.errors),
        )  # fmt: skip
    return shown
