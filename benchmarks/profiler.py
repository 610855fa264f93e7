"""The profiler on a real GPU: `fast-gshare profile` of a sample function through
fast-gshare, over SM partitions x quotas x concurrencies, then Poisson arrivals under the
latency target for each SM partition and quota that met it.

    python benchmarks/profiler.py [--function resnet50|text-encoder] [--sm 12,25,50,100] \\
        [--quota 0.25,0.5,1] [--concurrency 1,2,4,8] [--seconds 3] [--latency-slo-ms 50]

- resnet50: ResNet-50 fp16, one 224 x 224 JPEG a request; its runtime batches the requests in
  flight.
- text-encoder: a 12-layer transformer encoder fp16, 512 bytes of text a request (512 tokens),
  `handle()` only on the runtime's threads: no batching.

Starts a provider with the function, runs the profiler against it (progress, then the table),
and keeps the profile as benchmarks/results/profile-FUNCTION.json with its PNG; the cluster
simulation (benchmarks/cluster_sim.py) reads them. Needs torch and torchvision.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharing import REPO, _jpeg, provider

RESULTS = REPO / "benchmarks" / "results"
SAMPLES = {
    "resnet50": "fast-gshare/resnet50:0.1.0",
    "text-encoder": "fast-gshare/text-encoder:0.1.0",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--function", choices=sorted(SAMPLES), default="resnet50")
    parser.add_argument("--sm", default="12,25,50,100")
    parser.add_argument("--quota", default="0.25,0.5,1")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--seconds", default="3")
    parser.add_argument("--latency-slo-ms", default="50")
    args = parser.parse_args()
    name = args.function
    function = {"image": SAMPLES[name], "labels": {"com.openfaas.scale.min": "1"}}
    with tempfile.TemporaryDirectory(prefix="profile-") as scratch:
        body = Path(scratch, "request")
        # made before the provider starts: torchvision's import takes seconds
        body.write_bytes(_jpeg() if name == "resnet50" else bytes(range(32, 96)) * 8)
        out = Path(scratch, f"{name}.profile.json")
        command = [sys.executable, "-m", "faas_provider.cli", "profile", name,
                   "--body-file", str(body), "--sm", args.sm, "--quota", args.quota,
                   "--concurrency", args.concurrency, "--seconds", args.seconds,
                   "--latency-slo-ms", args.latency_slo_ms, "--out", str(out)]  # fmt: skip
        with provider({name: function}) as base:
            subprocess.run([*command, "--url", base], check=True, cwd=REPO)
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, RESULTS / f"profile-{name}.json")
        if out.with_suffix(".png").exists():
            shutil.copy(out.with_suffix(".png"), RESULTS / f"profile-{name}.png")
    print(f"kept {RESULTS / f'profile-{name}.json'}")


if __name__ == "__main__":
    main()
