"""`fast-gshare node`: the node agent as a process, as the DaemonSet runs it on each GPU node.

It starts the agent (MPS daemons, token service, fault watch) in its run directory and serves
`/healthz` and `/metrics`. With `--node` it is on a cluster: it
publishes the node's GPUs on its Node for the provider's placement, and when a GPU's MPS
clients lose their server it deletes that GPU's function pods on the node, which their
Deployments start again as clients of the daemon it has restarted (backends/kubernetes/node_api.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from faas_provider.backends.kubernetes.connection import connect
from faas_provider.backends.kubernetes.node_api import publish_gpus, recycle_pods
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.mps import CONTROL_BINARY, ServerLoss
from faas_provider.node.agent import NodeAgent
from faas_provider.node.metrics import NodeCollector

log = logging.getLogger("fast_gshare.node")


def create_node_app(agent: NodeAgent, node: str | None = None) -> web.Application:
    """`/healthz` (200 while the token service listens) and `/metrics` (node/metrics.py)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(agent, node))

    async def healthz(request: web.Request) -> web.Response:
        if not agent.token_socket.exists():
            return web.Response(status=503, text="the token service does not listen")
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


@contextlib.asynccontextmanager
async def running_node(
    devices: list[GpuDevice],
    run_dir: Path,
    host: str,
    port: int,
    window_s: float,
    node: str | None,
    kubeconfig: Path | None,
    mps_binary: str = CONTROL_BINARY,
) -> AsyncIterator[tuple[NodeAgent, int]]:
    """The node agent, started and serving; the agent and its port. Stopped on exit."""
    agent = NodeAgent(devices, window_s=window_s, mps_binary=mps_binary, run_dir=run_dir)
    api = await connect(kubeconfig) if node is not None else None
    if api is not None and node is not None:

        async def on_lost(device: GpuDevice, loss: ServerLoss) -> None:
            log.warning("MPS clients of GPU %d lost their server (%s)", device.index, loss)
            await recycle_pods(api, node, device.uuid)

        agent.on_lost = on_lost
    runner = web.AppRunner(create_node_app(agent, node), access_log=None)
    try:
        await agent.start()
        await runner.setup()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family)
        await web.SockSite(runner, listener).start()
        port = listener.getsockname()[1]
        log.info(
            "node agent: /healthz and /metrics on %s:%d, run directory %s", host, port, run_dir
        )
        if api is not None and node is not None:
            await publish_gpus(api, node, devices)
        yield agent, port
    finally:
        await runner.cleanup()
        await agent.close()
        if api is not None:
            await api.close()
