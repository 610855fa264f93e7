"""`fast-gshare profile NAME`: a deployed function measured on the real path under a grid of
GPU settings.

For each (SM partition, quota) of the grid a copy of the function, `NAME-profile`, is deployed
through the provider with that share (quota request = limit) and one replica; for each
concurrency of the grid, that many closed-loop clients send the function's sample request
through the provider's proxy (proxy, gate, replica) for a while after a warm-up, and the
throughput and latency percentiles are kept. With a latency target, Poisson arrivals then
come at fractions of the best closed-loop throughput within it, highest first, until one
run's p99 meets the target: what the replica serves of traffic that comes when it comes.
The copy is deleted at the end, whatever happens; the function itself keeps serving
throughout. The profile names the GPU model the copy ran on, the one model of the install's
GPUs, read from the provider's /metrics (`fast_gshare_gpu_info`) before anything is deployed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from faas_provider.gpu.share import GPU_MEMORY, LATENCY_SLO
from faas_provider.models import rfc3339, utcnow
from faas_provider.profile.model import Measurement, Profile, RateMeasurement

COPY_SUFFIX = "-profile"
READY_TIMEOUT_S = 300.0


class ProfileError(Exception):
    """The profile cannot be made: what went wrong, and what to do."""


@dataclass(frozen=True)
class Grid:
    """The settings to measure, and for how long each."""

    sm_percents: tuple[int, ...] = (12, 25, 50, 100)
    quotas: tuple[float, ...] = (0.25, 0.5, 1.0)
    concurrencies: tuple[int, ...] = (1, 2, 4, 8)
    # Poisson rates, as fractions of the best closed-loop throughput within the target
    poisson_fractions: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    seconds: float = 5.0  # measured, per concurrency
    warmup_s: float = 1.0  # sent but not measured, before each

    @property
    def size(self) -> int:
        return len(self.sm_percents) * len(self.quotas) * len(self.concurrencies)


# a line of what it does, or a result
Progress = Callable[[str, Measurement | RateMeasurement | None], None]


async def profile_function(
    url: str,
    name: str,
    namespace: str,
    body: bytes,
    grid: Grid,
    latency_slo_ms: float | None = None,
    progress: Progress | None = None,
) -> Profile:
    """Measure function `name` under `grid` through the provider at `url`; the profile, also
    stored with the provider (it replaces the function's profile before)."""
    say = progress or (lambda line, result: None)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:
        original = await _status(session, name, namespace)
        if original is None:
            raise ProfileError(f"function {name} is not deployed in namespace {namespace}")
        if latency_slo_ms is None and LATENCY_SLO in original.get("annotations", {}):
            latency_slo_ms = float(original["annotations"][LATENCY_SLO])
        copy_name = f"{name}{COPY_SUFFIX}"
        models = await _gpu_models(session)
        if len(models) != 1:
            raise ProfileError(
                f"this install has GPUs of models {sorted(models) or 'unknown'}: a profile is of "
                "one GPU model"
            )
        measurements: list[Measurement] = []
        open_loop: list[RateMeasurement] = []
        try:
            for sm in grid.sm_percents:
                for quota in grid.quotas:
                    say(f"deploying {copy_name} at {sm}% SMs, quota {quota:g}", None)
                    await _redeploy(session, _copy(original, copy_name, sm, quota))
                    target = f"/function/{copy_name}.{namespace}"
                    for clients in grid.concurrencies:
                        say(f"{sm}% SMs, quota {quota:g}, {clients} in flight", None)
                        measured = await _measure(session, target, body, clients, grid)
                        result = Measurement(sm_percent=sm, quota=quota, concurrency=clients,
                                             **measured)  # fmt: skip
                        measurements.append(result)
                        say("", result)
                    if latency_slo_ms is not None:
                        here = measurements[-len(grid.concurrencies) :]
                        open_loop += await _search_poisson(
                            session, target, body, grid, latency_slo_ms, here, say
                        )
        finally:
            await _delete(session, copy_name, namespace)
        profile = Profile(
            function=f"{name}.{namespace}",
            gpu_model=models.pop(),
            made_at=rfc3339(utcnow()),
            latency_slo_ms=latency_slo_ms,
            measurements=measurements,
            open_loop=open_loop,
        )
        async with session.put(
            f"/system/profiles/{name}",
            params={"namespace": namespace},
            json=profile.model_dump(mode="json"),
        ) as stored:
            if stored.status != 202:
                raise ProfileError(f"the provider did not store it: {await stored.text()}")
        return profile


def _copy(original: dict[str, Any], copy_name: str, sm: int, quota: float) -> dict[str, Any]:
    """The deployment of the profiling copy: the function's own, at one setting, 1 replica."""
    annotations = {
        key: value
        for key, value in original.get("annotations", {}).items()
        if not key.startswith("fastgshare/") or key == GPU_MEMORY
    }
    annotations |= {
        "fastgshare/gpu_sm_partition": str(sm),
        "fastgshare/gpu_quota_request": str(quota),
        "fastgshare/gpu_quota_limit": str(quota),
    }
    labels = {
        key: value
        for key, value in original.get("labels", {}).items()
        if not key.startswith("com.openfaas.scale.") and key != "faas_function"
    }
    fields = ("image", "namespace", "envProcess", "envVars", "secrets", "limits", "requests",
              "readOnlyRootFilesystem", "constraints")  # fmt: skip
    copied = {key: original[key] for key in fields if key in original}
    return {**copied, "service": copy_name, "annotations": annotations, "labels": labels}


async def _status(
    session: aiohttp.ClientSession, name: str, namespace: str
) -> dict[str, Any] | None:
    async with session.get(f"/system/function/{name}", params={"namespace": namespace}) as got:
        if got.status == 404:
            return None
        if got.status != 200:
            raise ProfileError(f"the provider answered {got.status}: {await got.text()}")
        status: dict[str, Any] = await got.json()
        return status


async def _redeploy(session: aiohttp.ClientSession, deployment: dict[str, Any]) -> None:
    """Deploy `deployment` afresh (its old replica gone first) and wait for its replica."""
    name, namespace = deployment["service"], deployment["namespace"]
    await _delete(session, name, namespace)
    async with session.post("/system/functions", json=deployment) as made:
        if made.status not in (200, 202):
            raise ProfileError(f"deploying {name} was refused: {made.status} {await made.text()}")
    began = time.monotonic()
    while time.monotonic() - began < READY_TIMEOUT_S:
        status = await _status(session, name, namespace)
        if status is not None and status.get("availableReplicas", 0) >= 1:
            return
        await asyncio.sleep(0.2)
    raise ProfileError(f"{name} had no ready replica after {READY_TIMEOUT_S:.0f} s")


async def _delete(session: aiohttp.ClientSession, name: str, namespace: str) -> None:
    async with session.delete(
        "/system/functions", json={"functionName": name, "namespace": namespace}
    ) as deleted:
        if deleted.status not in (200, 202, 404):
            raise ProfileError(f"deleting {name} failed: {deleted.status} {await deleted.text()}")
    for _ in range(int(READY_TIMEOUT_S / 0.1)):
        if await _status(session, name, namespace) is None:
            return
        await asyncio.sleep(0.1)
    raise ProfileError(f"{name} was still there {READY_TIMEOUT_S:.0f} s after its deletion")


async def _gpu_models(session: aiohttp.ClientSession) -> set[str]:
    """The models of the GPUs of the provider's inventory (the copy runs on one of them)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get("/metrics") as answer:
        text = await answer.text()
    return {
        sample.labels["model"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fast_gshare_gpu_info"
    }


async def _search_poisson(
    session: aiohttp.ClientSession,
    target: str,
    body: bytes,
    grid: Grid,
    latency_slo_ms: float,
    closed_loop: list[Measurement],
    say: Progress,
) -> list[RateMeasurement]:
    """Poisson runs at grid.poisson_fractions of the best of `closed_loop` (one setting's)
    within the target, highest first, until one meets it; none when none of them did."""
    within = [m.throughput_rps for m in closed_loop if not m.errors and m.p99_ms <= latency_slo_ms]
    if not within:
        return []
    setting = closed_loop[0]
    runs = []
    for fraction in sorted(grid.poisson_fractions, reverse=True):
        rate = max(within) * fraction
        say(f"{setting.sm_percent}% SMs, quota {setting.quota:g}, Poisson {rate:.1f} req/s", None)
        measured = await _measure_poisson(session, target, body, rate, grid)
        run = RateMeasurement(sm_percent=setting.sm_percent, quota=setting.quota,
                              offered_rps=rate, **measured)  # fmt: skip
        runs.append(run)
        say("", run)
        if not run.errors and run.p99_ms <= latency_slo_ms:
            break
    return runs


async def _measure_poisson(
    session: aiohttp.ClientSession, target: str, body: bytes, rate_rps: float, grid: Grid
) -> dict[str, Any]:
    """Open-loop Poisson arrivals at `rate_rps` on `target`, each timed from its scheduled
    arrival: warm up, then measure those that arrive within grid.seconds."""
    latencies: list[float] = []
    errors = 0
    rng = random.Random(0)
    start = time.monotonic() + grid.warmup_s
    end = start + grid.seconds

    async def call(arrival: float) -> None:
        nonlocal errors
        ok = await _post(session, target, body)
        if arrival >= start:
            if ok:
                latencies.append(time.monotonic() - arrival)
            else:
                errors += 1

    calls = []
    arrival = time.monotonic()
    while (arrival := arrival + rng.expovariate(rate_rps)) < end:
        await asyncio.sleep(max(0.0, arrival - time.monotonic()))
        calls.append(asyncio.create_task(call(arrival)))
    await asyncio.gather(*calls)
    answered = len(latencies) / grid.seconds
    return {"answered_rps": answered, **_percentiles(latencies), "errors": errors}


async def _post(session: aiohttp.ClientSession, target: str, body: bytes) -> bool:
    """Send the sample request to `target`; whether it was answered with a 2xx."""
    try:
        async with session.post(target, data=body) as answer:
            await answer.read()
            return 200 <= answer.status < 300
    except (aiohttp.ClientError, TimeoutError):
        return False


def _percentiles(latencies: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of `latencies` (seconds) in ms; 0 for none."""
    ordered = sorted(latencies)

    def percentile(fraction: float) -> float:
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    return {"p50_ms": percentile(0.50), "p95_ms": percentile(0.95), "p99_ms": percentile(0.99)}


async def _measure(
    session: aiohttp.ClientSession, target: str, body: bytes, clients: int, grid: Grid
) -> dict[str, Any]:
    """`clients` closed-loop clients on `target`: warm up, then measure for grid.seconds."""
    latencies: list[float] = []
    errors = 0
    start = time.monotonic() + grid.warmup_s
    end = start + grid.seconds

    async def client() -> None:
        nonlocal errors
        while (sent := time.monotonic()) < end:
            ok = await _post(session, target, body)
            done = time.monotonic()
            if sent >= start:
                if ok:
                    latencies.append(done - sent)
                else:
                    errors += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    throughput = len(latencies) / grid.seconds
    return {"throughput_rps": throughput, **_percentiles(latencies), "errors": errors}
