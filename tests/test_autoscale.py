"""The autoscaler applying its decisions through a real provider and its local backend, with
real replica processes: the latency histogram and the clock are given, so a minute passes in a
tick. Without a profile: replicas on the rate, then scale to zero when idle. With a profile of
this install's GPU model: the setting with the least footprint (a new share, its replicas
replaced) and then more replicas of it; a profile of another model is not applied."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from faas_provider.api.app import create_app
from faas_provider.api.keys import AUTOSCALER, BACKEND
from faas_provider.autoscale.loop import Autoscaler
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.settings import Settings
from tests.conftest import (
    ECHO,
    STEER,
    a_profile,
    faas_cli_deploy,
    local_backend,
    wait_available,
)


class Given:
    """The latency histogram (the calls by how long they took) and the clock the autoscaler
    reads, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0
        self.latencies: dict[str, dict[float, float]] = {}

    def serve(self, function: str, rps: float, seconds: float, slow: float = 0.0) -> None:
        """`rps` for `seconds`, `slow` of the calls answered in 0.2 s, the rest in 10 ms."""
        calls = rps * seconds
        buckets = self.latencies.setdefault(function, {0.01: 0.0, 0.2: 0.0, math.inf: 0.0})
        buckets[0.01] += calls * (1 - slow)
        buckets[0.2] += calls
        buckets[math.inf] += calls
        self.now += seconds


async def provider(aiohttp_client: Any, settings: Settings) -> tuple[TestClient, LocalBackend]:
    backend = local_backend(settings)
    quiet = settings.model_copy(update={"autoscale_tick_s": None})  # the test ticks it
    return await aiohttp_client(create_app(backend, quiet)), backend


async def status(client: TestClient, name: str) -> dict[str, Any]:
    answer: dict[str, Any] = await (await client.get(f"/system/function/{name}")).json()
    return answer


