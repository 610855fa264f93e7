"""A real Kubernetes API server for the tests (../shared/envtest), and the parts of a cluster
it lacks, played by the tests: a stand-in kubelet that makes a function's pods ready, and the
EndpointSlice controller that lists where they answer.

The API server runs when `KUBEBUILDER_ASSETS` names a folder with `kube-apiserver` and `etcd`
(.ci/run sets it); without it the Kubernetes tests are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from faas_provider.backends.kubernetes.connection import connect
from faas_provider.backends.kubernetes.settings import KubernetesSettings
from faas_provider.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ENVTEST_SCRIPT = REPO.parent / "shared" / "envtest" / "envtest.sh"
FUNCTION_NAMESPACE = "openfaas-fn"
GPU_NODE = "gpu-node-1"
GPU_UUID = "GPU-5ee0e11d-0000-4000-8000-000000000001"
GPU_MEMORY = 16 * 1024**3  # as the local backend's virtual GPU, so both refuse alike


@dataclass(frozen=True)
class ApiServer:
    """A running envtest API server."""

    directory: Path
    kubeconfig: Path
    url: str


def envtest_assets() -> Path | None:
    """The folder of kube-apiserver and etcd that KUBEBUILDER_ASSETS names, if it holds both."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        return None
    folder = Path(assets)
    ok = all((folder / binary).is_file() for binary in ("kube-apiserver", "etcd"))
    return folder if ok else None


