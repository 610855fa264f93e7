"""The Kubernetes backend: functions as Deployments and Services, secrets as Secrets.

Everything is kept on the cluster (manifests.py says where), so a restarted provider rebuilds
its functions, their desired counts and the GPU placement from the objects it lists. Informers
keep a copy of the function namespaces (labelled openfaas=1), the functions' Services and
Deployments, their EndpointSlices and the Nodes (whose GPUs the node agents publish), and
every write's answer goes into that copy at once, so a status read after a deploy sees it.

Kubernetes runs the pods (restarts, probes, rolling updates); this backend decides only what
Kubernetes cannot: which GPU each replica of a GPU-shared function runs on, with which share.
Placement is computed, under one lock, from the copy: the GPUs the Nodes publish and the
replicas the Deployments hold there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client.registry import Collector

from faas_provider.backends.base import LogQuery, ReplicaCounts
from faas_provider.backends.kubernetes.connection import connect
from faas_provider.backends.kubernetes.informer import Informer, Key, checked, list_document
from faas_provider.backends.kubernetes.manifests import (
    GPU_LABEL,
    MANAGED_BY,
    NODE_ANNOTATION,
    PROFILE_KEY,
    RECORD_ANNOTATION,
    REPLICAS_ANNOTATION,
    function_deployment,
    function_service,
    profile_config_map,
    profile_config_map_name,
)
from faas_provider.backends.kubernetes.node_api import node_gpus
from faas_provider.backends.kubernetes.settings import KubernetesSettings
from faas_provider.errors import Conflict, InvalidRequest, NotFound, ProviderError, Unavailable
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.placement import Placer, spread
from faas_provider.gpu.share import GpuShare, gpu_share
from faas_provider.metrics import PlacementCollector
from faas_provider.models import (
    FUNCTION_LABEL,
    FunctionDeployment,
    FunctionStatus,
    LogMessage,
    Secret,
    check_namespace_deletion,
    namespace_or_default,
    utcnow,
)
from faas_provider.node.agent import RunDir
from faas_provider.profile.model import Profile

log = logging.getLogger("fast_gshare.kubernetes")

NAMESPACE_LABEL = "openfaas"  # function namespaces are labelled openfaas=1
SECRET_LABELS = {"app.kubernetes.io/managed-by": "openfaas"}  # as faas-netes labels secrets
SHARED_GPUS = "the cluster's shared GPUs"  # how placement's refusals name them
SYNC_TIMEOUT_S = 10.0
ROLLOUT_TIMEOUT_S = 120.0
T = TypeVar("T")


class ApiProblem(ProviderError):
    """The API server refused a call for a reason that is not the caller's (403, 5xx)."""

    status = 502