async def test_replicas_follow_the_rate_then_go_to_zero_when_idle(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client, backend = await provider(aiohttp_client, settings)
    labels = {
        "com.openfaas.scale.max": "4",
        "com.openfaas.scale.target": "10",
        "com.openfaas.scale.zero": "true",
        "com.openfaas.scale.zero-duration": "30s",
    }
    assert await faas_cli_deploy(client, {**STEER, "labels": labels}) == 202
    plain = {**STEER, "service": "plain"}  # asks for no autoscaling
    assert await faas_cli_deploy(client, plain) == 202
    await wait_available(client, "steer")
    given = Given()
    autoscaler = Autoscaler(
        backend, lambda: given.latencies, lambda: {"virtual"}, clock=lambda: given.now
    )
    caplog.set_level(logging.INFO, logger="fast_gshare.autoscaler")
    await autoscaler.tick()
    assert (await status(client, "steer"))["replicas"] == 1, "no calls yet: its minimum"
    assert (
        "steer.openfaas-fn scales its replicas on the rate alone: it has no profile" in caplog.text
    )
    for _ in range(3):  # 30 req/s at 10 a replica
        given.serve("steer.openfaas-fn", 30, 2.0)
        given.serve("plain.openfaas-fn", 300, 0.0)
        await autoscaler.tick()
    assert (await status(client, "steer"))["replicas"] == 3
    await wait_available(client, "steer", 3)
    assert (await status(client, "plain"))["replicas"] == 1, "not autoscaled: left alone"
    assert "autoscaler: steer.openfaas-fn 1 -> 3 replicas: " in caplog.text
    for _ in range(50):  # 100 s without a call
        given.serve("steer.openfaas-fn", 0, 2.0)
        await autoscaler.tick()
    assert (await status(client, "steer"))["replicas"] == 0
    assert "3 -> 0 replicas: idle for" in caplog.text
    metrics = await (await client.get("/metrics")).text()
    assert metrics  # the app's own; the autoscaler made here is read directly
    decisions = {
        (s.labels["function_name"], s.labels["action"]): s.value
        for family in autoscaler.collector().collect()
        for s in family.samples
        if s.name == "fast_gshare_autoscaler_decisions_total"
    }
    assert decisions == {("steer.openfaas-fn", "up"): 1.0, ("steer.openfaas-fn", "zero"): 1.0}


async def profiled(
    aiohttp_client: Any,
    settings: Settings,
    model: str,
    measured: tuple[tuple[int, float], ...] = ((25, 40.0), (50, 60.0), (100, 70.0)),
) -> tuple[TestClient, Given, Autoscaler]:
    """STEER at 50% SMs with a 100 ms target and a profile made on `model` (req/s a replica
    at each SM partition of `measured`), and an autoscaler of this install (a virtual GPU)
    with a given clock and latency histogram."""
    client, backend = await provider(aiohttp_client, settings)
    share = {"fastgshare/gpu_sm_partition": "50", "fastgshare/latency_slo_ms": "100"}
    assert await faas_cli_deploy(client, {**STEER, "annotations": share}) == 202
    await wait_available(client, "steer")
    profile = a_profile("steer.openfaas-fn", model, measured)
    assert (await client.put("/system/profiles/steer", json=profile)).status == 202
    given = Given()
    autoscaler = Autoscaler(
        backend,
        lambda: given.latencies,
        lambda: {"virtual"},
        clock=lambda: given.now,
    )
    return client, given, autoscaler


async def test_with_a_profile_the_least_footprint_setting_is_applied(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client, given, autoscaler = await profiled(aiohttp_client, settings, "virtual")
    caplog.set_level(logging.INFO, logger="fast_gshare.autoscaler")
    given.serve("steer.openfaas-fn", 20, 2.0)
    await autoscaler.tick()
    now = await wait_available(client, "steer")
    # 20 req/s: one replica at 25% (0.25 of a GPU) in place of one at 50% (0.5)
    assert now["annotations"]["fastgshare/gpu_sm_partition"] == "25"
    assert now["annotations"]["fastgshare/gpu_quota_request"] == "1"
    assert (
        "steer.openfaas-fn to 25% SMs, quota 1 (new replicas, then the old ones go)" in caplog.text
    )
    assert (await client.post("/function/steer", data=b"hello")).status == 200
    for _ in range(4):  # 100 req/s: four at 25% (1.0 of a GPU) beat three at 50% (1.5)
        given.serve("steer.openfaas-fn", 100, 2.0)
        await autoscaler.tick()
    after = await wait_available(client, "steer", 4)
    assert after["annotations"]["fastgshare/gpu_sm_partition"] == "25" and after["replicas"] == 4
    (footprint,) = [
        s.value for family in autoscaler.collector().collect() for s in family.samples
        if s.name == "fast_gshare_autoscaler_footprint_ratio"
    ]  # fmt: skip
    assert footprint == pytest.approx(1.0)


async def test_calls_slower_than_the_target_teach_it_to_plan_on_less(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    measured = ((25, 400.0), (50, 600.0))
    client, given, autoscaler = await profiled(aiohttp_client, settings, "virtual", measured)
    caplog.set_level(logging.INFO, logger="fast_gshare.autoscaler")
    given.serve("steer.openfaas-fn", 20, 2.0)
    await autoscaler.tick()  # to 25%: one replica serves 400 x 0.7
    await wait_available(client, "steer")
    for _ in range(4):
        given.serve("steer.openfaas-fn", 250, 2.0)
        await autoscaler.tick()
    assert (await status(client, "steer"))["replicas"] == 1, "250 <= 0.7 x 400: one serves it"
    for _ in range(2):  # 3% of the calls answered after the 100 ms target
        given.serve("steer.openfaas-fn", 250, 2.0, slow=0.03)
        await autoscaler.tick()
    learned = 250 * 0.85 / 0.7
    assert (
        f"steer.openfaas-fn serves less than its profile says: 30 of 1500 calls over 6 s "
        f"missed the target at 250.0 req/s a replica at most (1 serving), which its plan says one "
        f"serves: planning on {learned / 400:.0%} of its profile's figures for 300 s "
        f"({learned:.0f} req/s a replica at 25% SMs, quota 1, not 400)"
    ) in caplog.text
    after = await wait_available(client, "steer", 2)
    assert after["annotations"]["fastgshare/gpu_sm_partition"] == "25"
    samples = {
        (s.name, s.labels.get("action")): s.value
        for family in autoscaler.collector().collect()
        for s in family.samples
    }
    assert samples[("fast_gshare_autoscaler_learned_ratio", None)] == pytest.approx(learned / 400)
    assert samples[("fast_gshare_autoscaler_decisions_total", "learned")] == 1


async def test_a_profile_of_another_gpu_model_is_not_applied(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client, given, autoscaler = await profiled(aiohttp_client, settings, "NVIDIA H200")
    caplog.set_level(logging.INFO, logger="fast_gshare.autoscaler")
    given.serve("steer.openfaas-fn", 20, 2.0)
    await autoscaler.tick()
    assert "its profile is of an NVIDIA H200, which this install does not have" in caplog.text
    assert (await status(client, "steer"))["annotations"]["fastgshare/gpu_sm_partition"] == "50"


async def test_either_backend_scales_as_the_autoscaler_decides(
    provider: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    labels = {"com.openfaas.scale.max": "3", "com.openfaas.scale.target": "10"}
    assert await faas_cli_deploy(provider, {**ECHO, "labels": labels}) == 202
    await wait_available(provider, "echo")
    given = Given()
    backend = provider.server.app[BACKEND]
    autoscaler = Autoscaler(backend, lambda: given.latencies, set, clock=lambda: given.now)
    caplog.set_level(logging.INFO, logger="fast_gshare.autoscaler")
    for _ in range(3):
        given.serve("echo.openfaas-fn", 50, 2.0)  # 50 req/s: past the most, 3
        await autoscaler.tick()
    await wait_available(provider, "echo", 3)
    assert "echo.openfaas-fn 1 -> 3 replicas: panic (a burst: 50.0 req/s over 6 s)" in caplog.text
    assert "held at the most, 3" in caplog.text


async def test_a_profile_stored_through_the_provider_is_followed_at_the_next_tick(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    slow = settings.model_copy(update={"autoscale_tick_s": 3600.0})  # the test ticks it
    client = await aiohttp_client(create_app(local_backend(slow), slow))
    autoscaler = client.server.app[AUTOSCALER]
    share = {"fastgshare/gpu_sm_partition": "50", "fastgshare/latency_slo_ms": "100"}
    assert await faas_cli_deploy(client, {**STEER, "annotations": share}) == 202
    await wait_available(client, "steer")
    caplog.set_level(logging.INFO, logger="fast_gshare.autoscaler")
    await autoscaler.tick()
    assert (
        "steer.openfaas-fn scales its replicas on the rate alone: it has no profile" in caplog.text
    )
    profile = a_profile("steer.openfaas-fn", "virtual", ((25, 40.0), (50, 60.0)))
    assert (await client.put("/system/profiles/steer", json=profile)).status == 202
    await autoscaler.tick()  # not PROFILE_REFRESH_S later: at once
    now = await wait_available(client, "steer")
    assert now["annotations"]["fastgshare/gpu_sm_partition"] == "25", "no call: the least"


async def test_a_tick_that_fails_is_logged_and_the_autoscaler_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky:
        """A backend whose first look fails as a bug would."""

        calls = 0

        async def list_namespaces(self) -> list[str]:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("a bug")
            return []

    autoscaler = Autoscaler(Flaky(), dict, set, tick_s=0.01)  # type: ignore[arg-type]
    running = asyncio.create_task(autoscaler.run())
    await asyncio.sleep(0.1)
    assert not running.done() and Flaky.calls > 2, "it goes on ticking"
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    assert "autoscaler: this tick failed" in caplog.text and "RuntimeError: a bug" in caplog.text
