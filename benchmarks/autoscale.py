"""The autoscaler on a GPU: how fast a function scales up, and how it follows a ramp of load,
for a ResNet-50 function (fp16) on one GPU.

    python benchmarks/autoscale.py [--modes start ramp] [--repeats 3] [--peak 3000] \\
        [--ramp-seconds 180] [--processes 8] [--profile benchmarks/results/profile-resnet50.json]

start:
- zero-to-first-answer: the function at 0 replicas is scaled to 1, as the gateway does when a
  request comes for it, and a 224 x 224 JPEG is sent until it is answered 200 (the gateway holds
  the request meanwhile): from the scale call to that answer.
- one-to-three: from the scale call to three replicas ready.

The replicas are forked from the provider's fork server (torch and torchvision imported
already); each one creates its CUDA context, loads the model and warms it up.

ramp: the function with a 50 ms p99 target, its profile made on the same GPU model (--profile:
benchmarks/results/profile-resnet50.json is the H200's, profile-resnet50-h100.json the H100's),
`com.openfaas.scale.max` 20 and scale to zero after 30 idle seconds;
open-loop Poisson load of one JPEG a request from --processes processes, 50 req/s rising to
--peak, held, and falling back to 50 over --ramp-seconds, then none; arrivals keep their own
clock and each request is timed from its scheduled arrival. Per second: the rate offered and
answered; the p99 of the requests sent in it end to end, of their time in the replica
(X-Duration-Seconds) and of their wait for a gate token (the gate's Server-Timing); the
replicas and the GPU footprint they hold (the autoscaler's plan, less replicas waiting for GPU
room), and how busy the machine's CPUs were.
Reported: the share of seconds past the ramp's first 10 whose p99 was within the target, the
GPU-share-seconds held against a deployment sized for the peak, when it scaled to zero, each
failed request (its second, its status; 0 for no answer), and the autoscaler's decisions and
the provider's warnings from its log.

Prints tables, writes benchmarks/results/autoscale.json (and autoscale.png for the ramp).
Needs torch and torchvision.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharing import REPO, _jpeg, _percentile_ms, provider

from faas_provider.gate.gate import WAIT_TIMING

RESULTS = REPO / "benchmarks" / "results" / "autoscale.json"
LOW_RPS = 50.0
SETTLE_S = 10  # the ramp's first seconds, not judged
IDLE_WAIT_S = 90.0  # after the load: time given to scale to zero
FUNCTION = {
    "image": "fast-gshare/resnet50:0.1.0",
    "annotations": {"fastgshare/gpu_sm_partition": "25"},
    "labels": {"com.openfaas.scale.min": "1"},
}


def scale(base: str, replicas: int) -> None:
    body = json.dumps({"serviceName": "resnet50", "replicas": replicas}).encode()
    request = urllib.request.Request(f"{base}/system/scale-function/resnet50", data=body)
    with urllib.request.urlopen(request, timeout=10):
        pass


def available(base: str) -> int:
    with urllib.request.urlopen(f"{base}/system/function/resnet50", timeout=10) as answer:
        return int(json.loads(answer.read())["availableReplicas"])


def answered(base: str, image: bytes) -> bool:
    request = urllib.request.Request(f"{base}/function/resnet50", data=image)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status == 200
    except (urllib.error.URLError, TimeoutError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=["start", "ramp"], choices=["start", "ramp"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak", type=float, default=3000.0, help="req/s at the ramp's top")
    parser.add_argument("--ramp-seconds", type=float, default=180.0)
    parser.add_argument("--processes", type=int, default=8, help="load generating processes")
    parser.add_argument("--workers", type=int, default=1, help="the provider's --workers")
    parser.add_argument(
        "--profile",
        type=Path,
        default=REPO / "benchmarks/results/profile-resnet50.json",
        help="the function's profile, made on this GPU model, for the ramp",
    )
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results |= {"benchmark": "autoscale", "card": _card()}

    def save(mode: str, result: dict[str, Any]) -> None:
        results[mode] = result
        results["when"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {RESULTS}", flush=True)

    if "start" in args.modes:
        save("start", start(args))
    if "ramp" in args.modes:
        ramp(args, lambda result: save("ramp", result))


def start(args: argparse.Namespace) -> dict[str, Any]:
    """Scale from zero to the first answer, and from one replica to three."""
    image = _jpeg()
    zero: list[float] = []
    three: list[float] = []
    with provider({"resnet50": FUNCTION}) as base:
        for attempt in range(args.repeats):
            scale(base, 0)
            while available(base) > 0:
                time.sleep(0.1)
            began = time.monotonic()
            scale(base, 1)
            while not answered(base, image):
                time.sleep(0.05)
            zero.append(time.monotonic() - began)
            began = time.monotonic()
            scale(base, 3)
            while available(base) < 3:
                time.sleep(0.05)
            three.append(time.monotonic() - began)
            print(f"  attempt {attempt + 1}: 0 -> first answer {zero[-1]:.2f} s, "
                  f"1 -> 3 ready {three[-1]:.2f} s", flush=True)  # fmt: skip
    result = {
        "zero_to_first_answer_s": zero,
        "one_to_three_ready_s": three,
        "zero_to_first_answer_median_s": statistics.median(zero),
        "one_to_three_ready_median_s": statistics.median(three),
    }
    print(f"\n{'step':<28} {'median':>8} {'each':>24}")
    print(f"{'0 -> first answer':<28} {result['zero_to_first_answer_median_s']:>7.2f}s "
          f"{', '.join(f'{s:.2f}' for s in zero):>24}")  # fmt: skip
    print(f"{'1 -> 3 replicas ready':<28} {result['one_to_three_ready_median_s']:>7.2f}s "
          f"{', '.join(f'{s:.2f}' for s in three):>24}")  # fmt: skip
    return result


def offered_rate(t: float, peak: float, seconds: float) -> float:
    """The ramp: 50 req/s rising to `peak` over the first third, held, and back to 50."""
    third = seconds / 3
    if t < third:
        return LOW_RPS + (peak - LOW_RPS) * t / third
    if t < 2 * third:
        return peak
    if t < seconds:
        return peak - (peak - LOW_RPS) * (t - 2 * third) / third
    return 0.0


# sent (s into the ramp), latency s, status, replica's s, gate's wait s
Call = tuple[float, float, int, float, float]


def load_process(url: str, body: bytes, share: float, args: argparse.Namespace, began: float,
                 out: multiprocessing.Queue[list[Call]]) -> None:  # fmt: skip
    """Open-loop Poisson arrivals at `share` of the ramp's rate: (sent, latency, status, the
    replica's own time from its X-Duration-Seconds, the gate's wait from its Server-Timing;
    NaN each without)."""
    import asyncio
    import random

    import aiohttp

    async def run() -> list[Call]:
        done: list[Call] = []
        rng = random.Random(os.getpid())
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as session:

            async def call(sent: float) -> None:
                replica_s = gate_s = float("nan")
                try:
                    async with session.post(url, data=body) as answer:
                        await answer.read()
                        status = answer.status
                        replica_s = float(answer.headers.get("X-Duration-Seconds", "nan"))
                        gate_s = _gate_wait_s(answer.headers.getall("Server-Timing", []))
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                done.append((sent - began, time.time() - sent, status, replica_s, gate_s))

            tasks = set()
            arrival = time.time()  # arrivals on their own clock: a late wake-up is not lag
            while (t := arrival - began) < args.ramp_seconds:
                rate = offered_rate(t, args.peak, args.ramp_seconds) * share
                arrival += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, arrival - time.time()))
                task = asyncio.create_task(call(arrival))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        return done

    out.put(asyncio.run(run()))


def ramp(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> None:
    """The ramp of load against the autoscaled function, second by second; saved once the
    load has been answered, and again when it has scaled to zero and the provider stopped."""
    profile = json.loads(args.profile.read_text())
    function = {
        "image": "fast-gshare/resnet50:0.1.0",
        "annotations": {"fastgshare/gpu_sm_partition": "12", "fastgshare/latency_slo_ms": "50"},
        "labels": {"com.openfaas.scale.max": "20", "com.openfaas.scale.zero": "true",
                   "com.openfaas.scale.zero-duration": "30s"},
    }  # fmt: skip
    body = _jpeg()
    timeline: list[dict[str, float]] = []
    flags = ("--workers", str(args.workers))
    with tempfile.TemporaryDirectory(prefix="autoscale-") as scratch:
        log = Path(scratch, "provider.log")
        with provider({"resnet50": function}, *flags, keep_log=log) as base:
            request = urllib.request.Request(
                f"{base}/system/profiles/resnet50", data=json.dumps(profile).encode(), method="PUT"
            )
            with urllib.request.urlopen(request, timeout=10):
                pass
            began = time.time()
            out: multiprocessing.Queue[list[Call]] = multiprocessing.Queue()
            workers = [
                multiprocessing.Process(
                    target=load_process,
                    args=(f"{base}/function/resnet50", body, 1 / args.processes, args, began, out),
                    daemon=True,
                )
                for _ in range(args.processes)
            ]
            for worker in workers:
                worker.start()
            calls: list[Call] = []
            reported, result, cpu = 0, None, CpuBusy()
            while (t := time.time() - began) < args.ramp_seconds + IDLE_WAIT_S:
                timeline.append({"t": t, "cpu_busy": cpu.busy()} | _look(base))
                replicas, footprint = timeline[-1]["replicas"], timeline[-1]["held"]
                while reported < len(workers) and not out.empty():
                    calls += out.get()
                    reported += 1
                if reported == len(workers) and result is None:
                    result = _ramp_result(calls, timeline, profile, args)
                    save(result)
                if int(t) % 10 == 0:
                    offered = offered_rate(t, args.peak, args.ramp_seconds)
                    print(f"  {t:5.0f} s  offered {offered:6.0f} req/s  {replicas:2.0f} replicas  "
                          f"footprint {footprint:.2f}", flush=True)  # fmt: skip
                if t > args.ramp_seconds and replicas == 0 and result is not None:
                    result["scaled_to_zero_after_s"] = t - args.ramp_seconds
                    break
                time.sleep(1.0)
            if result is None:  # the load's answers did not come within the wait
                result = _ramp_result(
                    [c for _ in workers for c in out.get()], timeline, profile, args
                )
            for worker in workers:
                worker.join()
        lines = log.read_text().splitlines()
        result["decisions"] = [line for line in lines if "fast_gshare.autoscaler" in line]
        result["provider_warnings"] = [
            line for line in lines if " WARNING " in line or " ERROR " in line
        ]
    print("autoscaler decisions:", *result["decisions"], sep="\n  ")
    zero_at = result["scaled_to_zero_after_s"]
    print(f"scaled to zero {zero_at:.0f} s after the load ended" if zero_at is not None
          else "not scaled to zero in the time waited")  # fmt: skip
    _plot(result)
    save(result)


class CpuBusy:
    """The machine's CPUs' busy share (0 to 1) between one reading of /proc/stat and the next."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        try:
            fields = [
                float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            ]
        except (OSError, ValueError):
            return 0.0, 0.0
        idle = fields[3] + fields[4]  # idle, iowait
        return sum(fields) - idle, sum(fields)

    def busy(self) -> float:
        """The busy share since the last call (NaN where /proc/stat cannot be read)."""
        (busy, total), (last_busy, last_total) = self._read(), self._last
        self._last = (busy, total)
        return (busy - last_busy) / (total - last_total) if total > last_total else float("nan")


