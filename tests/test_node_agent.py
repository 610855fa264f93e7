"""`fast-gshare node` on a real API server: it publishes its GPUs on its Node, serves its
health, and deletes the function pods of a GPU whose MPS server is lost (the stand-in MPS
control binary of tests/fixtures plays the daemon)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from kubernetes_asyncio import client

from faas_provider.backends.kubernetes.node_api import node_gpus
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.node.serve import running_node
from tests import kube

FAKE_MPS = str(Path(__file__).parent / "fixtures" / "fake-mps-control")
NODE = "agent-node"
GPU = GpuDevice(
    index=0,
    uuid="GPU-abcdef01-0000-4000-8000-000000000000",
    name="H200",
    memory_bytes=141 * 1024**3,
    sm_count=132,
    cpu_cores=24,
)


@pytest.fixture
async def admin(kube_admin: client.ApiClient) -> AsyncIterator[client.ApiClient]:
    """The admin client, with the agent's Node made (and removed after)."""
    core = client.CoreV1Api(kube_admin)
    await core.create_node({"metadata": {"name": NODE}})
    yield kube_admin
    await core.delete_node(NODE)


def pod(name: str, gpu: str, node: str) -> dict[str, object]:
    return {
        "metadata": {"name": name, "labels": {"faas_function": "f", "fastgshare/gpu": gpu}},
        "spec": {"nodeName": node, "containers": [{"name": "f", "image": "acme/f:1"}]},
    }


async def test_the_agent_publishes_its_gpus_and_recycles_the_pods_of_a_lost_gpu(
    tmp_path: Path, api_server: kube.ApiServer, admin: client.ApiClient
) -> None:
    core = client.CoreV1Api(admin)
    ns = kube.FUNCTION_NAMESPACE
    await core.create_namespaced_pod(ns, pod("on-the-gpu", GPU.uuid, NODE))
    await core.create_namespaced_pod(ns, pod("other-gpu", "GPU-99999999", NODE))
    await core.create_namespaced_pod(ns, pod("other-node", GPU.uuid, kube.GPU_NODE))
    run_dir = tmp_path / "run"
    async with running_node(
        [GPU], run_dir, "127.0.0.1", 0, 0.1, NODE, api_server.kubeconfig, mps_binary=FAKE_MPS
    ) as (agent, port):
        published = node_gpus(admin.sanitize_for_serialization(await core.read_node(NODE)))
        assert published == [
            GpuDevice(
                index=0,
                uuid=GPU.uuid,
                name="H200",
                memory_bytes=GPU.memory_bytes,
                sm_count=132,
                node=NODE,
                cpu_cores=24,
            )
        ]
        assert (run_dir / "tokens" / "tokens.sock").is_socket()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as health,
        ):
            assert health.status == 200
        daemon = agent.daemon(0)
        assert daemon is not None and daemon.pipe_dir == run_dir / "mps" / "abcdef01" / "pipe"
        pid = daemon.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the GPU's control daemon dies, and its server with it
        for _ in range(100):
            marked = {
                p.metadata.name: p.metadata.deletion_timestamp is not None
                for p in (await core.list_namespaced_pod(ns)).items
            }
            if marked.get("on-the-gpu"):
                break
            await asyncio.sleep(0.1)
        # without a kubelet a bound pod stays, marked for deletion, until its kubelet ends it
        assert marked == {"on-the-gpu": True, "other-gpu": False, "other-node": False}
        assert daemon.running(), "the agent started the daemon again"
    assert not (run_dir / "tokens" / "tokens.sock").exists(), "a stopped agent leaves no socket"
    assert not daemon.running()
