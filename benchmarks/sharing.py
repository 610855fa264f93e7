"""GPU sharing on one card: ResNet-50 batch-1 functions side by side, per way of sharing.

Every mode runs ResNet-50 (fp16, channels_last, seeded random weights) in separate processes
on one GPU, each a closed loop of batch-1 inferences on a fixed random 224 x 224 input, each
inference synchronised and timed. A start barrier holds every process until all are loaded
and warm, so all of them measure the same interval.

- single: one process alone, no MPS (the reference).
- time-sliced: --processes processes, no MPS: the GPU time-slices their contexts.
- bare-mps: the same processes as clients of an MPS server that this script starts, each at
  --sm-percent of the SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE).

    python benchmarks/sharing.py [--modes single time-sliced bare-mps] [--processes 7]
                                 [--sm-percent 14] [--seconds 20]

Prints progress and a table; merges each mode's figures into benchmarks/results/sharing.json.
The bare modes need torch and torchvision (and nvidia-cuda-mps-control for bare-mps), nothing
of the provider.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sharing.json"
WARMUP_INFERENCES = 20
LOAD_TIMEOUT_S = 240.0
RAMP_S = 1.0  # from the barrier's release to the start of the measured interval
PROGRESS_EVERY_S = 5.0
MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PID_FILE = "nvidia-cuda-mps-control.pid"

# --- one measuring process -----------------------------------------------------------------


def _send(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def worker() -> None:
    """One process of a mode: load and warm ResNet-50, report ready, wait at the barrier for
    `{"start", "end"}` (time.monotonic, shared by all processes), then infer until `end`.

    Reports on stdout, one JSON object a line: ready, progress about once a second (inferences
    started in the interval so far), and the latencies of those inferences at the end.
    """
    import torch
    from torchvision.models import resnet50

    loading = time.monotonic()
    torch.manual_seed(0)
    model = resnet50().eval().to("cuda", torch.float16, memory_format=torch.channels_last)
    image = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
    image = image.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(WARMUP_INFERENCES):
            model(image)
        torch.cuda.synchronize()
        _send(
            {
                "ready": time.monotonic() - loading,
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
            }
        )
        barrier = json.loads(sys.stdin.readline())
        start, end = barrier["start"], barrier["end"]
        latencies: list[float] = []
        report_at = start + 1.0
        while (began := time.monotonic()) < end:
            model(image)
            torch.cuda.synchronize()
            done = time.monotonic()
            if began >= start:
                latencies.append(done - began)
            if done >= report_at:
                _send({"progress": len(latencies)})
                report_at += 1.0
    _send({"latencies": latencies})


# --- the bare modes ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def mps_daemon() -> Iterator[dict[str, str]]:
    """An MPS control daemon of this script's own, in a temporary directory; yields the variables
    that make a process its client. It is told to quit on the way out, also on error."""
    with tempfile.TemporaryDirectory(prefix="sharing-mps-") as scratch:
        pipe, logs = Path(scratch, "pipe"), Path(scratch, "log")
        pipe.mkdir()
        logs.mkdir()
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
        control = {**os.environ, **env}
        subprocess.run([MPS_CONTROL, "-d"], env=control, check=True)
        print(f"  MPS control daemon started (pipes in {pipe})", flush=True)
        try:
            yield env
        finally:
            subprocess.run([MPS_CONTROL], input=b"quit\n", env=control, timeout=30, check=False)
            with contextlib.suppress(OSError, ValueError):
                pid = int((pipe / MPS_PID_FILE).read_text())
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            print("  MPS control daemon stopped", flush=True)


class Fleet:
    """Measuring processes started together, whose stdout lines arrive on one queue as
    (index, message), then (index, None) at EOF. Leaving the block kills what still runs."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.inbox: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
        self.processes = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(count)
        ]
        for index, process in enumerate(self.processes):
            assert process.stdout is not None
            threading.Thread(target=self._read, args=(index, process.stdout), daemon=True).start()

    def _read(self, index: int, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith("{"):
                self.inbox.put((index, json.loads(line)))
        self.inbox.put((index, None))

    def receive(self, mode: str, deadline: float) -> tuple[int, dict[str, Any]]:
        """The next message; RuntimeError if a process ended without finishing, or at `deadline`."""
        try:
            index, message = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"{mode}: the processes did not answer in time") from None
        if message is None:
            code = self.processes[index].wait()
            raise RuntimeError(f"{mode}: process {index} exited (code {code}); its error is above")
        return index, message

    def release(self, start: float, end: float) -> None:
        """Open the barrier: every process measures from `start` to `end`."""
        line = json.dumps({"start": start, "end": end}) + "\n"
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(line)
            process.stdin.flush()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def _percentile_ms(ordered: list[float], fraction: float) -> float:
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "inferences": len(ordered),
        "img_s": len(ordered) / seconds,
        "p50_ms": _percentile_ms(ordered, 0.50),
        "p99_ms": _percentile_ms(ordered, 0.99),
        "max_ms": 1000 * ordered[-1],
    }


