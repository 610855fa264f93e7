"""Where a resnet50 batch spends its time: each step of `handle_batch`, CPU and wall clock, at
several batch sizes, and the torch profiler's busiest operators for the largest batch.

    python benchmarks/handler_steps.py [--sizes 1 4 16] [--repeats 50] [--max-batch-size 16]

Steps (functions/resnet50/handler.py): `decode` (nvJPEG on the GPU, the batch at once),
`decode on CPU` (the alternative: libjpeg a body at a time, then a copy to the GPU),
`prepare` (resize, crop, pad, normalise), `classify` (the CUDA graph's replay and the top-5
lists), `answers` (each result as the runtime's JSON response). Per step: the process's CPU
time and the wall time (the GPU synchronised after each step), per batch and per image, mean
over --repeats batches of the body every throughput request sends. Run on the GPU alone, not
under MPS. The CPU time includes CUDA's spin where a step waits for the GPU spinning (the
synchronisation after each step, and the replay's wait with RESNET50_GPU_WAIT=spin; by default
that wait sleeps).

Prints progress and a table; writes benchmarks/results/handler_steps.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharing import REPO, _jpeg, import_resnet50_handler

RESULTS = REPO / "benchmarks" / "results" / "handler_steps.json"
PROFILED_OPERATORS = 12
PROFILED_CALLS = 20


def load_handler(max_batch_size: int) -> Any:
    """functions/resnet50/handler.py imported with the runtime's `max_batch_size`; the import
    loads the model, captures its graphs and warms up."""
    os.environ["max_batch_size"] = str(max_batch_size)
    return import_resnet50_handler()


def timed(step: Callable[[], Any], repeats: int, synchronize: Callable[[], None]) -> dict:
    """`step` run `repeats` times: mean CPU and wall milliseconds a run, the GPU synchronised."""
    step()
    synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        step()
        synchronize()
    return {
        "cpu_ms": 1000 * (time.process_time() - cpu) / repeats,
        "wall_ms": 1000 * (time.perf_counter() - wall) / repeats,
    }


def measure(handler: Any, size: int, repeats: int, body: bytes) -> list[dict[str, Any]]:
    """Each step's times for batches of `size` copies of `body`."""
    import torch

    from faas_provider.runtime.watchdog import build_response

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    bodies = [body] * size
    images = handler.decode(bodies)
    batch = handler.prepare(images)
    answers = handler.handle_batch([_event(body) for body in bodies], None)
    steps: dict[str, Callable[[], Any]] = {
        "decode": lambda: handler.decode(bodies),
        "decode on CPU": lambda: [
            handler.decode_on_cpu(body, "JPEG").to(handler.DEVICE) for body in bodies
        ],
        "prepare": lambda: handler.prepare(images),
        "classify": lambda: handler.classify(batch),
        "answers": lambda: [build_response(answer) for answer in answers],
        "handle_batch": lambda: handler.handle_batch([_event(body) for body in bodies], None),
    }
    rows = []
    for name, step in steps.items():
        times = timed(step, repeats, synchronize)
        rows.append(
            {
                "step": name,
                "batch": size,
                **times,
                "cpu_ms_per_image": times["cpu_ms"] / size,
                "wall_ms_per_image": times["wall_ms"] / size,
            }
        )
        print(
            f"  batch {size:>2} {name:<14} CPU {times['cpu_ms']:7.3f} ms "
            f"({times['cpu_ms'] / size:.3f} an image), wall {times['wall_ms']:7.3f} ms",
            flush=True,
        )
    return rows


def _event(body: bytes) -> Any:
    """A POST of `body` as the runtime hands it to the handler."""
    from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

    from faas_provider.runtime.watchdog import Event

    return Event(
        body=body,
        headers=CIMultiDictProxy(CIMultiDict({"Content-Type": "image/jpeg"})),
        method="POST",
        query=MultiDictProxy(MultiDict()),
        path="/",
    )


def profile(handler: Any, size: int, body: bytes) -> list[dict[str, Any]]:
    """The torch profiler's busiest operators over PROFILED_CALLS calls of `handle_batch` on `size`
    images, by their own CPU time."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    events = [_event(body) for _ in range(size)]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(PROFILED_CALLS):
            handler.handle_batch(events, None)
    averages = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [
        {
            "operator": event.key,
            "calls": event.count,
            "self_cpu_ms": event.self_cpu_time_total / 1000 / PROFILED_CALLS,
            "device_ms": getattr(event, "self_device_time_total", 0.0) / 1000 / PROFILED_CALLS,
        }
        for event in averages[:PROFILED_OPERATORS]
    ]
    print(f"busiest operators, a batch of {size} (own CPU ms a call of handle_batch):")
    for entry in top:
        print(
            f"  {entry['operator'][:48]:<48} {entry['calls'] / PROFILED_CALLS:6.1f} calls "
            f"CPU {entry['self_cpu_ms']:.3f} ms, device {entry['device_ms']:.3f} ms"
        )
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()
    import torch

    body = _jpeg()
    print(f"loading resnet50 (max_batch_size {args.max_batch_size}); body {len(body)} bytes")
    handler = load_handler(args.max_batch_size)
    rows = []
    for size in args.sizes:
        rows.extend(measure(handler, size, args.repeats, body))
    top = profile(handler, max(args.sizes), body)
    print(f"{'step':<14} {'batch':>5} {'CPU ms':>8} {'an image':>9} {'wall ms':>8}")
    for entry in rows:
        print(
            f"{entry['step']:<14} {entry['batch']:>5} {entry['cpu_ms']:>8.3f} "
            f"{entry['cpu_ms_per_image']:>9.3f} {entry['wall_ms']:>8.3f}"
        )
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    document = {
        "benchmark": "handler_steps",
        "card": card,
        "torch": torch.__version__,
        "body_bytes": len(body),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rows": rows,
        "busiest_operators": top,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
