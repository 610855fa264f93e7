"""How fast a GPU function scales up on fast-gshare: from zero to its first answer, and from one
replica to three, for a ResNet-50 function (fp16) on one GPU.

    python benchmarks/autoscale.py [--repeats 3]

- zero-to-first-answer: the function at 0 replicas is scaled to 1, as the gateway does when a
  request comes for it, and a 224 x 224 JPEG is sent until it is answered 200 (the gateway holds
  the request meanwhile): from the scale call to that answer.
- one-to-three: from the scale call to three replicas ready.

The replicas are forked from the provider's fork server (torch and torchvision imported
already); each one creates its CUDA context, loads the model and warms it up. Prints a table
and writes benchmarks/results/autoscale.json. Needs torch and torchvision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharing import REPO, _jpeg, provider

RESULTS = REPO / "benchmarks" / "results" / "autoscale.json"
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
        "benchmark": "autoscale",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "card": _card(),
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
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


def _card() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        return "no torch"


if __name__ == "__main__":
    main()