LOOKED = {  # what the timeline keeps from /metrics: sample name -> key, summed over GPUs
    "fast_gshare_autoscaler_footprint_ratio": "footprint",
    "fast_gshare_function_queued_requests": "gate_queued",
}


def _look(base: str) -> dict[str, float]:
    """From /metrics: the function's desired replicas, the footprint the autoscaler planned and
    the requests queued at its gates; NaN each when /metrics did not answer within 5 s."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except (urllib.error.URLError, TimeoutError) as error:
        print(f"  /metrics did not answer: {error}", flush=True)
        return dict.fromkeys(["replicas", "held", *LOOKED.values()], float("nan"))
    seen = dict.fromkeys(["replicas", *LOOKED.values()], 0.0)
    pending = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("function_name") != "resnet50.openfaas-fn":
                continue
            if sample.name in LOOKED:
                seen[LOOKED[sample.name]] += sample.value
            elif sample.name == "fast_gshare_function_replicas":
                if sample.labels["state"] == "desired":
                    seen["replicas"] = sample.value
                elif sample.labels["state"] == "pending":
                    pending = sample.value
    # what the placed replicas hold: one waiting for GPU room holds none
    placed = seen["replicas"] - pending
    seen["held"] = seen["footprint"] * placed / seen["replicas"] if seen["replicas"] else 0.0
    return seen


def _ramp_result(
    calls: list[Call],
    timeline: list[dict[str, float]],
    profile: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Per second of the ramp: offered, sent, answered, failed, p99 end to end and of the
    replica's own time; and the totals. The timeline is the list being read, so later readings
    join it."""
    from faas_provider.autoscale.decide import ScaleBounds, plan
    from faas_provider.profile.model import Profile

    seconds = int(args.ramp_seconds)
    by_second: dict[int, list[Call]] = collections.defaultdict(list)
    for call in calls:
        by_second[int(call[0])].append(call)
    per_second: list[dict[str, float]] = []
    for second in range(seconds):
        sent = by_second[second]
        ok = [call for call in sent if call[2] == 200]
        failed = len(sent) - len(ok)
        offered = offered_rate(second + 0.5, args.peak, seconds)
        per_second.append({"second": second, "offered": offered, "sent": len(sent),
                           "answered": len(ok), "failed": failed,
                           "p99_ms": _p99_ms([call[1] for call in ok]),
                           "replica_p99_ms": _p99_ms([call[3] for call in ok]),
                           "gate_p99_ms": _p99_ms([call[4] for call in ok])})  # fmt: skip
    judged = [s for s in per_second if s["second"] >= SETTLE_S]
    within = sum(1 for s in judged if s["p99_ms"] <= 50 and not s["failed"]) / len(judged)
    held = _integral(timeline, "held", seconds)
    capacities = Profile.model_validate(profile).capacities(50)
    peak_plan = plan(args.peak, capacities, ScaleBounds(max_replicas=20))
    static = peak_plan.footprint * seconds
    result = {
        "peak_rps": args.peak,
        "profile": f"{profile['gpu_model']}: {args.profile.name}",
        "seconds": seconds,
        "seconds_within_target": within,
        "gpu_share_seconds": held,
        "static_for_peak_gpu_share_seconds": static,
        "static_plan": peak_plan.reason,
        "scaled_to_zero_after_s": None,
        "requests": len(calls),
        "failed": sum(1 for c in calls if c[2] != 200),
        "failures": [{"sent_s": round(c[0], 3), "status": c[2]} for c in calls if c[2] != 200][
            :100
        ],
        "per_second": per_second,
        "timeline": timeline,
    }
    print(f"\nseconds past the first {SETTLE_S} with p99 <= 50 ms and no failure: {within:.1%}")
    print(f"GPU-share-seconds held: {held:.1f}, against {static:.1f} for a static deployment "
          f"sized for the peak ({peak_plan.reason})")  # fmt: skip
    _plot(result)
    return result