def run_bare(mode: str, processes: int, sm_percent: int | None, seconds: float) -> dict[str, Any]:
    """`processes` bare ResNet-50 processes on the GPU for `seconds`: MPS clients at
    `sm_percent` of the SMs each when it is given, else time-sliced without MPS."""
    print(f"{mode}: starting {processes} processes", flush=True)
    with contextlib.ExitStack() as stack:
        if sm_percent is None:
            # An empty pipe directory: CUDA finds no MPS daemon there and runs without MPS,
            # even where one listens at the default place.
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="sharing-no-mps-"))
            env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": scratch}
        else:
            mps = stack.enter_context(mps_daemon())
            env = {**os.environ, **mps, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(sm_percent)}
        fleet = stack.enter_context(Fleet(processes, env))
        began = time.monotonic()
        ready: dict[int, dict[str, Any]] = {}
        while len(ready) < processes:
            index, message = fleet.receive(mode, began + LOAD_TIMEOUT_S)
            ready[index] = message
            elapsed = time.monotonic() - began
            print(f"{mode}: {len(ready)}/{processes} processes ready ({elapsed:.1f} s)", flush=True)
        start = time.monotonic() + RAMP_S
        end = start + seconds
        fleet.release(start, end)
        counts = [0] * processes
        latencies: dict[int, list[float]] = {}
        report_at = start + PROGRESS_EVERY_S
        while len(latencies) < processes:
            index, message = fleet.receive(mode, end + 60)
            if "progress" in message:
                counts[index] = message["progress"]
            else:
                latencies[index] = message["latencies"]
            if (now := time.monotonic()) >= report_at and now < end:
                rate = sum(counts) / (now - start)
                print(f"{mode}: {now - start:4.1f}/{seconds:g} s, {rate:6.0f} img/s", flush=True)
                report_at += PROGRESS_EVERY_S
    per_process = [_summary(latencies[index], seconds) for index in range(processes)]
    first = ready[0]
    return {
        "mode": mode,
        "processes": processes,
        "sm_percent": sm_percent,
        "seconds": seconds,
        "aggregate_img_s": sum(row["img_s"] for row in per_process),
        "per_process": per_process,
        "device": first["device"],
        "torch": first["torch"],
        "load_s": max(message["ready"] for message in ready.values()),
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# --- modes, table, results -----------------------------------------------------------------


def single(args: argparse.Namespace) -> dict[str, Any]:
    """One process alone on the GPU."""
    return run_bare("single", 1, None, args.seconds)


def time_sliced(args: argparse.Namespace) -> dict[str, Any]:
    """The processes without MPS, time-sliced by the GPU."""
    return run_bare("time-sliced", args.processes, None, args.seconds)


def bare_mps(args: argparse.Namespace) -> dict[str, Any]:
    """The processes as MPS clients at --sm-percent each."""
    return run_bare("bare-mps", args.processes, args.sm_percent, args.seconds)


MODES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "single": single,
    "time-sliced": time_sliced,
    "bare-mps": bare_mps,
}


def print_table(results: list[dict[str, Any]]) -> None:
    """One line per mode: aggregate throughput and the spread of per-process latencies."""
    first = results[0]
    print(f"on {first['device']}, torch {first['torch']}, {first['seconds']:g} s measured a mode")
    print(
        f"{'mode':<12} {'procs':>5} {'SM %':>5} {'img/s':>7} {'vs single':>9} "
        f"{'p50 ms (min-max)':>17} {'p99 ms (min-max)':>17}"
    )
    reference = next((r["aggregate_img_s"] for r in results if r["mode"] == "single"), None)
    for result in results:
        rows = result["per_process"]
        p50 = [row["p50_ms"] for row in rows]
        p99 = [row["p99_ms"] for row in rows]
        ratio = f"{result['aggregate_img_s'] / reference:.2f}x" if reference else "-"
        print(
            f"{result['mode']:<12} {result['processes']:>5} {result['sm_percent'] or '-':>5} "
            f"{result['aggregate_img_s']:>7.0f} {ratio:>9} "
            f"{f'{min(p50):.1f}-{max(p50):.1f}':>17} {f'{min(p99):.1f}-{max(p99):.1f}':>17}"
        )


def save(results: list[dict[str, Any]]) -> None:
    """Merge `results` into RESULTS by mode: a mode run again replaces its old figures."""
    document: dict[str, Any] = {"benchmark": "sharing", "modes": {}}
    if RESULTS.exists():
        document = json.loads(RESULTS.read_text())
    document["modes"].update({result["mode"]: result for result in results})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--processes", type=int, default=7, help="processes per shared mode")
    parser.add_argument("--sm-percent", type=int, default=14, help="SM share of each MPS client")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    results = []
    try:
        for mode in args.modes:
            results.append(MODES[mode](args))
    finally:
        if results:
            print_table(results)
            save(results)


if __name__ == "__main__":
    main()