@contextlib.contextmanager
def api_server(directory: Path) -> Iterator[ApiServer]:
    """Start envtest's API server under `directory`; stop it afterwards."""
    if envtest_assets() is None:
        pytest.skip(
            "no Kubernetes API server: set KUBEBUILDER_ASSETS to a folder with kube-apiserver "
            "and etcd (../shared/envtest/envtest.sh unpack prints one)"
        )
    script = ENVTEST_SCRIPT
    if not script.is_file():
        pytest.skip(f"KUBEBUILDER_ASSETS is set but {script} (which starts them) is missing")
    started = subprocess.run(
        ["bash", str(script), "start", str(directory)], capture_output=True, text=True
    )
    if started.returncode != 0:
        raise RuntimeError(f"envtest did not start: {started.stderr[-2000:]}")
    try:
        url = started.stdout.strip().splitlines()[-1]
        yield ApiServer(directory, directory / "kubeconfig", url)
    finally:
        subprocess.run(["bash", str(script), "stop", str(directory)], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def on_cluster(settings: Settings, kubeconfig: Path) -> Settings:
    """`settings` for the Kubernetes backend on the cluster of `kubeconfig`."""
    return settings.model_copy(
        update={"backend": "kubernetes", "kubernetes": KubernetesSettings(kubeconfig=kubeconfig)}
    )


async def admin(server: ApiServer) -> client.ApiClient:
    """An API client with the admin credentials of `server`."""
    return await connect(server.kubeconfig)


async def reset(api: client.ApiClient) -> None:
    """Empty the function namespace (envtest has no namespace controller: a deleted namespace
    would never go away), and give the cluster one GPU node and no other."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    with contextlib.suppress(ApiException):
        await core.create_namespace(
            {"metadata": {"name": FUNCTION_NAMESPACE, "labels": {"openfaas": "1"}}}
        )
    await apps.delete_collection_namespaced_deployment(FUNCTION_NAMESPACE)
    await discovery.delete_collection_namespaced_endpoint_slice(FUNCTION_NAMESPACE)
    await core.delete_collection_namespaced_secret(FUNCTION_NAMESPACE)
    # at once: without a kubelet a pod bound to a node would stay, terminating, for good
    await core.delete_collection_namespaced_pod(FUNCTION_NAMESPACE, grace_period_seconds=0)
    for service in (await core.list_namespaced_service(FUNCTION_NAMESPACE)).items:
        await core.delete_namespaced_service(service.metadata.name, FUNCTION_NAMESPACE)
    for namespace in (await core.list_namespace(label_selector="openfaas=1")).items:
        name = namespace.metadata.name
        if name != FUNCTION_NAMESPACE and namespace.status.phase == "Active":
            await core.delete_namespace(name)
    for node in (await core.list_node()).items:
        await core.delete_node(node.metadata.name)
    gpus = [{"index": 0, "uuid": GPU_UUID, "name": "test GPU", "memory_bytes": GPU_MEMORY}]
    await core.create_node(
        {"metadata": {"name": GPU_NODE, "annotations": {"fastgshare/gpus": json.dumps(gpus)}}}
    )


def machine_address() -> str:
    """This machine's own non-loopback IPv4 address (EndpointSlices refuse loopback ones): the
    one a packet to a private address would leave from; none is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError as error:
            pytest.skip(f"no non-loopback address for the stand-in pods to answer at: {error}")
        return str(probe.getsockname()[0])


class Kubelet:
    """What a cluster's kubelets and controllers would do for the functions' Deployments: report
    every replica ready (status of the Deployment) and list each function's pods in an
    EndpointSlice of its Service, all answering at one server on this machine that echoes the
    body.

    `hold(name)` keeps a Deployment's pods from becoming ready (an image still being pulled)
    until `release(name)`.
    """

    def __init__(self, api: client.ApiClient) -> None:
        self._apps = client.AppsV1Api(api)
        self._discovery = client.DiscoveryV1Api(api)
        self._held: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.address = machine_address()
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    def hold(self, deployment: str) -> None:
        self._held.add(deployment)

    def release(self, deployment: str) -> None:
        self._held.discard(deployment)

    async def start(self) -> None:
        async def echo(request: web.Request) -> web.Response:
            return web.Response(body=await request.read(), headers={"X-Served-By": "kubelet"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._runner is not None:
            await self._runner.cleanup()

    async def _run(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(0.1)

    async def sync(self) -> None:
        """One pass: every Deployment's status and its function's EndpointSlice."""
        deployments = await self._apps.list_deployment_for_all_namespaces(
            label_selector="faas_function"
        )
        ready: dict[tuple[str, str], int] = {}
        for item in deployments.items:
            name, namespace = item.metadata.name, item.metadata.namespace
            function = (namespace, item.metadata.labels["faas_function"])
            count = 0 if name in self._held else item.spec.replicas or 0
            ready[function] = ready.get(function, 0) + count
            status = item.status
            if (status.available_replicas or 0) != count or (status.replicas or 0) != count:
                body = {
                    "status": {
                        "replicas": count,
                        "readyReplicas": count,
                        "availableReplicas": count,
                        "updatedReplicas": count,
                        "observedGeneration": item.metadata.generation,
                    }
                }
                with contextlib.suppress(ApiException):
                    await self._apps.patch_namespaced_deployment_status(name, namespace, body)
        for (namespace, function), count in ready.items():
            await self._publish(namespace, function, count)

    async def _publish(self, namespace: str, function: str, count: int) -> None:
        name = f"{function}-kubelet"
        endpoints: list[dict[str, Any]] = []
        if count:  # one address for all the ready pods: they all answer at the one server
            endpoints.append({"addresses": [self.address], "conditions": {"ready": True}})
        body = {
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/service-name": function},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": self.port, "protocol": "TCP"}],
            "endpoints": endpoints,
        }
        try:
            await self._discovery.replace_namespaced_endpoint_slice(name, namespace, body)
        except ApiException as error:
            if error.status != 404:
                raise
            await self._discovery.create_namespaced_endpoint_slice(namespace, body)


@contextlib.asynccontextmanager
async def kubelet(api: client.ApiClient) -> AsyncIterator[Kubelet]:
    """A running stand-in kubelet."""
    stand_in = Kubelet(api)
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.close()


class KubeletLogs:
    """The log endpoint of a kubelet (`/containerLogs/NS/POD/CONTAINER`), as the API server
    reaches it for `pods/log`: over HTTPS at the node's address and kubelet port, with
    `timestamps`, `tailLines`, `sinceSeconds` and `follow`. `say(pod, text)` logs a line."""

    def __init__(self, server: ApiServer) -> None:
        self.address = machine_address()
        self._tls = (
            server.directory / "pki" / "apiserver.crt",
            server.directory / "pki" / "apiserver.key",
        )
        self._lines: dict[str, list[tuple[datetime, str]]] = {}
        self._followers: dict[str, list[asyncio.Queue[tuple[datetime, str]]]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.asked: list[dict[str, str]] = []  # the queries the API server passed on

    def say(self, pod: str, text: str, when: datetime | None = None) -> None:
        line = (when or datetime.now(UTC), text)
        self._lines.setdefault(pod, []).append(line)
        for queue in self._followers.get(pod, []):
            queue.put_nowait(line)

    async def start(self) -> None:
        async def logs(request: web.Request) -> web.StreamResponse:
            pod = request.match_info["pod"]
            query = dict(request.query)
            self.asked.append(query)
            lines = list(self._lines.get(pod, []))
            if "sinceSeconds" in query:
                cutoff = datetime.now(UTC) - timedelta(seconds=int(query["sinceSeconds"]))
                lines = [line for line in lines if line[0] >= cutoff]
            if "tailLines" in query:
                lines = lines[-int(query["tailLines"]) :] if int(query["tailLines"]) else []
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await response.prepare(request)

            def render(line: tuple[datetime, str]) -> bytes:
                stamp = line[0].strftime("%Y-%m-%dT%H:%M:%S.%fZ") + " "
                return (
                    (stamp if query.get("timestamps") == "true" else "") + line[1] + "\n"
                ).encode()

            for line in lines:
                await response.write(render(line))
            if query.get("follow") == "true":
                queue: asyncio.Queue[tuple[datetime, str]] = asyncio.Queue()
                self._followers.setdefault(pod, []).append(queue)
                try:
                    while True:
                        await response.write(render(await queue.get()))
                finally:
                    self._followers[pod].remove(queue)
            return response

        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", logs)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)  # followers never end
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*self._tls)
        site = web.TCPSite(self._runner, self.address, 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def node(self, api: client.ApiClient, name: str) -> None:
        """Make Node `name` whose kubelet this is."""
        core = client.CoreV1Api(api)
        await core.create_node({"metadata": {"name": name}})
        status = {
            "status": {
                "addresses": [{"type": "InternalIP", "address": self.address}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            }
        }
        await core.patch_node_status(name, status)