def _p99_ms(seconds: list[float]) -> float:
    """The 99th percentile of `seconds` (NaNs left out), in ms; NaN for none."""
    known = sorted(s for s in seconds if not math.isnan(s))
    return _percentile_ms(known, 0.99) if known else float("nan")


def _gate_wait_s(timings: list[str]) -> float:
    """The gate's wait in an answer's Server-Timing headers, in seconds; NaN without one."""
    for entry in (part.strip() for header in timings for part in header.split(",")):
        name, _, params = entry.partition(";")
        if name == WAIT_TIMING:
            for param in params.split(";"):
                key, _, value = param.strip().partition("=")
                if key == "dur":
                    return float(value) / 1000
    return float("nan")


def _integral(timeline: list[dict[str, float]], key: str, until: float) -> float:
    """The time integral of `key` over the timeline up to `until`, each reading held until the
    next; a missing reading (NaN) holds the one before."""
    total, last = 0.0, 0.0
    for entry, following in itertools.pairwise(timeline):
        if entry["t"] >= until:
            break
        if not math.isnan(entry[key]):
            last = entry[key]
        total += last * (min(following["t"], until) - entry["t"])
    return total


def _plot(result: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is not installed")
        return
    figure, (load, latency, footprint) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    seconds = [s["second"] for s in result["per_second"]]
    load.plot(seconds, [s["offered"] for s in result["per_second"]], label="offered")
    load.plot(seconds, [s["answered"] for s in result["per_second"]], label="answered")
    load.set_ylabel("req/s")
    load.legend()
    latency.plot(seconds, [s["p99_ms"] for s in result["per_second"]], color="tab:red",
                 label="p99 end to end")  # fmt: skip
    latency.plot(seconds, [s["replica_p99_ms"] for s in result["per_second"]],
                 color="tab:purple", label="p99 in the replica")  # fmt: skip
    latency.plot(seconds, [s["gate_p99_ms"] for s in result["per_second"]], color="tab:green",
                 label="p99 wait for a gate token")  # fmt: skip
    latency.axhline(50, linestyle="--", color="grey", label="target")
    latency.set_ylabel("ms")
    latency.legend()
    times = [entry["t"] for entry in result["timeline"]]
    footprint.plot(times, [entry.get("held", entry["footprint"]) for entry in result["timeline"]],
                   label="footprint held")  # fmt: skip
    footprint.plot(times, [entry["replicas"] / 10 for entry in result["timeline"]],
                   label="replicas / 10")  # fmt: skip
    footprint.plot(times, [entry.get("cpu_busy", math.nan) for entry in result["timeline"]],
                   label="CPUs busy (share of all)", color="tab:grey")  # fmt: skip
    footprint.set_ylabel("GPUs; CPU share")
    footprint.set_xlabel("seconds")
    footprint.legend()
    figure.tight_layout()
    figure.savefig(RESULTS.with_suffix(".png"), dpi=110)
    plt.close(figure)
    print(f"drew {RESULTS.with_suffix('.png')}")


def _card() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        return "no torch"


if __name__ == "__main__":
    main()
