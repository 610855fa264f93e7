"""How long a replica stops for a full garbage collection, with the handler's import walked by
every collection (a plain import) and kept out of them (what the runtime does: `gc.freeze()`
once the handler is loaded, and the fork server before each fork).

    python benchmarks/gc_pause.py [--function resnet50|tiny-cpu] [--repeats 5]

A full collection walks every object the collector tracks, and while it runs no thread of the
process moves: every request in flight in that replica waits. Each setting runs in a fresh
process that imports the fork server's preloads (torch, torchvision where installed), the
runtime, and loads the function's handler as the runtime does. resnet50 needs torch (on CUDA
where there is one); tiny-cpu needs nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gc_pause.json"

# runs in the fresh process: load as the runtime does, then time full collections
PROBE = """
import gc, importlib, json, sys, time
from pathlib import Path
for name in ("torch", "torchvision"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
import faas_provider.runtime.__main__
from faas_provider.runtime.watchdog import load_handler
load_handler(Path(sys.argv[1]))
if sys.argv[2] == "frozen":
    gc.freeze()
pauses = []
for _ in range(int(sys.argv[3])):
    began = time.perf_counter()
    gc.collect()
    pauses.append((time.perf_counter() - began) * 1000)
print(json.dumps({"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count(),
                  "torch": "torch" in sys.modules, "pauses_ms": pauses}))
"""
SETTINGS = {
    "walked": "the handler's import walked by every full collection",
    "frozen": "kept out of them (gc.freeze() after the load)",
}


def measure(function: str, setting: str, repeats: int) -> dict[str, Any]:
    handler = REPO / "functions" / function
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(handler), setting, str(repeats)],
        env=env,
        cwd=handler,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--function", choices=["resnet50", "tiny-cpu"], default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"gc pause on {platform.node()} ({os.cpu_count()} cores), {args.function}", flush=True)
    rows = []
    for setting, meaning in SETTINGS.items():
        print(f"  {setting}: {meaning} ...", flush=True)
        seen = measure(args.function, setting, args.repeats)
        pauses = sorted(seen["pauses_ms"])
        rows.append({"setting": setting, **seen, "median_ms": pauses[len(pauses) // 2]})
    print(f"{'setting':<8} {'tracked':>9} {'frozen':>9} {'full collection, median':>24}")
    for row in rows:
        print(f"{row['setting']:<8} {row['tracked']:>9} {row['frozen']:>9} "
              f"{row['median_ms']:>21.3f} ms")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "gc_pause",
        "host": platform.node(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "function": args.function,
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(document, indent=1))
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
