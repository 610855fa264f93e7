"""`fast-gshare profile` as a user runs it: the command against a running provider, a
function written for the stock template under a grid of settings, through the real path
(proxy, gate, replica) on the virtual GPU: progress and a table, the profile stored with the
provider, written as JSON and drawn as a PNG, the quota biting, Poisson runs under the
target, the copy gone afterwards; and capacity from Poisson runs."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from faas_provider.api.app import create_app
from faas_provider.profile.model import Measurement, Profile, RateMeasurement
from faas_provider.settings import Settings
from tests.conftest import REPO, STEER, faas_cli_deploy, local_backend, wait_available


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faas_provider.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_profile_measures_every_setting_and_stores_the_profile(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(local_backend(settings), settings))
    assert await faas_cli_deploy(client, STEER) == 202
    await wait_available(client, "steer")
    url = f"http://127.0.0.1:{client.server.port}"
    out = tmp_path / "steer.profile.json"
    code, shown, errors = await run_cli(
        "profile", "steer", "--url", url, "--body", "sleep 0.02", "--sm", "50,100",
        "--quota", "0.5,1", "--concurrency", "1,2", "--seconds", "1.5", "--warmup", "0.3",
        "--poisson", "0.9,0.5", "--latency-slo-ms", "500", "--out", str(out),
    )  # fmt: skip
    assert code == 0, errors
    lines = [" ".join(line.split()) for line in shown.splitlines()]
    assert any(line.startswith("50% SMs quota 0.5 1 in flight:") for line in lines), shown
    assert "steer.openfaas-fn on virtual" in shown, "the table"
    profile = json.loads(out.read_text())
    assert profile["function"] == "steer.openfaas-fn" and profile["gpu_model"] == "virtual"
    assert profile["latency_slo_ms"] == 500
    settings_measured = {
        (m["sm_percent"], m["quota"], m["concurrency"]) for m in profile["measurements"]
    }
    assert settings_measured == {(s, q, c) for s in (50, 100) for q in (0.5, 1.0) for c in (1, 2)}
    by_setting = {
        (m["sm_percent"], m["quota"], m["concurrency"]): m for m in profile["measurements"]
    }
    for m in by_setting.values():
        assert m["errors"] == 0 and m["p50_ms"] >= 20, "each call sleeps 20 ms"
    for sm in (50, 100):  # a quota of half the window serves about half as much
        half, whole = by_setting[(sm, 0.5, 1)], by_setting[(sm, 1.0, 1)]
        assert 10 < whole["throughput_rps"] <= 50, whole
        assert half["throughput_rps"] < 0.75 * whole["throughput_rps"], (half, whole)
    # then Poisson arrivals at 0.9 of each setting's best within the target, met at once
    assert any(line.startswith("50% SMs quota 0.5 Poisson") for line in lines), shown
    assert "Poisson arrivals: * what it serves within p99 <= 500 ms" in shown
    runs = {(r["sm_percent"], r["quota"]): r for r in profile["open_loop"]}
    assert set(runs) == {(s, q) for s in (50, 100) for q in (0.5, 1.0)}, profile["open_loop"]
    for (sm, quota), run in runs.items():
        best = max(by_setting[(sm, quota, c)]["throughput_rps"] for c in (1, 2))
        assert run["offered_rps"] == pytest.approx(0.9 * best)
        assert run["p99_ms"] <= 500 and run["errors"] == 0
        assert run["answered_rps"] == pytest.approx(run["offered_rps"], rel=0.35), run
    stored = await (await client.get("/system/profiles/steer")).json()
    assert stored == profile, "the provider keeps the same profile"
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (await client.get("/system/function/steer-profile")).status == 404, "copy gone"
    assert (await client.post("/function/steer", data=b"hello")).status == 200


async def test_profile_of_an_unknown_function_says_so(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(local_backend(settings), settings))
    url = f"http://127.0.0.1:{client.server.port}"
    code, _, errors = await run_cli("profile", "nobody", "--url", url, "--body", "x",
                                    "--out", str(tmp_path / "p.json"))  # fmt: skip
    assert code != 0 and "function nobody is not deployed in namespace openfaas-fn" in errors
    code, _, errors = await run_cli("profile", "x", "--url", url, "--body", "x", "--sm", "a")
    assert code != 0 and "--sm, --quota, --concurrency and --poisson" in errors
    code, _, errors = await run_cli("profile", "x", "--url", url, "--body", "x", "--poisson", "2")
    assert code != 0 and "--poisson takes fractions above 0 and at most 1" in errors


def test_capacity_is_the_fastest_poisson_rate_within_the_target() -> None:
    def closed(sm: int, rps: float) -> Measurement:
        return Measurement(sm_percent=sm, quota=1.0, concurrency=8, throughput_rps=rps,
                           p50_ms=10, p95_ms=15, p99_ms=20)  # fmt: skip

    def poisson(sm: int, rps: float, p99: float) -> RateMeasurement:
        return RateMeasurement(sm_percent=sm, quota=1.0, offered_rps=rps, answered_rps=rps,
                               p50_ms=10, p95_ms=p99 / 2, p99_ms=p99)  # fmt: skip

    profile = Profile(
        function="f.openfaas-fn", gpu_model="virtual", made_at="2026-12-02T00:00:00Z",
        latency_slo_ms=50,
        measurements=[closed(12, 600), closed(25, 640), closed(50, 580)],
        open_loop=[poisson(12, 540, 90), poisson(12, 480, 45), poisson(25, 570, 80),
                   poisson(25, 320, 60)],
    )  # fmt: skip
    capacities = {c.sm_percent: c.throughput_rps for c in profile.capacities(50)}
    # 12%: 540 missed, 480 met; 25%: no Poisson rate met the target; 50%: no runs, closed loop
    assert capacities == {12: 480, 50: 580}
    assert {c.sm_percent: c.throughput_rps for c in profile.capacities(100)} == {
        12: 540,
        25: 570,
        50: 580,
    }, "a looser target keeps the faster rates, never above the closed-loop one"
