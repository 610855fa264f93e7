"""The Kubernetes pod path on a real GPU, without a cluster: `fast-gshare node` as the DaemonSet
runs it, and "pods" started from the Deployment the template renders for a GPU-shared function.

    python3 benchmarks/node_agent_check.py [--seconds 3] [--json PATH]

A pod's containers are run as processes of this machine with the environment and arguments
the rendered Deployment gives them, doing only what the container runtime would: the host
path of each mounted volume in place of its mount path, and `NVIDIA_VISIBLE_DEVICES` (which
the NVIDIA container toolkit turns into the one GPU a container sees) as
`CUDA_VISIBLE_DEVICES`. Checked: the function container is an MPS client of the agent's daemon
(fp16 matmul throughput at the rendered 100% and 25% SM shares, and the rendered memory cap
refusing a 3 GB allocation under 2 GiB), and the gate sidecar registers with the agent's
token scheduler under the pod's name. Needs an NVIDIA GPU, nvidia-cuda-mps-control and torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from mps_check import ALLOCATE, GIB, THROUGHPUT, client  # noqa: E402

from faas_provider.backends.kubernetes.manifests import function_deployment  # noqa: E402
from faas_provider.backends.local.launch import python_environment  # noqa: E402
from faas_provider.gpu.discovery import discover_gpus  # noqa: E402
from faas_provider.gpu.share import gpu_share  # noqa: E402
from faas_provider.models import FunctionDeployment  # noqa: E402
from faas_provider.node.agent import RunDir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "node_agent_check.json"


def pod_processes(deployment: dict[str, Any], pod_name: str) -> tuple[dict[str, str], list[str]]:
    """The function container's environment and the gate's command line, as a container
    runtime would start them on this machine."""
    pod = deployment["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    (function,) = pod["containers"]
    mounts = {m["mountPath"]: host_paths.get(m["name"]) for m in function["volumeMounts"]}
    env = {e["name"]: e["value"] for e in function["env"]}
    env["CUDA_MPS_PIPE_DIRECTORY"] = mounts[env["CUDA_MPS_PIPE_DIRECTORY"]] or ""
    env["CUDA_VISIBLE_DEVICES"] = env.pop("NVIDIA_VISIBLE_DEVICES")
    (gate,) = pod["initContainers"]
    args = [arg.replace("$(POD_NAME)", pod_name) for arg in gate["args"]]
    port = args.index("--port") + 1
    args[args.index("--host") + 1], args[port] = "127.0.0.1", "0"
    return env, [sys.executable, "-m", "faas_provider.gate", *args]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def token_stats(socket_path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(b'{"op": "stats"}\n')
    stats = json.loads(await reader.readline())
    writer.close()
    return stats


async def check(seconds: float) -> dict[str, Any]:
    real = [gpu for gpu in discover_gpus() if not gpu.virtual]
    if not real:
        raise SystemExit("node_agent_check: no NVIDIA GPU here")
    gpu = real[0]
    root = Path(tempfile.mkdtemp(prefix="fg-node-"))
    run_dir = RunDir(PurePosixPath(root))
    port = free_port()
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faas_provider.cli", "node", "--run-dir", str(root),
        "--host", "127.0.0.1", "--port", str(port),
        env=python_environment(), cwd=REPO,
    )  # fmt: skip
    result: dict[str, Any] = {"gpu": gpu.name, "uuid": gpu.uuid}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as health:
                        if health.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
                if agent.returncode is not None:
                    raise SystemExit(
                        f"node_agent_check: the node agent exited ({agent.returncode})"
                    )
        slot = replace(gpu, node="this-node")
        for sm in (100, 25):
            spec = FunctionDeployment(
                service=f"matmul-{sm}",
                image="acme/matmul:1",
                annotations={"fastgshare/gpu_sm_partition": str(sm), "fastgshare/gpu_mem": "2Gi"},
            )
            rendered = function_deployment(spec, 1, gpu_share(spec), slot, "img", run_dir)
            env, _ = pod_processes(rendered, f"matmul-{sm}-pod")
            result[f"tflops_at_{sm}"] = await client(THROUGHPUT, env, str(seconds))
        result["allocate_3gb_under_2gi"] = await client(ALLOCATE, env, str(3 * GIB // 1))
        spec = FunctionDeployment(
            service="gated", image="acme/g:1", annotations={"fastgshare/gpu_sm_partition": "40"}
        )
        rendered = function_deployment(spec, 1, gpu_share(spec), slot, "img", run_dir)
        _, gate_argv = pod_processes(rendered, "gated-7d9f-abcde")
        gate = await asyncio.create_subprocess_exec(
            *gate_argv, env=python_environment(), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert gate.stdout is not None
        line = (await asyncio.wait_for(gate.stdout.readline(), 30)).decode().strip()
        result["gate_says"] = line
        result["token_service_clients"] = await token_stats(str(run_dir.token_socket))
        gate.terminate()
        await gate.wait()
    finally:
        if agent.returncode is None:
            agent.terminate()
        await agent.wait()
    result["agent_exit_code"] = agent.returncode
    full = result["tflops_at_100"].get("tflops", 0)
    part = result["tflops_at_25"].get("tflops", 0)
    result["ratio_25_to_100"] = part / full if full else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(check(args.seconds))
    rows = [
        ("GPU", f"{result['gpu']} ({result['uuid']})"),
        (
            "fp16 matmul, rendered 100% SMs",
            f"{result['tflops_at_100'].get('tflops', 0):.0f} TFLOPS",
        ),
        ("fp16 matmul, rendered 25% SMs", f"{result['tflops_at_25'].get('tflops', 0):.0f} TFLOPS"),
        ("25% / 100%", f"{result['ratio_25_to_100'] or 0:.2f}"),
        ("3 GB under the rendered 2Gi cap", str(result["allocate_3gb_under_2gi"].get("error"))),
        ("gate sidecar", result["gate_says"]),
        ("token scheduler's clients", json.dumps(result["token_service_clients"])),
        ("node agent exit on SIGTERM", str(result["agent_exit_code"])),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
