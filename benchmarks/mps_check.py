"""MPS on the real GPU through MpsDaemon: SM shares, memory caps, a fault, a restart, a clean stop.

    python3 benchmarks/mps_check.py [--seconds 3] [--json benchmarks/results/mps_check.json]

Needs an NVIDIA GPU, nvidia-cuda-mps-control and PyTorch (CuPy for the fault, if present);
the script itself uses only the standard library, pynvml and faas_provider.gpu.mps. Every
client is its own python3 process with `MpsDaemon.client_env` in its environment, and
`MpsDaemon.watch` runs throughout.

  (a) fp16 8192^3 matmul throughput of one client at 100% and at 25% of the SMs;
  (b) CUDA_MPS_PINNED_DEVICE_MEM_LIMIT: a 3 GB allocation under a 2 GiB cap, and under 8 GiB;
  (d) a fault: one client writes to an illegal address while another runs; what each sees,
      whether watch() reports the loss, whether a new client runs before and after the running
      one exits;
  (e) the daemon killed with SIGKILL: whether its server outlives it, and watch() restarting it;
  (c) stop() while a client still runs: how long it takes, and what is left afterwards.

Prints a table and writes JSON (with the lines the daemon and its server logged, less the
health checks' own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from faas_provider.gpu.mps import MpsDaemon, ServerLoss  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "mps_check.json"
GIB = 1024**3

THROUGHPUT = """
import json, sys, time, torch
n, seconds = 8192, float(sys.argv[1])
a = torch.randn(n, n, device="cuda", dtype=torch.float16)
b = torch.randn_like(a)
for _ in range(5):
    a @ b
torch.cuda.synchronize()
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    count += 10
elapsed = time.perf_counter() - start
print(json.dumps({"tflops": 2 * n**3 * count / elapsed / 1e12, "torch": torch.__version__}))
"""

ALLOCATE = """
import json, sys, torch
free, total = torch.cuda.mem_get_info()
try:
    x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
print(json.dumps({"allocated": error is None, "error": error, "free_seen": free,
                  "total_seen": total}))
"""

RUNNER = """
import json, sys, time, torch
a = torch.randn(2048, 2048, device="cuda")
print("ready", flush=True)
steps, start = 0, time.time()
try:
    while time.time() - start < float(sys.argv[1]):
        (a @ a).sum().item()
        steps += 1
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
print(json.dumps({"error": error, "steps": steps, "seconds": time.time() - start}), flush=True)
time.sleep(float(sys.argv[2]))
"""

FAULTER = """
import json
try:
    import cupy
    kernel = cupy.RawKernel(
        'extern "C" __global__ void poke(int *p) { *(volatile int *)0x10 = 1; p[0] = 1; }',
        "poke")
    x = cupy.zeros(1, dtype=cupy.int32)
    how = "CuPy kernel writing to address 0x10"
    run = lambda: (kernel((1,), (1,), (x,)), cupy.cuda.runtime.deviceSynchronize())
except ImportError:
    import torch
    x = torch.zeros(4, device="cuda")
    how = "PyTorch out-of-range index (device-side assert)"
    run = lambda: (x.index_fill_(0, torch.tensor([99], device="cuda"), 1.0),
                   torch.cuda.synchronize())
