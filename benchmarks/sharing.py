"""GPU sharing on one card: ResNet-50 batch-1 functions side by side, per way of sharing.

Every mode runs ResNet-50 (fp16, channels_last, seeded random weights) in separate processes
on one GPU, each a closed loop of batch-1 inferences on a fixed random 224 x 224 input, each
inference synchronised and timed. A start barrier holds every process until all are loaded
and warm, so all of them measure the same interval.

- single: one process alone, no MPS (the reference).
- time-sliced: --processes processes, no MPS: the GPU time-slices their contexts.
- bare-mps: the same processes as clients of an MPS server that this script starts, each at
  --sm-percent of the SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE).
- bare-mps-batched: as bare-mps, each inference a batch of --clients images: the most that
  the function's runtime can batch with --clients requests in flight.
- bare-handler: as bare-mps, each process doing the resnet50 handler's whole work on a JPEG.
- bare-runtime: the resnet50 function in fast-gshare's runtime, MPS clients, called over HTTP.
- full-path: the same functions deployed on fast-gshare and called through it (provider
  proxy, gate, replica under MPS), --clients closed-loop clients a function, each request one
  image; the runtime batches the requests that wait together.
- full-path-unbatched: as full-path with max_batch_size=1: one request a forward pass.
- partitions, quotas, memory-cap, faults: SM shares, time quotas, the memory cap and fault
  drills through fast-gshare (see each function).
- replica-start: how long a ResNet-50 replica takes to start, forked from the fork server
  with torch preloaded and without.

    python benchmarks/sharing.py [--modes MODE ...] [--processes 7] [--sm-percent 14]
                                 [--seconds 20] [--clients 2]

Prints progress and a table; merges each mode's figures into benchmarks/results/sharing.json.
The bare modes need torch and torchvision (and nvidia-cuda-mps-control for the MPS modes) and,
of fast-gshare, only its MPS daemon control; the full-path modes run fast-gshare itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import queue
import shutil
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

# --- one measuring process -----------------------------------------------------------------


def _send(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def import_resnet50_handler() -> Any:
    """functions/resnet50/handler.py as a module; the import loads the model, captures its
    graphs and warms up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "handler", REPO / "functions" / "resnet50" / "handler.py"
    )
    assert spec is not None and spec.loader is not None
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    return handler


def worker(through_handler: bool = False, batch: int = 1) -> None:
    """One process of a mode: load and warm ResNet-50, report ready, wait at the barrier for
    `{"start", "end"}` (time.monotonic, shared by all processes), then infer until `end`, on
    `batch` images at a time.

    Reports on stdout, one JSON object a line: ready, progress about once a second (inferences
    started in the interval so far), and the latencies of those inferences at the end.
    """
    import torch

    loading = time.monotonic()
    if through_handler:  # the function's own work: decode, preprocess, infer, top-5
        handler = import_resnet50_handler()
        body = _jpeg()

        def infer() -> None:
            handler.classify(handler.preprocess(body))  # .tolist() waits for the GPU
    else:
        from torchvision.models import resnet50

        torch.manual_seed(0)
        model = resnet50().eval().to("cuda", torch.float16, memory_format=torch.channels_last)
        image = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
        image = image.contiguous(memory_format=torch.channels_last)

        def infer() -> None:
            model(image)
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(WARMUP_INFERENCES):
            infer()
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
            infer()
            done = time.monotonic()
            if began >= start:
                latencies.append(done - began)
            if done >= report_at:
                _send({"progress": len(latencies)})
                report_at += 1.0
    _send({"latencies": latencies})


# --- the bare modes ------------------------------------------------------------------------


@contextlib.contextmanager
def mps_daemon() -> Iterator[dict[str, str]]:
    """The GPU's MPS control daemon, as the provider runs it (faas_provider.gpu.mps), in a
    temporary directory; yields the variables that make a process its client. It is stopped on
    the way out, also on error."""
    import asyncio

    from faas_provider.gpu.discovery import discover_gpus
    from faas_provider.gpu.mps import MpsDaemon

    gpu = discover_gpus()[0]
    with tempfile.TemporaryDirectory(prefix="sharing-mps-") as scratch:
        daemon = MpsDaemon(gpu.index, gpu.uuid, scratch)
        asyncio.run(daemon.start())
        print(f"  MPS control daemon started (pipes in {daemon.pipe_dir})", flush=True)
        try:
            yield daemon.env
        finally:
            asyncio.run(daemon.stop())
            print("  MPS control daemon stopped", flush=True)


