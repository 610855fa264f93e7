"""The profiler on a real GPU: `fast-gshare profile` of a ResNet-50 function (fp16, one 224 x
224 JPEG a request) through fast-gshare, over SM partitions x quotas x concurrencies.

    python benchmarks/profiler.py [--sm 12,25,50,100] [--quota 0.25,0.5,1] \\
                                 [--concurrency 1,2,4,8] [--seconds 3] [--latency-slo-ms 50]

Starts a provider with the function, runs the profiler against it (progress, then the table),
and keeps the profile as benchmarks/results/profile-resnet50.json with its PNG; the cluster
simulation (benchmarks/cluster_sim.py) reads it. Needs torch and torchvision.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sm", default="12,25,50,100")
    parser.add_argument("--quota", default="0.25,0.5,1")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--seconds", default="3")
    parser.add_argument("--latency-slo-ms", default="50")
    args = parser.parse_args()
    function = {"image": "fast-gshare/resnet50:0.1.0", "labels": {"com.openfaas.scale.min": "1"}}
    with tempfile.TemporaryDirectory(prefix="profile-") as scratch:
        body = Path(scratch, "cat.jpg")
        body.write_bytes(_jpeg())  # before the provider: torchvision's import takes seconds
        out = Path(scratch, "resnet50.profile.json")
        command = [sys.executable, "-m", "faas_provider.cli", "profile", "resnet50",
                   "--body-file", str(body), "--sm", args.sm, "--quota", args.quota,
                   "--concurrency", args.concurrency, "--seconds", args.seconds,
                   "--latency-slo-ms", args.latency_slo_ms, "--out", str(out)]  # fmt: skip
        with provider({"resnet50": function}) as base:
            subprocess.run([*command, "--url", base], check=True, cwd=REPO)
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, RESULTS / "profile-resnet50.json")
        if out.with_suffix(".png").exists():
            shutil.copy(out.with_suffix(".png"), RESULTS / "profile-resnet50.png")
    print(f"kept {RESULTS / 'profile-resnet50.json'}")


if __name__ == "__main__":
    main()