try:
    run()
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
print(json.dumps({"fault": how, "error": error}))
"""

SMALL = """
import json, torch
x = torch.ones(1024, device="cuda")
print(json.dumps({"sum": float(x.sum().item())}))
"""


async def client(
    code: str, env: dict[str, str], *args: str, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Run one client process; its last JSON line, or what went wrong."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return {"outcome": f"no answer within {timeout_s:g} s (killed)"}
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1]) | {"code": process.returncode}
    tail = err.decode(errors="replace").strip().splitlines()[-3:]
    return {"outcome": f"exit code {process.returncode}", "stderr": tail}


async def raw_command(daemon: MpsDaemon, line: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The control binary's exit code, stdout and stderr for one command (for the record)."""
    start = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        daemon.binary,
        env={**os.environ, **daemon.env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(f"{line}\n".encode()), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return {"command": line, "outcome": f"no answer within {timeout_s:g} s"}
    return {
        "command": line,
        "code": process.returncode,
        "stdout": out.decode().strip(),
        "stderr": err.decode().strip(),
        "seconds": round(time.monotonic() - start, 3),
    }


def mps_processes() -> list[str]:
    """`pid name` of every process whose name starts with nvidia-cuda-mps."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if name.startswith("nvidia-cuda-mps") and state != "Z":
                found.append(f"{entry.name} {name}")
    return found


def process_state(pid: int) -> str:
    """running, zombie (ended, not yet reaped) or gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
    return "zombie" if state == "Z" else "running"


def interesting(path: Path) -> list[str]:
    """A log's lines, less the five that each get_server_list adds to control.log."""
    if not path.exists():
        return []
    noise = ("Accepting connection...", "NEW UI", "UI closed", "Cmd:get_server_list")
    lines = path.read_text().splitlines()
    texts = [line.split("] ", 1)[-1] for line in lines]
    if path.name == "control.log":  # a bare number there is an answer to get_server_list
        noise += tuple(text for text in texts if text.strip().isdigit())
    return [line for line, text in zip(lines, texts, strict=True) if not text.startswith(noise)]


def carries_pipe_dir(pid: int, daemon: MpsDaemon) -> bool:
    """Whether `pid` runs with the daemon's CUDA_MPS_PIPE_DIRECTORY in its environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"CUDA_MPS_PIPE_DIRECTORY={daemon.pipe_dir}".encode() in environ


def gpu() -> dict[str, Any]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        as_text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        return {
            "name": as_text(pynvml.nvmlDeviceGetName(handle)),
            "uuid": as_text(pynvml.nvmlDeviceGetUUID(handle)),
            "driver": as_text(pynvml.nvmlSystemGetDriverVersion()),
        }
    finally:
        pynvml.nvmlShutdown()


async def start_runner(env: dict[str, str]) -> asyncio.subprocess.Process:
    """A client that keeps the GPU busy; returns once it has said `ready`."""
    runner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUNNER,
        "30",
        "120",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert runner.stdout is not None
    await asyncio.wait_for(runner.stdout.readline(), 60)
    return runner


async def runner_result(runner: asyncio.subprocess.Process, timeout_s: float) -> Any:
    """The runner's JSON line (its error, if any), or what it printed instead."""
    assert runner.stdout is not None
    line = await asyncio.wait_for(runner.stdout.readline(), timeout_s)
    return json.loads(line) if line.startswith(b"{") else line.decode()


async def end(runner: asyncio.subprocess.Process) -> None:
    """Kill the runner (it may have ended already) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        runner.kill()
    await runner.wait()


async def fault_check(daemon: MpsDaemon, events: dict[str, list[float]]) -> dict[str, Any]:
    """(d): a client writes to an illegal address while another runs."""
    env = daemon.client_env(50, None)
    runner = await start_runner(env)
    servers = await daemon.server_pids() or []
    status = [f"get_server_status {p}" for p in servers]
    fault: dict[str, Any] = {"status_before": [await raw_command(daemon, c) for c in status]}
    fault_at = time.monotonic()
    fault["faulter"] = await client(FAULTER, env, timeout_s=60)
    fault["runner"] = await runner_result(runner, 60)
    fault["runner_saw_it_after_s"] = round(time.monotonic() - fault_at, 2)
    fault["status_while_runner_alive"] = [await raw_command(daemon, c) for c in status]
    fault["new_client_while_runner_alive"] = await client(SMALL, env, timeout_s=20)
    await end(runner)
    await asyncio.sleep(2)
    fault["status_after_all_exit"] = [await raw_command(daemon, c) for c in status]
    fault["new_client_after_all_exit"] = await client(SMALL, env, timeout_s=60)
    await asyncio.sleep(1.5)  # two watch intervals
    fault["on_fault_calls_after_fault_s"] = [round(t - fault_at, 2) for t in events["fault"]]
    return fault


async def restart_check(daemon: MpsDaemon, events: dict[str, list[float]]) -> dict[str, Any]:
    """(e): the daemon killed with SIGKILL, with a server running."""
    await client(SMALL, daemon.client_env(100, None), timeout_s=60)  # a server exists
    old_pid = daemon.pid()
    old_servers = await daemon.server_pids() or []
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(0.3)  # the watch waits 0.5 s before it restarts anything
    servers_at_300ms = {p: process_state(p) for p in old_servers}
    while daemon.pid() in (None, old_pid) or not await daemon.healthy():
        if time.monotonic() - killed_at > 30:
            break
        await asyncio.sleep(0.1)
    return {
        "old_pid": old_pid,
        "new_pid": daemon.pid(),
        "seconds": round(time.monotonic() - killed_at, 2),
        "on_exit_calls": len(events["exit"]),
        "old_servers_0.3_s_after_kill": servers_at_300ms,
        "client_after": await client(SMALL, daemon.client_env(100, None), timeout_s=60),
    }


async def stop_check(daemon: MpsDaemon) -> dict[str, Any]:
    """(c): stop() while a client still runs, then look for leftovers."""
    runner = await start_runner(daemon.client_env(100, None))
    servers = await daemon.server_pids() or []
    pids = [daemon.pid(), *servers]
    started = time.monotonic()
    await daemon.stop(timeout_s=4)
    stop = {"seconds": round(time.monotonic() - started, 2)}
    stop["runner"] = await runner_result(runner, 30)
    await end(runner)
    await asyncio.sleep(0.5)
    stop["daemon_and_servers"] = {p: process_state(p) for p in pids if p is not None}
    stop["mps_processes"] = mps_processes()
    stop["healthy"] = await daemon.healthy()
    return stop


async def check(seconds: float) -> dict[str, Any]:
    card = gpu()
    base = Path(tempfile.mkdtemp(prefix="fast-gshare-mps-"))
    daemon = MpsDaemon(0, card["uuid"], base)
    result: dict[str, Any] = {"gpu": card}
    result["before_start"] = await raw_command(daemon, "get_server_list")
    events: dict[str, list[float]] = {"fault": [], "exit": []}

    async def on_lost(loss: ServerLoss) -> None:
        events["exit" if loss.daemon is not None else "fault"].append(time.monotonic())

    started = time.monotonic()
    await daemon.start()
    result["start"] = {"seconds": round(time.monotonic() - started, 2), "pid": daemon.pid()}
    result["healthy"] = await daemon.healthy()
    watch = daemon.watch(on_lost, interval_s=0.5, ask_every_s=5, backoff_s=0.5)
    watcher = asyncio.create_task(watch)
    try:
        # (a) SM shares
        shares = {}
        for percent in (100, 25):
            env = daemon.client_env(percent, None)
            shares[percent] = await client(THROUGHPUT, env, str(seconds))
        servers = await daemon.server_pids() or []
        result["sm"] = {
            "tflops_100": shares[100].get("tflops"),
            "tflops_25": shares[25].get("tflops"),
            "raw": shares,
            "server_carries_pipe_dir": [carries_pipe_dir(p, daemon) for p in servers],
        }
        if shares[100].get("tflops") and shares[25].get("tflops"):
            result["sm"]["ratio_25_to_100"] = shares[25]["tflops"] / shares[100]["tflops"]

        # (b) memory caps
        memory = {}
        for cap_gib in (2, 8):
            env = daemon.client_env(None, cap_gib * GIB)
            memory[f"{cap_gib}G"] = await client(ALLOCATE, env, str(3 * 10**9)) | {
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
            }
        result["memory"] = memory

        result["fault"] = await fault_check(daemon, events)
        result["restart"] = await restart_check(daemon, events)
        watcher.cancel()
        result["stop"] = await stop_check(daemon)
    except Exception as error:  # keep what was measured, and say where it stopped
        result["error"] = f"{type(error).__name__}: {error}"
        logging.exception("check stopped early")
    finally:
        watcher.cancel()
        await daemon.stop()
        result["control_log"] = interesting(daemon.log_dir / "control.log")
        result["server_log"] = interesting(daemon.log_dir / "server.log")
    return result


def table(result: dict[str, Any]) -> str:
    """The findings, one per row."""
    sm, memory, fault, restart, stop = (
        result.get(k, {}) for k in ("sm", "memory", "fault", "restart", "stop")
    )
    ratio = sm.get("ratio_25_to_100")
    rows = [
        ("GPU", f"{result['gpu']['name']}, driver {result['gpu']['driver']}"),
        ("daemon start", f"{result['start']['seconds']} s, pid {result['start']['pid']}"),
        ("healthy()", str(result.get("healthy"))),
        ("matmul 100% SMs", f"{sm.get('tflops_100') or 0:.0f} TFLOP/s"),
        ("matmul 25% SMs", f"{sm.get('tflops_25') or 0:.0f} TFLOP/s"),
        ("ratio 25/100", f"{ratio:.2f}" if ratio else "-"),
    ]
    for outcome in memory.values():
        cap = outcome["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
        said = outcome.get("error") or outcome
        rows.append((f"3 GB under {cap}", "allocated" if outcome.get("allocated") else str(said)))
    if fault:
        runner = fault["runner"]
        rows += [
            ("fault: faulting client", str(fault["faulter"].get("error"))),
            (
                "fault: other client",
                str(runner.get("error") if isinstance(runner, dict) else runner),
            ),
            ("fault: losses reported (s after)", str(fault["on_fault_calls_after_fault_s"])),
            ("fault: new client, other alive", json.dumps(fault["new_client_while_runner_alive"])),
            ("fault: new client after exit", json.dumps(fault["new_client_after_all_exit"])),
        ]
    if restart:
        rows.append(
            (
                "SIGKILL -> restarted",
                f"{restart['seconds']} s, pid {restart['old_pid']} -> {restart['new_pid']}, "
                f"new client {json.dumps(restart['client_after'])}",
            )
        )
    if stop:
        rows += [
            ("stop() with a client running", f"{stop['seconds']} s"),
            ("  that client", json.dumps(stop["runner"])),
            ("  left", f"{stop['daemon_and_servers']}, mps processes {stop['mps_processes']}"),
        ]
    if "error" in result:
        rows.append(("stopped early", result["error"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed matmul per share")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(check(args.seconds))
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