class Fleet:
    """Measuring processes started together, whose stdout lines arrive on one queue as
    (index, message), then (index, None) at EOF. Leaving the block kills what still runs."""

    def __init__(
        self, count: int, env: dict[str, str], through_handler: bool = False, batch: int = 1
    ) -> None:
        flags = ["--worker", f"--batch={batch}"]
        flags += ["--through-handler"] if through_handler else []
        self.inbox: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
        self.processes = [
            subprocess.Popen(
                [sys.executable, __file__, *flags],
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


def _summary(latencies: list[float], seconds: float, batch: int = 1) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "inferences": len(ordered),
        "img_s": batch * len(ordered) / seconds,
        "p50_ms": _percentile_ms(ordered, 0.50),
        "p99_ms": _percentile_ms(ordered, 0.99),
        "max_ms": 1000 * ordered[-1],
    }


def run_bare(
    mode: str,
    processes: int,
    sm_percent: int | None,
    seconds: float,
    through_handler: bool = False,
    batch: int = 1,
) -> dict[str, Any]:
    """`processes` bare ResNet-50 processes on the GPU for `seconds`: MPS clients at
    `sm_percent` of the SMs each when it is given, else time-sliced without MPS. With
    `through_handler` each does the function's whole work (the resnet50 handler on a JPEG);
    else each inference is on `batch` images."""
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
        fleet = stack.enter_context(Fleet(processes, env, through_handler, batch))
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
                rate = batch * sum(counts) / (now - start)
                print(f"{mode}: {now - start:4.1f}/{seconds:g} s, {rate:6.0f} img/s", flush=True)
                report_at += PROGRESS_EVERY_S
    per_process = [_summary(latencies[index], seconds, batch) for index in range(processes)]
    first = ready[0]
    return {
        "mode": mode,
        "processes": processes,
        "batch": batch,
        "sm_percent": sm_percent,
        "seconds": seconds,
        "aggregate_img_s": sum(row["img_s"] for row in per_process),
        "per_process": per_process,
        "device": first["device"],
        "torch": first["torch"],
        "load_s": max(message["ready"] for message in ready.values()),
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# --- through fast-gshare: HTTP -> provider proxy -> gate -> replica under MPS ----------------

FUNCTIONS_DIR = REPO / "functions"
CLIENTS_PER_FUNCTION = 2


def _jpeg(side: int = 224) -> bytes:
    """A random side x side JPEG, the body every full-path request sends."""
    import torch
    from torchvision.io import encode_jpeg

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator)
    return encode_jpeg(pixels, quality=90).numpy().tobytes()


@contextlib.contextmanager
def provider(
    functions: dict[str, dict[str, Any]], *flags: str, keep_log: Path | None = None
) -> Iterator[str]:
    """`fast-gshare up` with `functions` (name -> stack entry) and `flags`, until all are
    available; its log is copied to `keep_log` when it stops."""
    import socket
    import urllib.request

    import yaml

    with tempfile.TemporaryDirectory(prefix="sharing-provider-") as scratch:
        stack = Path(scratch, "stack.yml")
        stack.write_text(yaml.safe_dump({"functions": functions}))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = open(Path(scratch, "provider.log"), "w")  # noqa: SIM115 - closed below
        command = [sys.executable, "-m", "faas_provider.cli", "up", "--stack", str(stack)]
        command += ["--functions-dir", str(FUNCTIONS_DIR), "--port", str(port)]
        command += ["--state-dir", str(Path(scratch, "state")), *flags]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        base = f"http://127.0.0.1:{port}"
        try:
            began = time.monotonic()
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the provider exited: {Path(scratch, 'provider.log').read_text()[-3000:]}"
                    )
                try:
                    with urllib.request.urlopen(f"{base}/system/functions", timeout=5) as answer:
                        listed = json.loads(answer.read())
                except OSError:
                    listed = []
                ready = sum(1 for f in listed if f["availableReplicas"] >= f["replicas"] > 0)
                waited = time.monotonic() - began
                print(f"  {ready}/{len(functions)} functions ready ({waited:.0f} s)", flush=True)
                if ready == len(functions):
                    break
                if time.monotonic() - began > LOAD_TIMEOUT_S:
                    raise RuntimeError("the functions did not become ready in time")
                time.sleep(2)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print("  the provider did not stop within 60 s of SIGTERM: killed", flush=True)
                process.kill()
                process.wait()
            log.close()
            if keep_log is not None:
                shutil.copyfile(Path(scratch, "provider.log"), keep_log)
            print(f"  provider log tail:\n{Path(scratch, 'provider.log').read_text()[-1500:]}")


def drive(
    base: str,
    names: list[str],
    seconds: float,
    clients: int = CLIENTS_PER_FUNCTION,
    handler_times: list[float] | None = None,
    body: bytes | None = None,
) -> dict[str, list[float]]:
    """Closed-loop clients, `clients` per function, for `seconds` after a ramp: latencies.
    `handler_times` collects each answer's X-Duration-Seconds (the time the replica's
    handler took), to tell the function's own time from the path's. Every request sends
    `body` (default: a 224 x 224 JPEG)."""
    targets = {name: f"{base}/function/{name}" for name in names}
    return drive_urls(targets, seconds, clients, handler_times, body)


def drive_urls(
    targets: dict[str, str],
    seconds: float,
    clients: int = CLIENTS_PER_FUNCTION,
    handler_times: list[float] | None = None,
    body: bytes | None = None,
) -> dict[str, list[float]]:
    """As `drive`, against each name's URL."""
    names = list(targets)
    import asyncio

    import aiohttp

    if body is None:
        body = _jpeg()

    async def run() -> dict[str, list[float]]:
        latencies: dict[str, list[float]] = {name: [] for name in names}
        errors: dict[str, int] = dict.fromkeys(names, 0)
        loop = asyncio.get_running_loop()
        start = loop.time() + RAMP_S
        end = start + seconds
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def client(name: str) -> None:
                while (began := loop.time()) < end:
                    async with session.post(targets[name], data=body) as answer:
                        await answer.read()
                    if answer.status != 200:
                        errors[name] += 1
                    elif began >= start:
                        latencies[name].append(loop.time() - began)
                        if handler_times is not None:
                            handler_times.append(float(answer.headers["X-Duration-Seconds"]))

            async def progress() -> None:
                while loop.time() < end:
                    await asyncio.sleep(PROGRESS_EVERY_S)
                    if start < (now := loop.time()) < end:
                        rate = sum(len(v) for v in latencies.values()) / (now - start)
                        print(f"  {now - start:4.1f}/{seconds:g} s, {rate:6.0f} req/s", flush=True)

            await asyncio.gather(progress(), *(client(n) for n in names for _ in range(clients)))
        failed = {name: count for name, count in errors.items() if count}
        if failed:
            print(f"  failed requests: {failed}", flush=True)
        return latencies

    return asyncio.run(run())