class KubernetesBackend:
    """Runs functions on a Kubernetes cluster; implements `faas_provider.backends.base.Backend`."""

    orchestration = "kubernetes"

    def __init__(self, settings: KubernetesSettings, startup_wait_s: float = 30.0) -> None:
        self._settings = settings
        self._paths = RunDir(PurePosixPath(settings.node_run_dir))
        self._startup_wait_s = startup_wait_s
        self._api: client.ApiClient | None = None
        self._informers: list[Informer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()  # one placement decision at a time
        self._gpus_seen: dict[str, list[GpuDevice]] = {}  # by node
        self._gpus_changed = asyncio.Event()

    async def start(self) -> None:
        """Connect, start the informers and wait (a while) for their first lists."""
        self._api = await connect(self._settings.kubeconfig)
        host = self._api.configuration.host
        core, apps = client.CoreV1Api(self._api), client.AppsV1Api(self._api)
        self._core, self._apps = core, apps
        discovery = client.DiscoveryV1Api(self._api)
        managed = selector(MANAGED_BY)
        self._namespaces = Informer(
            "namespaces", core.list_namespace, label_selector=f"{NAMESPACE_LABEL}=1"
        )
        self._services = Informer(
            "services", core.list_service_for_all_namespaces, label_selector=managed
        )
        self._deployments = Informer(
            "deployments", apps.list_deployment_for_all_namespaces, label_selector=managed
        )
        self._slices = Informer(
            "endpointslices",
            discovery.list_endpoint_slice_for_all_namespaces,
            label_selector="kubernetes.io/service-name",
        )
        self._nodes = Informer("nodes", core.list_node)
        self._informers = [
            self._namespaces,
            self._services,
            self._deployments,
            self._slices,
            self._nodes,
        ]
        self._nodes.on_change = self._on_node_event
        self._tasks = [asyncio.create_task(i.run()) for i in self._informers]
        self._tasks.append(asyncio.create_task(self._place_when_gpus_change()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SYNC_TIMEOUT_S):
                await asyncio.gather(*(i.tried.wait() for i in self._informers))
        if not all(i.synced.is_set() for i in self._informers):
            log.warning(
                "the provider cannot read the cluster at %s yet; it answers 503 until it can",
                host,
            )
            return
        gpus = len(self._devices())
        log.info(
            "kubernetes backend on %s: %d function(s), %d shared GPU(s) on the nodes",
            host,
            len(self._services.items),
            gpus,
        )

    async def close(self) -> None:
        """Stop the informers; the cluster keeps everything."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._api is not None:
            await self._api.close()

    # functions

    async def list_functions(self, namespace: str) -> list[FunctionStatus]:
        self._check_reachable()
        return [
            self._status(service)
            for (ns, _), service in sorted(self._services.items.items())
            if ns == namespace
        ]

    async def get_function(self, name: str, namespace: str) -> FunctionStatus:
        return self._status(self._service(name, namespace))

    async def deploy(self, deployment: FunctionDeployment) -> None:
        async with self._lock:
            name, namespace = deployment.service, deployment.namespace
            if (namespace, name) in self._services.items:
                raise Conflict(
                    f"function {name} exists in namespace {namespace}; "
                    "update it with PUT /system/functions"
                )
            share = await self._validate(deployment)
            replicas = deployment.min_replicas()
            created: list[tuple[str, str]] = []
            try:
                service = await self._write(
                    f"Service {namespace}/{name}",
                    self._core.create_namespaced_service(
                        namespace, function_service(deployment, replicas)
                    ),
                )
                created.append(("Service", name))
                self._services.apply("ADDED", service)
                for obj in self._plan(deployment, share, replicas, self._placer()).values():
                    made = await self._write(
                        f"Deployment {namespace}/{obj['metadata']['name']}",
                        self._apps.create_namespaced_deployment(namespace, obj),
                    )
                    created.append(("Deployment", obj["metadata"]["name"]))
                    self._deployments.apply("ADDED", made)
            except ProviderError:
                await self._remove(namespace, created)
                raise
            log.info("deployed %s.%s (%d replica(s))", name, namespace, replicas)

    async def update(self, deployment: FunctionDeployment) -> None:
        async with self._lock:
            name, namespace = deployment.service, deployment.namespace
            service = self._service(name, namespace)
            share = await self._validate(deployment)
            replicas = self._desired(service)
            old = record_of(service)
            if gpu_share(old) == share:  # the replicas keep their GPUs; Kubernetes rolls them
                placer = self._placer(leaving={(namespace, name)})
                wanted = self._plan(deployment, share, replicas, placer, self._held(old))
            else:  # placed anew beside the old replicas, which serve until the new are ready
                wanted = self._plan(deployment, share, replicas, self._placer())
            await self._replace_service(service, function_service(deployment, replicas))
            await self._apply_deployments(deployment, wanted, retire_when_ready=True)
            log.info("updated %s.%s", name, namespace)

    async def delete(self, name: str, namespace: str) -> None:
        async with self._lock:
            self._service(name, namespace)
            owned = [("Deployment", d) for d in self._deployments_of(name, namespace)]
            profile = ("ConfigMap", profile_config_map_name(name))
            await self._remove(namespace, [profile, *owned, ("Service", name)])
            log.info("deleted %s.%s", name, namespace)
            await self._place_pending()

    async def scale(self, name: str, namespace: str, replicas: int) -> None:
        async with self._lock:
            service = self._service(name, namespace)
            before = self._desired(service)
            if before == replicas:
                return
            log.info("scaling %s.%s from %d to %d", name, namespace, before, replicas)
            deployment = record_of(service)
            updated = function_service(deployment, replicas)
            await self._replace_service(service, updated)
            share = gpu_share(deployment)
            placer = self._placer(leaving={(namespace, name)})
            held = self._held(deployment)
            if replicas < before and held:  # keep the GPUs with most of its replicas
                kept: Counter[GpuDevice] = Counter()
                for device, count in sorted(held.items(), key=lambda item: -item[1]):
                    kept[device] = max(0, min(count, replicas - kept.total()))
                held = +kept
            wanted = self._plan(deployment, share, replicas, placer, held)
            await self._apply_deployments(deployment, wanted)
            if replicas < before:
                await self._place_pending()

    async def endpoints(self, name: str, namespace: str) -> list[str]:
        service = self._service(name, namespace)
        where = f"{name}.{namespace}"
        try:
            async with asyncio.timeout(self._startup_wait_s):
                while not (ready := self._ready_endpoints(name, namespace)):
                    if self._desired(service) == 0:
                        raise Unavailable(
                            f"function {where} is scaled to zero: scale it up, or call it "
                            "through the gateway with scale_from_zero=true"
                        )
                    await self._slices.wait_changed(1.0)
                    service = self._service(name, namespace)
        except TimeoutError:
            pending = self._desired(service) - self._placed(name, namespace)
            if pending > 0:
                raise Unavailable(
                    f"no replica of function {where} is ready: {pending} pending, "
                    f"{self._why_pending(record_of(service))}"
                ) from None
            raise Unavailable(f"no replica of function {where} is ready") from None
        return ready

    def metric_collectors(self) -> list[Collector]:
        # placement is the provider's; each node agent serves its GPUs' other metrics itself
        return [PlacementCollector(self._placer)]

    def replica_counts(self) -> dict[tuple[str, str], ReplicaCounts]:
        counts = {}
        for (namespace, name), service in self._services.items.items():
            desired = self._desired(service)
            share = gpu_share(record_of(service))
            waiting = share is not None and not share.exclusive
            pending = max(0, desired - self._placed(name, namespace)) if waiting else 0
            counts[(namespace, name)] = ReplicaCounts(
                desired,
                self._available(name, namespace),
                pending,
                pending_reason=self._why_pending(record_of(service)) if pending else None,
            )
        return counts

    # namespaces

    async def list_namespaces(self) -> list[str]:
        self._check_reachable()
        return sorted(name for (_, name), ns in self._namespaces.items.items() if _active(ns))

    async def get_namespace(self, name: str) -> dict[str, object]:
        meta = self._namespace(name)["metadata"]
        return {
            "name": name,
            "labels": meta.get("labels", {}),
            "annotations": meta.get("annotations", {}),
        }

    async def create_namespace(
        self, name: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> None:
        self._check_reachable()
        body = {
            "metadata": {
                "name": name,
                "labels": {**labels, NAMESPACE_LABEL: "1"},
                "annotations": annotations,
            }
        }
        made = await self._write(f"Namespace {name}", self._core.create_namespace(body))
        self._namespaces.apply("ADDED", made)

    async def update_namespace(
        self, name: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> None:
        held = self._namespace(name)
        body = {
            "metadata": {
                **held["metadata"],
                "labels": {**labels, NAMESPACE_LABEL: "1"},
                "annotations": annotations,
            }
        }
        made = await self._write(f"Namespace {name}", self._core.replace_namespace(name, body))
        self._namespaces.apply("MODIFIED", made)

    async def delete_namespace(self, name: str) -> None:
        self._namespace(name)
        check_namespace_deletion(name, any(ns == name for ns, _ in self._services.items))
        await self._call(f"Namespace {name}", self._core.delete_namespace(name))
        self._namespaces.items.pop(("", name), None)  # its watch events say Terminating

    # secrets

    async def list_secrets(self, namespace: str) -> list[Secret]:
        self._namespace(namespace)
        listed = await self._call(
            f"Secrets of {namespace}",
            self._core.list_namespaced_secret(namespace, label_selector=selector(SECRET_LABELS)),
        )
        return [Secret(name=s.metadata.name, namespace=namespace) for s in listed.items]

    async def create_secret(self, secret: Secret) -> None:
        namespace = namespace_or_default(secret.namespace)
        self._namespace(namespace)
        await self._call(
            f"Secret {namespace}/{secret.name}",
            self._core.create_namespaced_secret(namespace, _secret_body(secret, namespace)),
        )

    async def update_secret(self, secret: Secret) -> None:
        namespace = namespace_or_default(secret.namespace)
        self._namespace(namespace)
        await self._call(
            f"Secret {namespace}/{secret.name}",
            self._core.replace_namespaced_secret(
                secret.name, namespace, _secret_body(secret, namespace)
            ),
        )

    async def delete_secret(self, name: str, namespace: str) -> None:
        self._namespace(namespace)
        await self._call(
            f"Secret {namespace}/{name}", self._core.delete_namespaced_secret(name, namespace)
        )

    # profiles

    async def get_profile(self, name: str, namespace: str) -> Profile:
        self._service(name, namespace)
        config_map = profile_config_map_name(name)
        try:
            stored = await self._call(
                f"ConfigMap {namespace}/{config_map}",
                self._core.read_namespaced_config_map(config_map, namespace),
            )
        except NotFound:
            raise NotFound(
                f"function {name}.{namespace} has no profile: run fast-gshare profile"
            ) from None
        return Profile.model_validate_json((stored.data or {}).get(PROFILE_KEY, "{}"))

    async def store_profile(self, name: str, namespace: str, profile: Profile) -> None:
        self._service(name, namespace)
        body = profile_config_map(name, namespace, profile.model_dump_json())
        config_map = body["metadata"]["name"]
        what = f"ConfigMap {namespace}/{config_map}"
        try:
            await self._call(
                what, self._core.replace_namespaced_config_map(config_map, namespace, body)
            )
        except NotFound:
            await self._call(what, self._core.create_namespaced_config_map(namespace, body))
        log.info("stored the profile of %s.%s in %s", name, namespace, what)

    # logs

    async def logs(self, query: LogQuery) -> AsyncIterator[LogMessage]:
        """The function's pods' logs (kubectl logs, with timestamps), after a line for each
        reason Kubernetes gives why replicas do not run: a Deployment that cannot make its
        pods (quota), a container that waits (an image that cannot be pulled)."""
        self._service(query.name, query.namespace)
        for name in self._deployments_of(query.name, query.namespace):
            held = self._deployments.items[(query.namespace, name)]
            for condition in held.get("status", {}).get("conditions") or []:
                failing = (
                    condition.get("type") == "ReplicaFailure" and condition.get("status") == "True"
                )
                stuck = (
                    condition.get("type") == "Progressing" and condition.get("status") == "False"
                )
                if failing or stuck:
                    stamp = condition.get("lastUpdateTime")
                    when = _parse_time(stamp) if stamp else utcnow()
                    text = f"{condition.get('reason')}: {condition.get('message', '')}"
                    yield self._message(query, name, when, text)
        lines: asyncio.Queue[LogMessage | None] = asyncio.Queue()
        readers: dict[str, asyncio.Task[None]] = {}
        said: set[tuple[str, str]] = set()

        def consider(event: str, pod: dict[str, Any]) -> None:
            """Read a pod's log once its container has started; say why one waits."""
            name = pod["metadata"]["name"]
            if event == "DELETED" or name in readers or query.instance not in (None, name):
                return
            statuses = pod.get("status", {}).get("containerStatuses") or []
            state = next((c.get("state", {}) for c in statuses if c["name"] == query.name), {})
            waiting = state.get("waiting") or {}
            reason = waiting.get("reason")
            if reason not in (None, "ContainerCreating") and (name, reason) not in said:
                said.add((name, reason))
                text = f"{query.name} waiting: {reason}: {waiting.get('message', '')}".strip()
                lines.put_nowait(self._message(query, name, utcnow(), text))
            if "running" in state or "terminated" in state:
                readers[name] = asyncio.create_task(self._read_pod_log(name, query, lines))

        pods_of = f"{FUNCTION_LABEL}={query.name}"
        watch = None
        if query.follow:  # pods that start later are followed too
            pods = Informer(
                f"pods of {query.name}.{query.namespace}",
                self._core.list_namespaced_pod,
                namespace=query.namespace,
                label_selector=pods_of,
            )
            pods.on_change = consider
            watch = asyncio.create_task(pods.run())
        else:
            listed = await self._call(
                f"Pods of {query.name}.{query.namespace}",
                list_document(
                    self._core.list_namespaced_pod,
                    namespace=query.namespace,
                    label_selector=pods_of,
                ),
            )
            for pod in listed.get("items", []):
                consider("ADDED", pod)
            lines.put_nowait(None)  # the end, once the readers' ends are counted
        try:
            ends = 0
            while watch is not None or ends < len(readers) + 1:
                message = await lines.get()
                if message is None:
                    ends += 1
                else:
                    yield message
        finally:
            tasks = [*readers.values(), *([watch] if watch is not None else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_pod_log(
        self, pod: str, query: LogQuery, lines: asyncio.Queue[LogMessage | None]
    ) -> None:
        """Queue the log lines of pod `pod`'s function container, then None."""
        try:
            kwargs: dict[str, Any] = {"timestamps": True, "follow": query.follow}
            if query.tail is not None:
                kwargs["tail_lines"] = query.tail
            if query.since is not None:
                kwargs["since_seconds"] = max(1, int((utcnow() - query.since).total_seconds()))
            response = await checked(
                await self._core.read_namespaced_pod_log(
                    pod, query.namespace, container=query.name, _preload_content=False, **kwargs
                )
            )
            try:
                async for raw in response.content:
                    stamp, _, text = raw.decode(errors="replace").rstrip("\n").partition(" ")
                    await lines.put(self._message(query, pod, _parse_time(stamp), text))
            finally:
                response.release()
        except (ApiException, aiohttp.ClientError) as error:
            log.info("no log of pod %s/%s: %s", query.namespace, pod, _reason(error))
        finally:
            await lines.put(None)

    @staticmethod
    def _message(query: LogQuery, instance: str, when: datetime, text: str) -> LogMessage:
        return LogMessage(
            name=query.name, namespace=query.namespace, instance=instance, timestamp=when, text=text
        )

    # internals: the copy

    def _check_reachable(self) -> None:
        """Unavailable (503) while the copy of the cluster is not current, saying why."""
        problems = sorted({i.problem for i in self._informers if i.problem is not None})
        if problems:
            raise Unavailable(f"{'; '.join(problems)}; try again when it is back")
        if not all(i.synced.is_set() for i in self._informers):
            raise Unavailable("the provider has not yet read the cluster; try again shortly")

    def _service(self, name: str, namespace: str) -> dict[str, Any]:
        self._check_reachable()
        service = self._services.items.get((namespace, name))
        if service is None:
            raise NotFound(f"function {name} not found in namespace {namespace}")
        return service

    def _namespace(self, name: str) -> dict[str, Any]:
        self._check_reachable()
        namespace = self._namespaces.items.get(("", name))
        if namespace is None or not _active(namespace):
            raise NotFound(f"namespace {name} not found (or not labelled {NAMESPACE_LABEL}=1)")
        return namespace

    def _deployments_of(self, name: str, namespace: str) -> list[str]:
        return sorted(
            key[1]
            for key, obj in self._deployments.items.items()
            if key[0] == namespace and obj["metadata"]["labels"].get(FUNCTION_LABEL) == name
        )

    def _desired(self, service: dict[str, Any]) -> int:
        return int(service["metadata"].get("annotations", {}).get(REPLICAS_ANNOTATION, "0"))

    def _placed(self, name: str, namespace: str) -> int:
        return sum(
            self._deployments.items[(namespace, d)]["spec"].get("replicas", 0)
            for d in self._deployments_of(name, namespace)
        )

    def _available(self, name: str, namespace: str) -> int:
        return sum(
            self._deployments.items[(namespace, d)].get("status", {}).get("availableReplicas", 0)
            for d in self._deployments_of(name, namespace)
        )

    def _status(self, service: dict[str, Any]) -> FunctionStatus:
        deployment = record_of(service)
        name, namespace = deployment.service, deployment.namespace
        created = _parse_time(service["metadata"]["creationTimestamp"])
        return deployment.status(self._desired(service), self._available(name, namespace), created)

    def _ready_endpoints(self, name: str, namespace: str) -> list[str]:
        urls = []
        for (ns, _), piece in self._slices.items.items():
            labels = piece["metadata"].get("labels", {})
            if ns != namespace or labels.get("kubernetes.io/service-name") != name:
                continue
            port = next((p["port"] for p in piece.get("ports") or [] if p.get("name") == "http"), 0)
            for endpoint in piece.get("endpoints") or []:
                if port and endpoint.get("conditions", {}).get("ready", True):
                    address = endpoint["addresses"][0]
                    host = f"[{address}]" if ":" in address else address
                    urls.append(f"http://{host}:{port}")
        return sorted(urls)

    # internals: placement

    def _devices(self) -> list[GpuDevice]:
        """The shared GPUs the Nodes publish, node by node."""
        return [gpu for _, node in sorted(self._nodes.items.items()) for gpu in node_gpus(node)]

    def _placer(self, leaving: set[Key] = frozenset()) -> Placer:
        """Placement as the cluster holds it now, less the functions in `leaving`."""
        devices = self._devices()
        placer = Placer(devices, where=SHARED_GPUS)
        for (namespace, name), service in self._services.items.items():
            if (namespace, name) in leaving:
                continue
            deployment = record_of(service)
            share = gpu_share(deployment)
            if share is None or share.exclusive:
                continue
            for device, count in self._held(deployment, devices).items():
                for index in range(count):
                    placer.hold(f"{namespace}/{name}/{device.uuid}/{index}", share, device)
        return placer

    def _held(
        self, deployment: FunctionDeployment, devices: list[GpuDevice] | None = None
    ) -> Counter[GpuDevice]:
        """How many replicas of `deployment` each GPU of `devices` (the published ones when
        None) holds now; those on a GPU no longer published are left out."""
        by_place = {(d.node, d.uuid): d for d in (self._devices() if devices is None else devices)}
        held: Counter[GpuDevice] = Counter()
        for name in self._deployments_of(deployment.service, deployment.namespace):
            obj = self._deployments.items[(deployment.namespace, name)]
            uuid = obj["spec"]["selector"]["matchLabels"].get(GPU_LABEL)
            node = obj["metadata"].get("annotations", {}).get(NODE_ANNOTATION)
            if (node, uuid) in by_place:
                held[by_place[(node, uuid)]] += obj["spec"].get("replicas", 0)
        return held

    def _plan(
        self,
        deployment: FunctionDeployment,
        share: GpuShare | None,
        replicas: int,
        placer: Placer,
        held: Counter[GpuDevice] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The Deployments that run `replicas` replicas: one for a plain or whole-GPU function;
        for a GPU-shared one, those on the GPUs in `held` (kept there) and on GPUs with room
        for the rest, as far as there is room."""
        image = self._settings.gate_image
        if share is None or share.exclusive:
            obj = function_deployment(deployment, replicas, share, None, image, self._paths)
            return {obj["metadata"]["name"]: obj}
        key = f"{deployment.namespace}/{deployment.service}"
        placed, _ = spread(placer, key, share, replicas, held)
        wanted = {}
        for device, count in placed.items():
            obj = function_deployment(deployment, count, share, device, image, self._paths)
            wanted[obj["metadata"]["name"]] = obj
        return wanted

    def _why_pending(self, deployment: FunctionDeployment) -> str:
        share = gpu_share(deployment)
        if share is None or share.exclusive:
            return "Kubernetes has not started them (see the function's logs)"
        reason = self._placer().place("probe", share)
        return reason if isinstance(reason, str) else "waiting for placement"

    async def _place_pending(self) -> None:
        """Give GPU room to replicas of GPU-shared functions that wait for it."""
        for service in list(self._services.items.values()):
            deployment = record_of(service)
            share = gpu_share(deployment)
            if share is None or share.exclusive:
                continue
            name, namespace = deployment.service, deployment.namespace
            desired = self._desired(service)
            if self._placed(name, namespace) >= desired:
                continue
            placer = self._placer(leaving={(namespace, name)})
            wanted = self._plan(deployment, share, desired, placer, self._held(deployment))
            if sum(obj["spec"]["replicas"] for obj in wanted.values()) > self._placed(
                name, namespace
            ):
                log.info("placing pending replicas of %s.%s", name, namespace)
                await self._apply_deployments(deployment, wanted)

    def _on_node_event(self, event: str, node: dict[str, Any]) -> None:
        """Note a change in the GPUs a Node publishes (not its other changes)."""
        name = node["metadata"]["name"]
        gpus = [] if event == "DELETED" else node_gpus(node)
        if self._gpus_seen.get(name, []) != gpus:
            self._gpus_seen[name] = gpus
            self._gpus_changed.set()

    async def _place_when_gpus_change(self) -> None:
        """Give pending replicas the room of GPUs that appear, once the cluster is read and
        whenever the published GPUs change."""
        while True:
            await self._gpus_changed.wait()
            await asyncio.gather(*(i.synced.wait() for i in self._informers))
            self._gpus_changed.clear()
            async with self._lock:
                try:
                    await self._place_pending()
                except ProviderError as error:
                    log.warning("pending replicas not placed: %s", error)

    # internals: writes

    async def _validate(self, deployment: FunctionDeployment) -> GpuShare | None:
        """Refuse, before anything changes, a deployment that could not run; its GPU share."""
        namespace = deployment.namespace
        held = self._namespaces.items.get(("", namespace))
        if held is None or not _active(held):
            self._check_reachable()
            raise InvalidRequest(
                f"namespace {namespace} does not exist or is not labelled "
                f"{NAMESPACE_LABEL}=1; create it with POST /system/namespace/{namespace}"
            )
        deployment.min_replicas()
        share = gpu_share(deployment)
        if share is not None and not share.exclusive:
            Placer(self._devices(), where=SHARED_GPUS).check(share)
        missing = []
        for secret in deployment.secrets:
            try:
                await self._call(
                    f"Secret {namespace}/{secret}",
                    self._core.read_namespaced_secret(secret, namespace),
                )
            except NotFound:
                missing.append(secret)
        if missing:
            raise InvalidRequest(
                f"secret(s) {', '.join(missing)} not found in namespace {namespace}; "
                "create them first (faas-cli secret create)"
            )
        return share

    async def _replace_service(self, held: dict[str, Any], wanted: dict[str, Any]) -> None:
        """Replace a function's Service. Unconditionally, as every replace here is: the
        provider alone writes these objects' specs, one change at a time, while controllers
        write their status all the while."""
        meta = held["metadata"]
        wanted["spec"]["clusterIP"] = held["spec"].get("clusterIP")
        made = await self._write(
            f"Service {meta['namespace']}/{meta['name']}",
            self._core.replace_namespaced_service(meta["name"], meta["namespace"], wanted),
        )
        self._services.apply("MODIFIED", made)

    async def _apply_deployments(
        self,
        deployment: FunctionDeployment,
        wanted: dict[str, dict[str, Any]],
        retire_when_ready: bool = False,
    ) -> None:
        """Make the function's Deployments those of `wanted`: create, replace, delete; with
        `retire_when_ready` (a new GPU share, on new GPUs) those no longer wanted serve on
        until the wanted ones are ready."""
        namespace = deployment.namespace
        existing = set(self._deployments_of(deployment.service, namespace))
        for name, obj in wanted.items():
            what = f"Deployment {namespace}/{name}"
            if name in existing:
                made = await self._write(
                    what, self._apps.replace_namespaced_deployment(name, namespace, obj)
                )
                self._deployments.apply("MODIFIED", made)
            else:
                made = await self._write(
                    what, self._apps.create_namespaced_deployment(namespace, obj)
                )
                self._deployments.apply("ADDED", made)
        stale = sorted(existing - set(wanted))
        if retire_when_ready and stale:
            task = asyncio.create_task(self._retire(deployment, set(wanted), stale))
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)
            return
        await self._remove(namespace, [("Deployment", name) for name in stale])

    async def _retire(
        self, deployment: FunctionDeployment, wanted: set[str], stale: list[str]
    ) -> None:
        """Delete the `stale` Deployments once the `wanted` ones are ready (or after
        ROLLOUT_TIMEOUT_S), unless the function has changed again meanwhile."""
        namespace, name = deployment.namespace, deployment.service

        def ready() -> bool:
            for held in wanted:
                obj = self._deployments.items.get((namespace, held))
                if obj is None:
                    return True  # replaced meanwhile: the next change decides
                if obj.get("status", {}).get("availableReplicas", 0) < obj["spec"]["replicas"]:
                    return False
            return True

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ROLLOUT_TIMEOUT_S):
                while not ready():
                    await self._deployments.wait_changed(1.0)
        async with self._lock:
            if (namespace, name) not in self._services.items:
                return
            current = record_of(self._services.items[(namespace, name)])
            if current != deployment:
                return
            log.info("%s.%s: new replicas ready; removing %s", name, namespace, ", ".join(stale))
            with contextlib.suppress(ProviderError):
                await self._remove(namespace, [("Deployment", d) for d in stale])
            await self._place_pending()

    async def _remove(self, namespace: str, objects: list[tuple[str, str]]) -> None:
        """Delete `objects` (kind, name), last made first; those already gone are fine."""
        deletions = {
            "Deployment": self._apps.delete_namespaced_deployment,
            "Service": self._core.delete_namespaced_service,
            "ConfigMap": self._core.delete_namespaced_config_map,
        }
        informers = {"Deployment": self._deployments, "Service": self._services}
        for kind, name in reversed(objects):
            with contextlib.suppress(NotFound):
                await self._call(f"{kind} {namespace}/{name}", deletions[kind](name, namespace))
            informer = informers.get(kind)
            if informer is not None:
                informer.items.pop((namespace, name), None)

    async def _write(self, what: str, call: Awaitable[Any]) -> dict[str, Any]:
        """`_call` for a write, whose answer (the object as stored) comes back as a dict."""
        assert self._api is not None
        stored: dict[str, Any] = self._api.sanitize_for_serialization(await self._call(what, call))
        return stored

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """Await an API call; its refusal as the ProviderError that says what and why."""
        try:
            return await call
        except ApiException as error:
            reason = _reason(error)
            if error.status == 404:
                raise NotFound(f"{what} not found: {reason}") from None
            if error.status == 409:
                raise Conflict(
                    f"{what} exists already or was changed meanwhile: {reason}"
                ) from None
            if error.status in (400, 422):
                raise InvalidRequest(f"the Kubernetes API refused {what}: {reason}") from None
            if error.status == 403:
                raise ApiProblem(
                    f"the provider may not write {what}: {reason}; give its ServiceAccount the "
                    "rules of k8s/rbac.yaml"
                ) from None
            raise ApiProblem(
                f"the Kubernetes API failed on {what}: {error.status} {reason}"
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            reason = str(error) or type(error).__name__
            raise Unavailable(
                f"the Kubernetes API server does not answer ({what}): {reason}"
            ) from None


def record_of(service: dict[str, Any]) -> FunctionDeployment:
    """The deployment a function's Service keeps."""
    return FunctionDeployment.model_validate_json(
        service["metadata"]["annotations"][RECORD_ANNOTATION]
    )


def _active(namespace: dict[str, Any]) -> bool:
    """Whether a namespace is not being deleted."""
    return namespace.get("status", {}).get("phase") != "Terminating"


def _secret_body(secret: Secret, namespace: str) -> dict[str, Any]:
    return {
        "metadata": {"name": secret.name, "namespace": namespace, "labels": SECRET_LABELS},
        "type": "Opaque",
        "data": {secret.name: base64.b64encode(secret.payload()).decode()},
    }


def selector(labels: dict[str, str]) -> str:
    """A label selector that matches every one of `labels`."""
    return ",".join(f"{key}={value}" for key, value in labels.items())


def _reason(error: Exception) -> str:
    if isinstance(error, ApiException):
        try:
            return str(json.loads(error.body)["message"])
        except (TypeError, ValueError, KeyError):
            return str(error.reason)
    return str(error) or type(error).__name__


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
