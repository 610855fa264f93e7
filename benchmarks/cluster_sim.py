"""A GPU cluster under a serverless trace, three ways: how many GPUs each needs, and how many
requests miss their latency target.

    python benchmarks/cluster_sim.py [--functions 300] [--gpus 100] [--hours 2] [--seed 0]
                                     [--replica-start-s 3]

The functions' capacities come from profiles measured on an H200 (benchmarks/results/
profile-*.json, made by benchmarks/profiler.py), each function one of them. Rates follow the
shape of published serverless traces: most functions rare, a few hot (log-uniform means in
three bands), one diurnal cycle over the run, and bursts (8x for 30 s). Requests arrive as a
Poisson process, seeded. Every function scales to zero after 5 idle minutes, under every
strategy alike.

- exclusive: one whole GPU per replica (what faas-netes gives with nvidia.com/gpu: 1), each
  replica at 100% of the SMs.
- equal-mps: NVIDIA's device plugin with MPS, each GPU cut into --slices equal slices; a
  replica is one slice (100/slices % of the SMs, the whole time).
- fast-gshare: the profile's every setting; the autoscaler picks the least footprint.

All three run fast-gshare's own autoscaler (autoscale/decide.py: FunctionScaler, with its
stable and panic windows) and placement (gpu/placement.py: Placer), the first two restricted to
the one setting they allow. A new replica serves --replica-start-s after it is asked for (3 s:
2.8 s measured on an H200 for 1 to 3 ResNet-50 replicas, forked from the fork server); a
request misses its target when it comes while its function has no replica ready, or past what
the ready replicas serve within the target (their profile's throughput at p99 <= target). The
scaler is told of those misses as the provider tells it of slow calls; here replicas serve
what their profile says, so the misses come from load that outran them and teach it nothing.
GPUs in use: those holding a replica.

Prints a table, writes benchmarks/results/cluster_sim.json and cluster_sim.png (or under --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from faas_provider.autoscale.decide import FunctionScaler, ScaleBounds, Setting  # noqa: E402
from faas_provider.gpu.discovery import GpuDevice  # noqa: E402
from faas_provider.gpu.placement import Placer  # noqa: E402
from faas_provider.gpu.share import GpuShare  # noqa: E402
from faas_provider.profile.model import Capacity, Profile  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TICK_S = 2.0
LATENCY_SLO_MS = 50.0
BURST_FACTOR, BURST_S, BURSTS_PER_HOUR = 8.0, 30.0, 0.5
ZERO_AFTER_S = 300.0
# mean request rates, req/s: (share of the functions, low, high), log-uniform within a band
BANDS = ((0.80, 0.01, 1.0), (0.15, 1.0, 50.0), (0.05, 50.0, 1500.0))


@dataclass
class Replica:
    key: str
    setting: Setting
    ready_at: float


@dataclass
class Function:
    name: str
    capacities: list[Capacity]  # those this strategy allows
    mean_rps: float
    bursts: list[float]  # start times
    scaler: FunctionScaler
    replicas: list[Replica] = field(default_factory=list)
    calls: float = 0.0
    slow: float = 0.0  # calls that missed the target
    next_key: int = 0


def load_profiles() -> list[Profile]:
    """The H200 profiles benchmarks/profiler.py made (the cluster is of H200s)."""
    every = [
        Profile.model_validate_json(p.read_text()) for p in sorted(RESULTS.glob("profile-*.json"))
    ]
    found = [p for p in every if p.gpu_model == "NVIDIA H200"]
    if not found:
        raise SystemExit("no H200 profile in benchmarks/results: run benchmarks/profiler.py first")
    return found


def allowed(profile: Profile, strategy: str, slices: int) -> list[Capacity]:
    """The capacities within the target that a strategy may use for this profile."""
    within = profile.capacities(LATENCY_SLO_MS)
    whole_time = [c for c in within if c.quota == 1.0]
    if strategy == "exclusive":
        return [c for c in whole_time if c.sm_percent == 100]
    if strategy == "equal-mps":
        # the slice's SM share; a profile measured near it stands for it (never above it)
        slice_sm = 100 // slices
        below = [c for c in whole_time if c.sm_percent <= slice_sm]
        if not below:
            return []
        nearest = max(c.sm_percent for c in below)
        return [
            c.model_copy(update={"sm_percent": slice_sm}) for c in below if c.sm_percent == nearest
        ]
    return within


def share_of(setting: Setting, strategy: str) -> GpuShare:
    if strategy == "exclusive":
        return GpuShare(100, 1.0, 1.0, None, exclusive=True)
    return GpuShare(setting.sm_percent, setting.quota, setting.quota, None)


def rate_at(function: Function, now: float, hours: float) -> float:
    """The function's rate at `now`: its mean on one diurnal cycle, times a burst's factor."""
    day = 1.0 + 0.6 * math.sin(2 * math.pi * now / (hours * 3600) - math.pi / 2)
    burst = any(start <= now < start + BURST_S for start in function.bursts)
    return function.mean_rps * day * (BURST_FACTOR if burst else 1.0)


def simulate(strategy: str, args: argparse.Namespace, profiles: list[Profile]) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)  # the same trace for every strategy
    seconds = args.hours * 3600
    bounds = ScaleBounds(min_replicas=1, max_replicas=200, zero=True, zero_duration_s=ZERO_AFTER_S)
    functions = []
    for i in range(args.functions):
        band = rng.choice(len(BANDS), p=[b[0] for b in BANDS])
        low, high = BANDS[band][1:]
        mean = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        profile = profiles[i % len(profiles)]
        bursts = sorted(rng.uniform(0, seconds, rng.poisson(BURSTS_PER_HOUR * args.hours)))
        capacities = allowed(profile, strategy, args.slices)
        if not capacities:
            raise SystemExit(f"{profile.function}: no setting of {strategy} meets the target")
        functions.append(
            Function(f"f{i}-{profile.function.split('.')[0]}", capacities, mean,
                     [float(b) for b in bursts], FunctionScaler(bounds, capacities))
        )  # fmt: skip
    devices = [GpuDevice(i, f"GPU-{i}", "NVIDIA H200", 141 * 1024**3) for i in range(args.pool)]
    placer = Placer(devices, where="the simulated cluster")
    total = missed = 0
    timeline: list[tuple[float, int, float]] = []
    most = 0
    gpu_seconds = 0.0
    footprint_seconds = 0.0
    ticks = int(seconds / TICK_S)
    for tick in range(ticks):
        now = tick * TICK_S
        offered = 0.0
        for f in functions:
            rate = rate_at(f, now, args.hours)
            offered += rate
            arrivals = int(rng.poisson(rate * TICK_S))
            ready = [r for r in f.replicas if r.ready_at <= now]
            capacity = sum(_throughput(f, r.setting) for r in ready) * TICK_S
            served = min(arrivals, int(capacity))
            total += arrivals
            missed += arrivals - served
            f.calls += arrivals
            f.slow += arrivals - served
            f.scaler.observe(now, f.calls, f.slow)
            current = f.replicas[0].setting if f.replicas else None
            decision = f.scaler.decide(now, len(ready), current, len(f.replicas))
            _apply(f, decision.plan.replicas, decision.plan.setting, now, args, placer, strategy)
        in_use = sum(1 for load in placer.loads if load.shares)
        most = max(most, in_use)
        gpu_seconds += in_use * TICK_S
        footprint_seconds += sum(load.footprint for load in placer.loads) / 100 * TICK_S
        timeline.append((now, in_use, offered))
        if tick % max(1, ticks // 10) == 0:
            print(f"  {strategy:<11} {now / 60:5.0f} min  {in_use:4d} GPUs in use  "
                  f"{offered:8.0f} req/s offered", flush=True)  # fmt: skip
    return {
        "gpus": most,
        "fits_cluster": most <= args.gpus,
        "mean_gpus": gpu_seconds / seconds,
        "gpu_hours": gpu_seconds / 3600,
        "footprint_gpu_hours": footprint_seconds / 3600,
        "requests": total,
        "slo_missed": missed,
        "slo_miss_ratio": missed / total if total else 0.0,
        "timeline": timeline[:: max(1, len(timeline) // 600)],
    }


def _throughput(function: Function, setting: Setting) -> float:
    for c in function.capacities:
        if (c.sm_percent, c.quota) == (setting.sm_percent, setting.quota):
            return c.throughput_rps
    return 0.0


def _apply(
    f: Function,
    wanted: int,
    setting: Setting | None,
    now: float,
    args: argparse.Namespace,
    placer: Placer,
    strategy: str,
) -> None:
    """What the backend does with a plan: new replicas start (ready after the start time),
    surplus ones go; at a new setting the new ones are started and the old ones go once they
    are ready."""
    assert setting is not None
    old = [r for r in f.replicas if r.setting != setting]
    same = [r for r in f.replicas if r.setting == setting]
    if old and all(r.ready_at <= now for r in same) and len(same) >= min(wanted, 1):
        for r in old:
            placer.release(r.key)
        f.replicas = same
        old = []
    while len(same) < wanted:
        key = f"{f.name}/{f.next_key}"
        f.next_key += 1
        device = placer.place(key, share_of(setting, strategy))
        if isinstance(device, str):
            break  # the pool is full: it waits (the simulation's pool is sized not to be)
        same.append(Replica(key, setting, now + args.replica_start_s))
    while len(same) > wanted:
        gone = max(same, key=lambda r: r.ready_at)  # the youngest first
        same.remove(gone)
        placer.release(gone.key)
    f.replicas = old + same


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gpus, load) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, result in results.items():
        times = [t / 60 for t, _, _ in result["timeline"]]
        gpus.plot(
            times, [g for _, g, _ in result["timeline"]], label=f"{name} (peak {result['gpus']})"
        )
    first = next(iter(results.values()))["timeline"]
    load.plot([t / 60 for t, _, _ in first], [r for _, _, r in first], color="grey")
    gpus.set_ylabel("GPUs in use")
    gpus.legend()
    gpus.grid(alpha=0.3)
    load.set_ylabel("offered req/s")
    load.set_xlabel("minutes")
    load.grid(alpha=0.3)
    figure.suptitle("One trace, three ways to share the GPUs (H200 profiles, p99 <= 50 ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--functions", type=int, default=300)
    parser.add_argument("--gpus", type=int, default=100, help="the cluster's GPUs")
    parser.add_argument("--pool", type=int, default=2000, help="GPUs the simulation may use")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--slices", type=int, default=4, help="equal-mps slices a GPU")
    parser.add_argument("--replica-start-s", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default="exclusive,equal-mps,fast-gshare")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    args = parser.parse_args()
    profiles = load_profiles()
    print(f"profiles: {', '.join(f'{p.function} ({p.gpu_model})' for p in profiles)}")
    results = {}
    for strategy in args.strategies.split(","):
        began = time.monotonic()
        results[strategy] = simulate(strategy, args, profiles)
        print(f"  {strategy}: {time.monotonic() - began:.0f} s to simulate", flush=True)
    print(
        f"\n{'strategy':<12} {'peak GPUs':>9} {'mean GPUs':>9} {'GPU-hours':>9} {'SLO misses':>11}"
    )
    for name, r in results.items():
        print(f"{name:<12} {r['gpus']:>9} {r['mean_gpus']:>9.1f} {r['gpu_hours']:>9.1f} "
              f"{r['slo_miss_ratio']:>10.3%}")  # fmt: skip
    if "fast-gshare" in results:
        ours = results["fast-gshare"]["gpus"]
        for other in ("exclusive", "equal-mps"):
            if other in results:
                print(
                    f"fast-gshare uses {results[other]['gpus'] / ours:.2f}x fewer GPUs than {other}"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "cluster_sim",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "profiles": [f"{p.function} on {p.gpu_model}" for p in profiles],
        "strategies": results,
    }
    (args.out / "cluster_sim.json").write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out / 'cluster_sim.json'}")
    try:
        plot(results, args.out / "cluster_sim.png")
        print(f"drew {args.out / 'cluster_sim.png'}")
    except ImportError:
        print("no PNG: matplotlib is not installed")


if __name__ == "__main__":
    main()