def _shared(
    sm: int, request: float | None = None, limit: float = 1.0, **extra: Any
) -> dict[str, Any]:
    annotations = {"fastgshare/gpu_sm_partition": str(sm), "fastgshare/gpu_quota_limit": str(limit)}
    if request is not None:
        annotations["fastgshare/gpu_quota_request"] = str(request)
    return {"image": "fast-gshare/resnet50:0.1.0", "annotations": annotations, **extra}


def full_path(args: argparse.Namespace, mode: str = "full-path") -> dict[str, Any]:
    """--processes ResNet-50 functions at --sm-percent each, quota limit 1, through fast-gshare;
    `full-path-unbatched` runs them with max_batch_size=1."""
    names = [f"resnet50-{index}" for index in range(args.processes)]
    print(f"{mode}: deploying {len(names)} functions at {args.sm_percent}% SMs", flush=True)
    environment = _batching(args)
    if mode == "full-path-unbatched":
        environment["max_batch_size"] = "1"
    handler_times: list[float] = []
    entry = _shared(args.sm_percent, environment=environment)
    with provider(dict.fromkeys(names, entry)) as base:
        latencies = drive(base, names, args.seconds, args.clients, handler_times)
    return _served(mode, args, latencies, handler_times, environment)


def full_path_unbatched(args: argparse.Namespace) -> dict[str, Any]:
    """As full-path, one request a forward pass."""
    return full_path(args, "full-path-unbatched")


def bare_runtime(args: argparse.Namespace) -> dict[str, Any]:
    """--processes resnet50 replicas run by fast-gshare's function runtime as MPS clients at
    --sm-percent, called straight over HTTP: the function without the provider and the gates."""
    print(f"bare-runtime: starting {args.processes} runtimes", flush=True)
    handler_times: list[float] = []
    with contextlib.ExitStack() as stack:
        mps = stack.enter_context(mps_daemon())
        env = {**os.environ, **mps, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(args.sm_percent)}
        env |= _batching(args)
        command = [sys.executable, "-m", "faas_provider.runtime", "--port", "0"]
        command += ["--handler", str(FUNCTIONS_DIR / "resnet50")]
        targets = {}
        for index in range(args.processes):
            runtime = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
            stack.callback(runtime.wait)
            stack.callback(runtime.terminate)
            assert runtime.stdout is not None
            port = runtime.stdout.readline().rsplit(":", 1)[1].strip()  # Listening on port: N
            targets[f"runtime-{index}"] = f"http://127.0.0.1:{port}/"
        latencies = drive_urls(targets, args.seconds, args.clients, handler_times)
    return _served("bare-runtime", args, latencies, handler_times, _batching(args))


def _batching(args: argparse.Namespace) -> dict[str, str]:
    """The runtime's batching settings given for the resnet50 functions (none: its defaults)."""
    settings = {"max_batch_size": args.max_batch_size, "max_batch_delay": args.max_batch_delay}
    return {name: str(value) for name, value in settings.items() if value is not None}


def _served(
    mode: str,
    args: argparse.Namespace,
    latencies: dict[str, list[float]],
    handler: list[float],
    batching: dict[str, str],
) -> dict[str, Any]:
    """A mode's figures from its requests' latencies and handler times, and the functions'
    batching settings."""
    import torch

    every = [t for times in latencies.values() for t in times]
    request_ms, handler_ms = 1000 * sum(every) / len(every), 1000 * sum(handler) / len(handler)
    print(
        f"{mode}: {args.clients} client(s) a function; mean request {request_ms:.2f} ms, "
        f"of which the handler {handler_ms:.2f} ms (batching: {batching or 'runtime defaults'})",
        flush=True,
    )
    per_function = [_summary(times, args.seconds) for times in latencies.values()]
    return {
        "mode": mode,
        "processes": len(per_function),
        "sm_percent": args.sm_percent,
        "seconds": args.seconds,
        "clients_per_function": args.clients,
        "batching": batching or "runtime defaults",
        "handler_mean_ms": handler_ms,
        "request_mean_ms": request_ms,
        "aggregate_img_s": sum(row["img_s"] for row in per_function),
        "per_process": per_function,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def partitions(args: argparse.Namespace) -> dict[str, Any]:
    """One saturating function (batch 32 a request) at 25% and at 100% of the SMs."""
    rates = {}
    for sm in (25, 100):
        print(f"partitions: one batch-32 function at {sm}% SMs", flush=True)
        entry = _shared(sm, environment={"RESNET50_BATCH": "32"})
        with provider({"saturating": entry}) as base:
            latencies = drive(base, ["saturating"], args.seconds / 2, clients=4)
        rates[sm] = 32 * len(latencies["saturating"]) / (args.seconds / 2)
        print(f"partitions: {sm}% SMs -> {rates[sm]:.0f} img/s", flush=True)
    return {"mode": "partitions", "img_s": rates, "ratio_25_to_100": rates[25] / rates[100]}


TEXT = ("A transformer encodes this text for the time-quota drill. " * 9).encode()[:511]
TEXT_ENCODER = "fast-gshare/text-encoder:0.1.0"


def quotas(args: argparse.Namespace) -> dict[str, Any]:
    """Time shares through the gates, each function at 100% of the SMs, shares of the completed
    work (every request of a case is the same work):

    - limits: two greedy ResNet-50 functions (batch 8 a request) with limits 0.3 and 0.7;
    - request: ResNet-50 with request 0.5 beside three greedy neighbours (request 0.1, limit 1);
    - text-encoder: four text-encoder functions (handle() only, on the runtime's 4 threads, so
      4 requests in flight a replica), one with request 0.6, three with request 0.1, limit 1,
      4 closed-loop clients each, a 512-token text a request; the 0.6 function's share should
      be within 5 points of 60%;
    - text-encoder-max-inflight-1: the same with max_inflight=1 on every function;
    - batched: as text-encoder with ResNet-50 functions (batch 8 a request), whose runtime
      calls handle_batch with the requests that wait together.

    Each case reports the shares of the work done and of the GPU time the token service
    charged (its busy time per replica, asked of the service before and after the run): with
    several requests in flight, a replica that holds its token longer runs more of them side
    by side, so the two differ; the quotas are of GPU time.
    """
    heavy = {"RESNET50_BATCH": "8"}
    one_at_a_time = {"max_inflight": "1"}

    def against_three(kept: dict[str, Any], greedy: dict[str, Any]) -> dict[str, Any]:
        return {"request-60": kept, **{f"greedy-{i}": greedy for i in range(3)}}

    cases: dict[str, tuple[dict[str, Any], int, bytes | None]] = {  # functions, clients, body
        "limits": (
            {
                "limit-30": _shared(100, limit=0.3, environment=heavy),
                "limit-70": _shared(100, limit=0.7, environment=heavy),
            },
            CLIENTS_PER_FUNCTION,
            None,
        ),
        "request": (
            {
                "request-50": _shared(100, request=0.5, environment=heavy),
                **{f"greedy-{i}": _shared(100, request=0.1, environment=heavy) for i in range(3)},
            },
            CLIENTS_PER_FUNCTION,
            None,
        ),
        "text-encoder": (
            against_three(
                _shared(100, request=0.6, image=TEXT_ENCODER),
                _shared(100, request=0.1, image=TEXT_ENCODER),
            ),
            4,
            TEXT,
        ),
        "text-encoder-max-inflight-1": (
            against_three(
                _shared(100, request=0.6, image=TEXT_ENCODER, environment=one_at_a_time),
                _shared(100, request=0.1, image=TEXT_ENCODER, environment=one_at_a_time),
            ),
            4,
            TEXT,
        ),
        "batched": (
            against_three(
                _shared(100, request=0.6, environment=heavy),
                _shared(100, request=0.1, environment=heavy),
            ),
            4,
            None,
        ),
    }
    shares, gpu_time = {}, {}
    for case, (functions, clients, body) in cases.items():
        print(f"quotas: {case}, {clients} clients a function", flush=True)
        with provider(functions) as base:
            first = next(iter(functions))
            before = _charged_gpu_seconds(first)
            latencies = drive(base, list(functions), args.seconds / 2, clients, body=body)
            after = _charged_gpu_seconds(first)
        total = sum(len(v) for v in latencies.values())
        shares[case] = {name: len(v) / total for name, v in latencies.items()}
        used = {name: after[name] - before.get(name, 0.0) for name in functions}
        gpu_time[case] = {name: seconds / sum(used.values()) for name, seconds in used.items()}
        print(f"quotas: {case} shares of the work {shares[case]}", flush=True)
        print(f"quotas: {case} shares of the GPU time charged {gpu_time[case]}", flush=True)
        if "request-60" in shares[case]:
            for what, share in (("work", shares[case]), ("GPU time", gpu_time[case])):
                kept = share["request-60"]
                verdict = "within" if abs(kept - 0.6) <= 0.05 else "NOT within"
                print(
                    f"quotas: {case}: request 0.6 got {kept:.1%} of the {what}, {verdict} 5 points",
                    flush=True,
                )
    return {"mode": "quotas", "shares": shares, "gpu_time_shares": gpu_time}


def quotas_prometheus(args: argparse.Namespace) -> dict[str, Any]:
    """The text-encoder case of quotas (request 0.6 beside three greedy neighbours at 0.1) with
    a real Prometheus scraping the provider every second: the GPU-time shares it saw charged,
    over the run and second by second, drawn against the quotas (a PNG beside the JSON)."""
    binary = args.prometheus or shutil.which("prometheus")
    if binary is None:
        raise SystemExit("quotas-prometheus needs a Prometheus binary: --prometheus PATH")
    quotas = {"request-60": 0.6, **{f"greedy-{i}": 0.1 for i in range(3)}}
    functions = {
        name: _shared(100, request=request, image=TEXT_ENCODER) for name, request in quotas.items()
    }
    charged = "fast_gshare_gpu_time_seconds_total"
    with provider(functions) as base, prometheus_server(binary, base) as prom:
        start = time.time()
        drive(base, list(functions), args.seconds, 4, body=TEXT)
        end = time.time()
        time.sleep(3)  # the scrapes after the last request
        span = f"{int(end - start)}s"
        totals = _prom(
            prom, "query", query=f"sum by (function_name) (increase({charged}[{span}]))", time=end
        )
        rates = _prom(
            prom,
            "query_range",
            query=f"sum by (function_name) (rate({charged}[3s]))",
            start=start,
            end=end,
            step=1,
        )
    used = {row["metric"]["function_name"].split(".")[0]: float(row["value"][1]) for row in totals}
    shares = {name: seconds / sum(used.values()) for name, seconds in used.items()}
    by_time: dict[float, dict[str, float]] = {}
    for row in rates:
        name = row["metric"]["function_name"].split(".")[0]
        for at, value in row["values"]:
            by_time.setdefault(float(at) - start, {})[name] = float(value)
    series = {
        name: [
            [at, point.get(name, 0.0) / (sum(point.values()) or 1.0)]
            for at, point in sorted(by_time.items())
        ]
        for name in quotas
    }
    kept = shares.get("request-60", 0.0)
    within = abs(kept - 0.6) <= 0.05
    print(f"quotas-prometheus: shares of the GPU time Prometheus saw charged {shares}", flush=True)
    print(
        f"quotas-prometheus: request 0.6 got {kept:.1%}, "
        f"{'within' if within else 'NOT within'} 5 points"
    )
    result = {
        "mode": "quotas-prometheus",
        "quotas": quotas,
        "seconds": end - start,
        "shares": shares,
        "within_5_points": within,
        "series": series,
    }
    plot_quotas(result)
    return result


def prometheus_server(binary: str, base: str) -> contextlib.AbstractContextManager[str]:
    """A Prometheus scraping the provider at `base` every second; its URL."""
    import socket

    import yaml

    @contextlib.contextmanager
    def running() -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="sharing-prometheus-") as scratch:
            target = base.removeprefix("http://")
            config = {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "provider", "static_configs": [{"targets": [target]}]}
                ],
            }
            Path(scratch, "prometheus.yml").write_text(yaml.safe_dump(config))
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            log = open(Path(scratch, "prometheus.log"), "w")  # noqa: SIM115 - closed below
            process = subprocess.Popen(
                [binary, f"--config.file={scratch}/prometheus.yml",
                 f"--storage.tsdb.path={scratch}/data", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            try:
                for _ in range(300):
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        if _prom(url, "query", query="count(up == 1)"):
                            break
                    time.sleep(0.1)
                else:
                    raise RuntimeError(Path(scratch, "prometheus.log").read_text()[-2000:])
                print(f"  Prometheus on {url} scrapes {target} every second", flush=True)
                yield url
            finally:
                process.terminate()
                process.wait(timeout=30)
                log.close()

    return running()


def _prom(url: str, api: str, **params: Any) -> list[dict[str, Any]]:
    """The result of Prometheus' HTTP API `api` (query, query_range) with `params`."""
    import urllib.parse
    import urllib.request

    address = f"{url}/api/v1/{api}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(address, timeout=10) as answer:
        body = json.loads(answer.read())
    if body["status"] != "success":
        raise RuntimeError(f"Prometheus: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _pyplot() -> Any:
    """matplotlib's pyplot drawing to files, or None (one line saying how to draw later)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  no matplotlib here: redraw with python benchmarks/sharing.py --plot", flush=True)
        return None
    return plt


def plot_quotas(result: dict[str, Any]) -> None:
    """Draw the GPU-time shares of `result` over time against each quota, as a PNG."""
    plt = _pyplot()
    if plt is None:
        return
    path = RESULTS.with_name("quotas-prometheus.png")
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=120)
    names = list(result["quotas"])
    # the seconds in which some GPU time was charged (not the load's ramp or its end)
    busy = [
        i
        for i in range(len(result["series"][names[0]]))
        if sum(result["series"][name][i][1] for name in names) > 0
    ]
    times = [result["series"][names[0]][i][0] for i in busy]
    axes.stackplot(
        times,
        *[[result["series"][name][i][1] for i in busy] for name in names],
        labels=[f"{name} ({result['shares'][name]:.0%} of the run)" for name in names],
        alpha=0.8,
    )
    floor = 0.0
    for name in names:
        floor += result["quotas"][name]
        axes.axhline(floor, linestyle="--", linewidth=1, color="black")
    axes.text(
        times[-1], result["quotas"][names[0]], " request-60's quota 0.6", va="bottom", ha="right"
    )
    axes.set_xlabel("seconds into the run")
    axes.set_ylabel("share of the GPU time charged")
    axes.set_ylim(0, 1)
    axes.set_title(
        "GPU-time shares as Prometheus saw them charged, stacked; dashed: quota requests, stacked"
    )
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    print(f"  drew {path.relative_to(REPO)}", flush=True)


def plot_throughput(modes: dict[str, dict[str, Any]]) -> None:
    """Draw the aggregate throughput of each setting measured, with its p99 range, as a PNG."""
    plt = _pyplot()
    if plt is None:
        return
    measured = [m for m in modes.values() if "aggregate_img_s" in m]
    if not measured:
        return
    path = RESULTS.with_name("throughput.png")
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(measured) + 1.5), dpi=120)
    labels = [
        f"{m['mode']} ({m['processes']} x {m['sm_percent']}% SMs, MPS)"
        if m["sm_percent"]
        else f"{m['mode']} ({m['processes']} process{'es' if m['processes'] > 1 else ''}, no MPS)"
        for m in measured
    ]
    rates = [m["aggregate_img_s"] for m in measured]
    bars = axes.barh(labels, rates, color="tab:blue")
    for bar, m in zip(bars, measured, strict=True):
        p99 = [row["p99_ms"] for row in m["per_process"]]
        note = f" {bar.get_width():.0f} img/s, p99 {min(p99):.0f}-{max(p99):.0f} ms"
        axes.text(
            bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8
        )
    axes.invert_yaxis()
    axes.set_xlabel("images per second, all processes together")
    axes.set_xlim(0, max(rates) * 1.45)
    axes.set_title(f"ResNet-50 throughput per setting on {measured[0]['device']}")
    figure.tight_layout()
    figure.savefig(path)
    print(f"  drew {path.relative_to(REPO)}", flush=True)


def _charged_gpu_seconds(function: str) -> dict[str, float]:
    """GPU time the provider's token service has charged each function's replicas (seconds,
    summed over replicas), asked of the service over its socket, found in the arguments of a
    gate of `function`."""
    import socket

    _, command, _ = next(_gates_of(function), (None, None, None))
    if command is None:
        raise RuntimeError(f"no gate of {function} runs: no token service to ask")
    path = command[command.index("--token-socket") + 1]
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(path)
        connection.sendall(b'{"op": "stats"}\n')
        answer = connection.makefile("rb").readline()
    by_function: dict[str, float] = {}
    for clients in json.loads(answer).values():
        for client, seconds in clients.items():  # "<namespace>/<function>-<index>"
            function = client.split("/", 1)[1].rsplit("-", 1)[0]
            by_function[function] = by_function.get(function, 0.0) + seconds
    return by_function


def memory_cap(args: argparse.Namespace) -> dict[str, Any]:
    """A function capped at 2 GiB that allocates 3 GB fails alone; 1 GB works; a neighbour
    keeps answering throughout. Under the neighbour's load, the GPU readings of the provider's
    /metrics are set beside nvidia-smi's."""
    import urllib.error
    import urllib.request

    functions = {
        "capped": {
            "image": "fast-gshare/gpu-alloc:0.1.0",
            "annotations": {"fastgshare/gpu_sm_partition": "20", "fastgshare/gpu_mem": "2Gi"},
        },
        "neighbour": _shared(20),
    }
    outcome: dict[str, Any] = {}
    with provider(functions) as base:
        for gigabytes in (1, 3):
            request = urllib.request.Request(
                f"{base}/function/capped", data=str(gigabytes).encode()
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    outcome[f"{gigabytes}GB"] = (answer.status, answer.read().decode()[:200])
            except urllib.error.HTTPError as error:
                outcome[f"{gigabytes}GB"] = (error.code, error.read().decode()[:200])
            print(f"memory-cap: allocate {gigabytes} GB -> {outcome[f'{gigabytes}GB']}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(drive, base, ["neighbour"], 10, 4)
            time.sleep(4)  # the neighbour under load: the GPU is busy
            outcome["readings"] = [gpu_readings(base)]
            for _ in range(3):
                time.sleep(1)
                outcome["readings"].append(gpu_readings(base))
            outcome["neighbour_answered"] = len(load.result()["neighbour"])
    return {"mode": "memory-cap", **outcome}


def gpu_readings(base: str) -> dict[str, Any]:
    """What the provider's /metrics says of GPU 0 (NVML) beside what nvidia-smi says at the
    same moment: memory per function, per process and in all, and utilisation."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    ours: dict[str, Any] = {"function_memory_used": {}, "function_memory_limit": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            function = sample.labels.get("function_name")
            if sample.name == "fast_gshare_function_memory_used_bytes":
                ours["function_memory_used"][function] = sample.value
            elif sample.name == "fast_gshare_function_memory_limit_bytes":
                ours["function_memory_limit"][function] = sample.value
            elif sample.name == "fast_gshare_gpu_memory_used_bytes":
                ours["gpu_memory_used"] = sample.value
            elif sample.name == "fast_gshare_gpu_utilization_ratio":
                ours["gpu_utilization"] = sample.value

    def smi(*query: str) -> list[list[str]]:
        lines = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()  # fmt: skip
        return [[cell.strip() for cell in line.split(",")] for line in lines]

    (used_mib, utilization), *_ = smi("--query-gpu=memory.used,utilization.gpu")
    processes = smi("--query-compute-apps=pid,process_name,used_memory")
    theirs = {
        "gpu_memory_used": float(used_mib) * 2**20,
        "gpu_utilization": float(utilization) / 100,
        "processes": [(int(pid), name, float(mib) * 2**20) for pid, name, mib in processes],
    }
    clients = sum(b for _, name, b in theirs["processes"] if "mps-server" not in name)
    ours_total = sum(ours["function_memory_used"].values())
    for function in sorted(ours["function_memory_used"]):
        held = ours["function_memory_used"][function] / 2**30
        cap = ours["function_memory_limit"].get(function)
        capped = f" of its cap {cap / 2**30:.2f} GiB" if cap else ""
        print(f"  readings: {function} holds {held:.2f} GiB{capped}", flush=True)
    gib = 2**30
    print(
        f"  readings: functions hold {ours_total / gib:.2f} GiB, nvidia-smi's client processes "
        f"{clients / gib:.2f} GiB; GPU memory used {ours['gpu_memory_used'] / gib:.2f} GiB "
        f"(nvidia-smi {theirs['gpu_memory_used'] / gib:.2f}); utilisation "
        f"{ours.get('gpu_utilization', float('nan')):.0%} "
        f"(nvidia-smi {theirs['gpu_utilization']:.0%})",
        flush=True,
    )
    return {"fast_gshare": ours, "nvidia_smi": theirs, "client_processes_bytes": clients}


def faults(args: argparse.Namespace) -> dict[str, Any]:
    """Fault drills: kill -9 one GPU replica; make one crash its GPU context (a fatal MPS
    fault); kill -9 the MPS control daemon and server of that GPU. Counts the requests lost by
    the ResNet-50 neighbour on the same GPU, by a plain function and, on a machine with more
    GPUs, by a ResNet-50 function on another GPU, and how long until the victim answers again.
    In the MPS drill every client of the GPU loses its server: the victim measured is the
    neighbour, called throughout."""
    import asyncio
    import signal
    import threading
    import urllib.error
    import urllib.request

    from faas_provider.gpu.discovery import discover_gpus

    functions = {
        "victim": {
            "image": "fast-gshare/gpu-fault:0.1.0",
            "annotations": {"fastgshare/gpu_sm_partition": "20"},
        },
        "neighbour": _shared(20),
        "plain": {"image": "fast-gshare/echo:0.1.0", "fprocess": "cat"},
    }
    if sum(not gpu.virtual for gpu in discover_gpus()) > 1:
        functions["far"] = _shared(90)  # 90 beside the 40 of victim and neighbour: another GPU
    body = _jpeg()
    outcome: dict[str, Any] = {}
    with provider(functions) as base:

        def call(name: str, data: bytes) -> int:
            request = urllib.request.Request(f"{base}/function/{name}", data=data)
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    answer.read()
                    return answer.status
            except urllib.error.HTTPError as error:
                return error.code
            except OSError:
                return 0

        bodies = {"neighbour": body, "plain": b"ping"}
        if "far" in functions:
            bodies["far"] = body
        record: dict[str, list[tuple[float, float, int]]] = {name: [] for name in bodies}
        stop = threading.Event()

        def keep_calling(name: str) -> None:
            while not stop.is_set():
                began = time.monotonic()
                status = call(name, bodies[name])
                record[name].append((began, time.monotonic(), status))
                time.sleep(0.02)

        def answering_again(drill: str, began: float) -> float | None:
            """Seconds from `began` until the drill's victim answered again; None before. In
            the MPS drill, the neighbour's calls tell; otherwise a call to the victim does."""
            if drill == "MPS kill -9":
                return _answering_again(record["neighbour"], began)
            return time.monotonic() - began if call("victim", b"") == 200 else None

        callers = [threading.Thread(target=keep_calling, args=(name,)) for name in bodies]
        for caller in callers:
            caller.start()
        time.sleep(2)
        for drill in ("kill -9", "GPU fault", "MPS kill -9"):
            _wait_all_available(base)  # the last drill's recycled replicas are back
            began = time.monotonic()
            mps: dict[str, Any] = {}
            if drill == "kill -9":
                victim = next(
                    int(pid)
                    for pid in os.listdir("/proc")
                    if pid.isdigit()
                    and b"functions/gpu-fault" in Path(f"/proc/{pid}/cmdline").read_bytes()
                )
                os.kill(victim, signal.SIGKILL)
            elif drill == "GPU fault":
                print(f"faults: the fault call answered {call('victim', b'fault')}", flush=True)
            else:
                daemon = _mps_daemon_of("neighbour")
                servers = asyncio.run(daemon.server_pids()) or []
                old = daemon.pid()
                assert old is not None, f"no MPS control daemon runs in {daemon.pipe_dir}"
                mps = {"gpu": daemon.gpu_index, "daemon_pid": old, "server_pids": servers}
                if "far" in functions:
                    mps["far_on_gpu"] = _mps_daemon_of("far").gpu_index
                began = time.monotonic()
                for pid in (old, *servers):
                    os.kill(pid, signal.SIGKILL)
            while (recovered := answering_again(drill, began)) is None:
                if time.monotonic() - began > 120:
                    break
                time.sleep(0.1)
            time.sleep(3)
            if drill == "MPS kill -9":
                recovered = answering_again(drill, began)  # a failure in these 3 s moves it
                mps["new_daemon_pid"] = daemon.pid()
            lost = {
                name: sum(1 for at, _, status in calls if at >= began and status != 200)
                for name, calls in record.items()
            }
            back = {
                name: max(
                    (at for at, _, status in calls if at >= began and status != 200),
                    default=began,
                )
                - began
                for name, calls in record.items()
            }
            outcome[drill] = {"victim_back_s": recovered, "lost": lost, "last_failure_s": back}
            outcome[drill] |= {"mps": mps} if mps else {}
            print(f"faults: {drill}: {outcome[drill]}", flush=True)
        stop.set()
        for caller in callers:
            caller.join()
        outcome["calls"] = {name: len(calls) for name, calls in record.items()}
    return {"mode": "faults", **outcome}


def replica_start(args: argparse.Namespace) -> dict[str, Any]:
    """How long a ResNet-50 GPU replica (20% SMs) takes from the scale call until it answers:
    forked warm from the fork server that preloaded torch and torchvision (the default), and
    with nothing preloaded, so that each replica imports them itself. Replicas 2, 3 and 4 are
    started one at a time, beside those already running."""
    import urllib.request

    outcome: dict[str, Any] = {}
    for label, preload in (("preloaded", "torch,torchvision"), ("no preload", "")):
        seconds = []
        with provider({"resnet": _shared(20)}, "--preload", preload) as base:
            for replicas in (2, 3, 4):
                began = time.monotonic()
                request = urllib.request.Request(
                    f"{base}/system/scale-function/resnet",
                    data=json.dumps({"serviceName": "resnet", "replicas": replicas}).encode(),
                )
                urllib.request.urlopen(request, timeout=10).read()
                _wait_all_available(base)
                seconds.append(time.monotonic() - began)
                print(f"replica-start: {label}: replica {replicas} in {seconds[-1]:.2f} s")
        outcome[label] = {"seconds": seconds, "median_s": sorted(seconds)[1]}
    ratio = outcome["no preload"]["median_s"] / outcome["preloaded"]["median_s"]
    print(f"replica-start: preloaded starts {ratio:.1f}x faster (median of 3 each)", flush=True)
    return {"mode": "replica-start", **outcome, "speedup": ratio}


def _wait_all_available(base: str, timeout_s: float = LOAD_TIMEOUT_S) -> None:
    """Wait until every function of the provider at `base` has all its replicas available."""
    import urllib.request

    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        with urllib.request.urlopen(f"{base}/system/functions", timeout=5) as answer:
            listed = json.loads(answer.read())
        if all(f["availableReplicas"] >= f["replicas"] for f in listed):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the functions were not all available again within {timeout_s:.0f} s")


def _gates_of(function: str) -> Iterator[tuple[int, list[str], dict[str, str]]]:
    """The pid, command line and environment of each running gate of `function`'s replicas."""
    client = f"openfaas-fn/{function}-"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        argv = command.split("\0")
        if "faas_provider.gate" in argv and any(a.startswith(client) for a in argv):
            yield int(pid), argv, dict(e.split("=", 1) for e in environ.split("\0") if "=" in e)


def _mps_daemon_of(function: str) -> Any:
    """The MPS control daemon (an MpsDaemon) that the provider runs for the GPU of
    `function`'s first replica, found through the environment of that replica's gate."""
    from faas_provider.gpu.discovery import discover_gpus
    from faas_provider.gpu.mps import MpsDaemon

    for _, _, env in _gates_of(function):
        if "CUDA_MPS_PIPE_DIRECTORY" in env:
            pipe_dir = Path(env["CUDA_MPS_PIPE_DIRECTORY"])  # <base>/<short GPU id>/pipe
            uuid = env["CUDA_VISIBLE_DEVICES"]
            index = next(gpu.index for gpu in discover_gpus() if gpu.uuid == uuid)
            return MpsDaemon(index, uuid, pipe_dir.parents[1])
    raise RuntimeError(f"no gate of {function} whose GPU has an MPS daemon")


def _answering_again(calls: list[tuple[float, float, int]], since: float) -> float | None:
    """Seconds from `since` until the function answered again: the end of its first call
    answered 200 that started after its last failed call (calls are (start, end, status));
    None while there is none."""
    failed = [end for _, end, status in calls if end >= since and status != 200]
    after = max(failed, default=since)
    answered = [end for start, end, status in calls if start >= after and status == 200]
    return min(answered) - since if answered else None


# --- modes, table, results -----------------------------------------------------------------


def bare_handler(args: argparse.Namespace) -> dict[str, Any]:
    """The processes as MPS clients at --sm-percent, each running the resnet50 handler's
    whole work on a JPEG: the function without the platform, what full-path is held to."""
    return run_bare("bare-handler", args.processes, args.sm_percent, args.seconds, True)


def single(args: argparse.Namespace) -> dict[str, Any]:
    """One process alone on the GPU."""
    return run_bare("single", 1, None, args.seconds)


def time_sliced(args: argparse.Namespace) -> dict[str, Any]:
    """The processes without MPS, time-sliced by the GPU."""
    return run_bare("time-sliced", args.processes, None, args.seconds)


def bare_mps(args: argparse.Namespace) -> dict[str, Any]:
    """The processes as MPS clients at --sm-percent each."""
    return run_bare("bare-mps", args.processes, args.sm_percent, args.seconds)


def bare_mps_batched(args: argparse.Namespace) -> dict[str, Any]:
    """As bare-mps, each inference on --clients images."""
    return run_bare(
        "bare-mps-batched", args.processes, args.sm_percent, args.seconds, batch=args.clients
    )


MODES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "single": single,
    "time-sliced": time_sliced,
    "bare-mps": bare_mps,
    "bare-mps-batched": bare_mps_batched,
    "bare-handler": bare_handler,
    "bare-runtime": bare_runtime,
    "full-path": full_path,
    "full-path-unbatched": full_path_unbatched,
    "partitions": partitions,
    "quotas": quotas,
    "quotas-prometheus": quotas_prometheus,
    "memory-cap": memory_cap,
    "faults": faults,
    "replica-start": replica_start,
}


def print_table(results: list[dict[str, Any]]) -> None:
    """One line per mode: aggregate throughput and the spread of per-process latencies; then
    the outcome of each experiment."""
    experiments = [r for r in results if "per_process" not in r]
    results = [r for r in results if "per_process" in r]
    for experiment in experiments:
        print(json.dumps(experiment))
    if not results:
        return
    first = results[0]
    print(f"on {first['device']}, torch {first['torch']}, {first['seconds']:g} s measured a mode")
    print(
        f"{'mode':<20} {'procs':>5} {'SM %':>5} {'img/s':>7} {'vs single':>9} {'vs bare-mps':>11} "
        f"{'p50 ms (min-max)':>17} {'p99 ms (min-max)':>17}"
    )
    rates = {result["mode"]: result["aggregate_img_s"] for result in results}

    def ratio(rate: float, reference: str) -> str:
        return f"{rate / rates[reference]:.2f}x" if reference in rates else "-"

    for result in results:
        rows = result["per_process"]
        p50 = [row["p50_ms"] for row in rows]
        p99 = [row["p99_ms"] for row in rows]
        rate = result["aggregate_img_s"]
        print(
            f"{result['mode']:<20} {result['processes']:>5} {result['sm_percent'] or '-':>5} "
            f"{rate:>7.0f} {ratio(rate, 'single'):>9} {ratio(rate, 'bare-mps'):>11} "
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
    parser.add_argument(
        "--clients", type=int, default=CLIENTS_PER_FUNCTION, help="full-path clients a function"
    )
    parser.add_argument("--max-batch-size", type=int, help="the functions' max_batch_size")
    parser.add_argument("--max-batch-delay", help="the functions' max_batch_delay, e.g. 5ms")
    parser.add_argument("--prometheus", help="the Prometheus binary for quotas-prometheus")
    parser.add_argument(
        "--plot", action="store_true", help="only draw the PNGs of the results saved before"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--through-handler", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.through_handler, args.batch)
        return
    if args.plot:
        saved = json.loads(RESULTS.read_text())["modes"]
        if "quotas-prometheus" in saved:
            plot_quotas(saved["quotas-prometheus"])
        plot_throughput(saved)
        return
    results = []
    try:
        for mode in args.modes:
            results.append(MODES[mode](args))
    finally:
        if results:
            print_table(results)
            save(results)
            plot_throughput(json.loads(RESULTS.read_text())["modes"])


if __name__ == "__main__":
    main()
