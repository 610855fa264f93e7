"""The local backend (the embedded default): each replica is a runtime process on this machine.

State (functions, desired replica counts, namespaces, secrets) lives in the state directory and
is restored on start. A function's secrets are written, mode 0600, to its own directory
`<state>/mounts/<namespace>/<name>/secrets/`, which each replica sees at /var/openfaas/secrets
where the machine allows (`secret_view`), and else at `$secret_mount_path` only.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.registry import Collector

from faas_provider.backends.base import LogQuery, ReplicaCounts
from faas_provider.backends.local.forkserver import DEFAULT_PRELOAD, ForkServer
from faas_provider.backends.local.launch import launch_spec, on_gpu, python_environment
from faas_provider.backends.local.logs import LogStore
from faas_provider.backends.local.replica import (
    HEALTH_TIMEOUT_S,
    WITHDRAW_S,
    ChildProcess,
    Replica,
    exec_process,
)
from faas_provider.backends.local.secret_view import (
    SECRETS_PATH,
    SecretProbe,
    SecretView,
    probe_secret_view,
)
from faas_provider.backends.local.state import (
    StateStore,
    StoredFunction,
    StoredNamespace,
)
from faas_provider.errors import Conflict, InvalidRequest, NotFound, Unavailable
from faas_provider.gpu.discovery import GpuDevice, discover_gpus
from faas_provider.gpu.mps import ServerLoss
from faas_provider.gpu.placement import Placer
from faas_provider.gpu.share import GpuShare, gpu_share
from faas_provider.metrics import PlacementCollector
from faas_provider.models import (
    FunctionDeployment,
    FunctionStatus,
    FunctionUsage,
    LogMessage,
    Secret,
    check_namespace_deletion,
    namespace_or_default,
    utcnow,
)
from faas_provider.node.agent import NodeAgent
from faas_provider.node.metrics import NodeCollector
from faas_provider.profile.model import Profile
from faas_provider.upstream import UpstreamPool

log = logging.getLogger("fast_gshare.local")

ROLLOUT_TIMEOUT_S = 120.0


@dataclass
class LocalFunction:
    """A deployed function and the replicas that serve it."""

    stored: StoredFunction
    share: GpuShare | None = None
    replicas: list[Replica] = field(default_factory=list)
    retiring: list[Replica] = field(default_factory=list)
    pending: int = 0  # wanted replicas that no GPU has room for yet
    pending_reason: str | None = None  # why they wait, while they do
    next_index: int = 0
    rollout: asyncio.Task[None] | None = None
    restarts: Counter[str] = field(default_factory=Counter)  # of replicas stopped since
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds, re-checking whenever a replica's readiness changes."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return False
        return True

    @property
    def deployment(self) -> FunctionDeployment:
        return self.stored.deployment

    def ready(self) -> list[Replica]:
        """Replicas that take requests now: the current set, else those being replaced."""
        return [r for r in self.replicas if r.ready] or [r for r in self.retiring if r.ready]


class LocalBackend:
    """Runs functions as local processes; implements `faas_provider.backends.base.Backend`."""

    orchestration = "local"

    def __init__(
        self,
        state_dir: Path,
        functions_root: Path,
        startup_wait_s: float = 30.0,
        node: NodeAgent | None = None,
        probe_secrets: SecretProbe = probe_secret_view,
        preload: Sequence[str] = DEFAULT_PRELOAD,
    ) -> None:
        """`node` runs this machine's GPU services, in-process; `probe_secrets` says how
        replicas may see their secrets at /var/openfaas/secrets on this machine, or why they
        cannot (then at `$secret_mount_path` only); `preload` names the modules the fork
        server imports once for every replica (forkserver.py)."""
        state_dir = state_dir.absolute()  # replicas run elsewhere and mount from it
        self._node = node or NodeAgent(discover_gpus())
        self._node.on_lost = self._recycle_gpu
        self._placer = Placer(self._node.devices)
        self._store = StateStore(state_dir)
        self._state_dir = state_dir
        self._functions_root = functions_root
        self._startup_wait_s = startup_wait_s
        self._logs = LogStore()
        self._functions: dict[tuple[str, str], LocalFunction] = {}
        self._state = self._store.load()
        self._http = UpstreamPool(connect_timeout_s=HEALTH_TIMEOUT_S)  # replica health checks
        self._background: set[asyncio.Task[None]] = set()
        self._probe_secrets = probe_secrets
        self._secret_view: SecretView | None = None
        self._preload = list(preload)
        self._forks: ForkServer | None = None

    async def start(self) -> None:
        """Claim the state directory and start every stored function at its replica count."""
        self._store.claim()
        log.info(
            "local backend: state in %s, handlers under %s", self._state_dir, self._functions_root
        )
        await self._node.start()
        self._forks = await self._start_fork_server()
        view = (
            await self._probe_secrets(self._state_dir, self._forks)
            if self._forks is not None
            else "the fork server, which makes the namespaces, does not run"
        )
        if isinstance(view, str):
            log.warning(
                "replicas read their secrets at $secret_mount_path only, not at %s: %s",
                SECRETS_PATH,
                view,
            )
        else:
            self._secret_view = view
            log.info("each replica sees its own function's secrets at %s", SECRETS_PATH)
        for key, stored in self._state.functions.items():
            function = LocalFunction(stored=stored, share=gpu_share(stored.deployment))
            self._functions[key] = function
            self._write_secrets(function.deployment)
            self._reconcile(function)
        if self._functions:
            log.info("restored %d function(s) from %s", len(self._functions), self._state_dir)

    async def close(self) -> None:
        """Stop all replicas, those that a scale-down or a rollout is stopping too, before the
        fork server they came from; desired counts stay on disk for the next start."""
        functions = list(self._functions.values())
        self._functions.clear()  # the room that the stops free starts no pending replica
        for function in functions:
            if function.rollout is not None:
                function.rollout.cancel()
        replicas = [r for function in functions for r in function.replicas + function.retiring]
        await asyncio.gather(*(replica.stop() for replica in replicas))
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._forks is not None:
            await self._forks.close()
        await self._node.close()
        await self._http.close()
        self._store.release()

    # functions

    async def list_functions(self, namespace: str) -> list[FunctionStatus]:
        return [
            self._status(function)
            for (ns, _), function in sorted(self._functions.items())
            if ns == namespace
        ]

    async def get_function(self, name: str, namespace: str) -> FunctionStatus:
        return self._status(self._function(name, namespace))

    async def deploy(self, deployment: FunctionDeployment) -> None:
        key = (deployment.namespace, deployment.service)
        if key in self._functions:
            raise Conflict(
                f"function {deployment.service} exists in namespace {deployment.namespace}; "
                "update it with PUT /system/functions"
            )
        share = self._validate(deployment)
        replicas = deployment.min_replicas()
        stored = StoredFunction(deployment=deployment, replicas=replicas, created_at=utcnow())
        function = LocalFunction(stored=stored, share=share)
        self._functions[key] = function
        self._state.functions[key] = stored
        await self._store.save(self._state)
        self._write_secrets(deployment)
        self._reconcile(function)
        log.info(
            "deployed %s.%s (%d replica(s))", deployment.service, deployment.namespace, replicas
        )

    async def update(self, deployment: FunctionDeployment) -> None:
        function = self._function(deployment.service, deployment.namespace)
        share = self._validate(deployment)
        restart = deployment.runtime_digest() != function.deployment.runtime_digest()
        function.stored.deployment = deployment
        function.share = share
        await self._store.save(self._state)
        self._write_secrets(deployment)
        if restart:
            self._roll(function)
        log.info(
            "updated %s.%s%s",
            deployment.service,
            deployment.namespace,
            "; replacing its replicas" if restart else "",
        )

    async def delete(self, name: str, namespace: str) -> None:
        function = self._function(name, namespace)
        del self._functions[(namespace, name)]
        del self._state.functions[(namespace, name)]
        await self._store.save(self._state)
        if function.rollout is not None:
            function.rollout.cancel()
        function.pending = 0
        replicas = function.replicas + function.retiring
        await asyncio.gather(*(self._stop_replica(function, r) for r in replicas))
        shutil.rmtree(self._mount_dir(name, namespace), ignore_errors=True)
        self._store.delete_profile(name, namespace)
        self._logs.forget(name, namespace)
        log.info("deleted %s.%s", name, namespace)

    async def get_profile(self, name: str, namespace: str) -> Profile:
        self._function(name, namespace)
        document = self._store.read_profile(name, namespace)
        if document is None:
            raise NotFound(f"function {name}.{namespace} has no profile: run fast-gshare profile")
        return Profile.model_validate(document)

    async def store_profile(self, name: str, namespace: str, profile: Profile) -> None:
        self._function(name, namespace)
        await self._store.save_profile(name, namespace, profile.model_dump(mode="json"))
        log.info(
            "stored the profile of %s.%s (%d settings, %s)",
            name,
            namespace,
            len(profile.measurements),
            profile.gpu_model,
        )

    async def scale(self, name: str, namespace: str, replicas: int) -> None:
        function = self._function(name, namespace)
        if function.stored.replicas == replicas:
            return
        log.info("scaling %s.%s from %d to %d", name, namespace, function.stored.replicas, replicas)
        function.stored.replicas = replicas
        await self._store.save(self._state)
        self._reconcile(function)

    async def endpoints(self, name: str, namespace: str) -> list[str]:
        function = self._function(name, namespace)
        ready = function.ready() or await self._wait_ready(function)
        return [replica.url for replica in ready]

    def metric_collectors(self) -> list[Collector]:
        return [NodeCollector(self._node), PlacementCollector(lambda: self._placer)]

    def replica_counts(self) -> dict[tuple[str, str], ReplicaCounts]:
        counts = {}
        for key, function in self._functions.items():
            restarts = function.restarts.copy()
            for replica in function.replicas + function.retiring:
                restarts.update(replica.restarts)
            ready = len(function.ready())
            counts[key] = ReplicaCounts(
                function.stored.replicas,
                ready,
                function.pending,
                dict(restarts),
                function.pending_reason if function.pending else None,
            )
        return counts

    # namespaces

    async def list_namespaces(self) -> list[str]:
        return sorted(self._state.namespaces)

    async def get_namespace(self, name: str) -> dict[str, object]:
        namespace = self._namespace(name)
        return {"name": name, "labels": namespace.labels, "annotations": namespace.annotations}

    async def create_namespace(
        self, name: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> None:
        if name in self._state.namespaces:
            raise Conflict(f"namespace {name} exists")
        self._state.namespaces[name] = StoredNamespace(labels, annotations)
        await self._store.save(self._state)

    async def update_namespace(
        self, name: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> None:
        self._namespace(name)
        self._state.namespaces[name] = StoredNamespace(labels, annotations)
        await self._store.save(self._state)

    async def delete_namespace(self, name: str) -> None:
        self._namespace(name)
        check_namespace_deletion(name, any(ns == name for ns, _ in self._functions))
        del self._state.namespaces[name]
        for key in [key for key in self._state.secrets if key[0] == name]:
            del self._state.secrets[key]
        await self._store.save(self._state)

    # secrets

    async def list_secrets(self, namespace: str) -> list[Secret]:
        self._namespace(namespace)
        return [
            Secret(name=name, namespace=ns)
            for ns, name in sorted(self._state.secrets)
            if ns == namespace
        ]

    async def create_secret(self, secret: Secret) -> None:
        key = self._secret_key(secret)
        if key in self._state.secrets:
            raise Conflict(f"secret {secret.name} exists in namespace {key[0]}")
        await self._put_secret(key, secret.payload())

    async def update_secret(self, secret: Secret) -> None:
        key = self._secret_key(secret)
        if key not in self._state.secrets:
            raise NotFound(f"secret {secret.name} not found in namespace {key[0]}")
        await self._put_secret(key, secret.payload())

    async def delete_secret(self, name: str, namespace: str) -> None:
        if (namespace, name) not in self._state.secrets:
            raise NotFound(f"secret {name} not found in namespace {namespace}")
        del self._state.secrets[(namespace, name)]
        await self._store.save(self._state)
        self._refresh_secret_files(namespace, name)

    # logs

    async def logs(self, query: LogQuery) -> AsyncIterator[LogMessage]:
        self._function(query.name, query.namespace)
        async for message in self._logs.read(query):
            yield message

    # internals

    def _function(self, name: str, namespace: str) -> LocalFunction:
        function = self._functions.get((namespace, name))
        if function is None:
            raise NotFound(f"function {name} not found in namespace {namespace}")
        return function

    def _namespace(self, name: str) -> StoredNamespace:
        namespace = self._state.namespaces.get(name)
        if namespace is None:
            raise NotFound(f"namespace {name} not found")
        return namespace

    def _validate(self, deployment: FunctionDeployment) -> GpuShare | None:
        """Refuse, before anything changes, a deployment that could not run; its GPU share."""
        namespace = deployment.namespace
        if namespace not in self._state.namespaces:
            raise InvalidRequest(
                f"namespace {namespace} does not exist; create it with "
                f"POST /system/namespace/{namespace}"
            )
        missing = [s for s in deployment.secrets if (namespace, s) not in self._state.secrets]
        if missing:
            raise InvalidRequest(
                f"secret(s) {', '.join(missing)} not found in namespace {namespace}; "
                "create them first (faas-cli secret create)"
            )
        deployment.min_replicas()
        share = gpu_share(deployment)
        if share is not None:
            self._placer.check(share)
        launch_spec(deployment, self._functions_root, Path(), Path())
        return share

    def _status(self, function: LocalFunction) -> FunctionStatus:
        deployment = function.deployment
        memory = sum(r.memory_bytes() for r in function.replicas + function.retiring)
        return deployment.status(
            function.stored.replicas,
            len(function.ready()),
            function.stored.created_at,
            FunctionUsage(totalMemoryBytes=memory) if memory else None,
        )

    def _new_replica(self, function: LocalFunction) -> Replica | None:
        """Start a replica; None when it needs a GPU and none has room now (it is pending)."""
        deployment = function.deployment
        mount = self._mount_dir(deployment.service, deployment.namespace)
        spec = launch_spec(deployment, self._functions_root, mount / "secrets", mount)
        if self._secret_view is not None:
            spec = self._secret_view.apply(spec, mount / "secrets")
        instance = f"{deployment.service}-{function.next_index}"
        if function.share is not None:
            key = _placement_key(deployment, instance)
            device = self._placer.place(key, function.share)
            if isinstance(device, str):
                self._report_pending(function, instance, device)
                return None
            log.info("replica %s placed on GPU %d (%s)", key, device.index, device.uuid)
            where = f"{deployment.service}.{deployment.namespace}"
            spec = on_gpu(spec, device, function.share, self._node, key, where)
        function.next_index += 1
        replica = Replica(
            instance,
            spec,
            self._http,
            self._start_process,
            lambda inst, text: self._logs.append(
                deployment.service, deployment.namespace, inst, text
            ),
            function.changed.set,
        )
        replica.start()
        return replica

    async def _start_fork_server(self) -> ForkServer | None:
        """The fork server replicas start from, or None (one log line why) to exec each."""
        if not sys.platform.startswith("linux"):
            log.info("replicas are exec'd, each importing its libraries: no fork server off Linux")
            return None
        forks = ForkServer(python_environment(), self._preload)
        try:
            await forks.start()
        except OSError as error:
            await forks.close()
            log.warning("replicas are exec'd, each importing its libraries: %s", error)
            return None
        return forks

    async def _start_process(
        self, argv: list[str], env: dict[str, str], cwd: Path, view: dict[str, Any] | None
    ) -> ChildProcess:
        """Start one of a replica's processes: forked by the fork server when it runs."""
        if self._forks is not None:
            return await self._forks.spawn(argv, env, cwd, view)
        return await exec_process(argv, env, cwd, view)

    def _report_pending(self, function: LocalFunction, instance: str, reason: str) -> None:
        """Say why a replica waits for GPU room, in the provider's log and the function's own
        log stream (what `faas-cli logs` shows), once per new reason."""
        if reason == function.pending_reason:
            return
        function.pending_reason = reason
        deployment = function.deployment
        where = f"{deployment.service}.{deployment.namespace}"
        log.info("a replica of %s is pending: %s", where, reason)
        self._logs.append(deployment.service, deployment.namespace, instance, f"pending: {reason}")

    def _reconcile(self, function: LocalFunction) -> None:
        """Start, stop or mark pending replicas until the current set has the desired count."""
        desired = function.stored.replicas
        function.pending = min(function.pending, max(0, desired - len(function.replicas)))
        surplus = function.replicas[desired:]
        del function.replicas[desired:]
        for replica in surplus:
            self._in_background(self._stop_replica(function, replica))
        while len(function.replicas) + function.pending < desired:
            replica = self._new_replica(function)
            if replica is None:
                function.pending += 1
            else:
                function.replicas.append(replica)
        if not function.pending:
            function.pending_reason = None

    async def _stop_replica(self, function: LocalFunction, replica: Replica) -> None:
        """Withdraw a replica from service, stop it for good once no caller can still be sent
        to it, free its GPU room and start what was waiting for it."""
        await replica.stop(WITHDRAW_S)
        function.restarts.update(replica.restarts)
        # by key, not by the function's current share: an update may have dropped the GPU
        if self._placer.release(_placement_key(function.deployment, replica.instance)):
            self._place_pending()

    async def _recycle_gpu(self, device: GpuDevice, loss: ServerLoss) -> None:
        """Restart every replica on `device` (its MPS clients lost their server); other GPUs
        go on."""
        victims = [
            replica
            for function in self._functions.values()
            for replica in function.replicas + function.retiring
            if self._placer.device_of(_placement_key(function.deployment, replica.instance))
            == device
        ]
        log.warning(
            "MPS clients of GPU %d lost their server (%s); recycling %d replica(s)%s",
            device.index,
            loss,
            len(victims),
            f": {', '.join(replica.instance for replica in victims)}" if victims else "",
        )
        await asyncio.gather(*(replica.recycle() for replica in victims))

    def _place_pending(self) -> None:
        """Give freed GPU room to pending replicas, oldest function first."""
        for function in self._functions.values():
            while function.pending:
                replica = self._new_replica(function)
                if replica is None:
                    break
                function.pending -= 1
                function.replicas.append(replica)
            if not function.pending:
                function.pending_reason = None

    def _roll(self, function: LocalFunction) -> None:
        """Replace every replica with one of the new spec; old ones serve until new are ready."""
        if function.rollout is not None:
            function.rollout.cancel()
        function.retiring += function.replicas
        function.replicas = []
        self._reconcile(function)
        function.rollout = self._in_background(self._finish_rollout(function))

    def _in_background(self, work: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """Run `work` as a task the backend owns and waits for on close."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _finish_rollout(self, function: LocalFunction) -> None:
        """Retire the old replicas once the new ones are ready, or at once when new ones wait
        for GPU room that only the old ones can give back."""
        await function.wait_until(
            lambda: function.pending > 0 or all(r.ready for r in function.replicas),
            ROLLOUT_TIMEOUT_S,
        )
        retiring, function.retiring = function.retiring, []
        for replica in retiring:  # owned by the backend: a new rollout does not cut them short
            self._in_background(self._stop_replica(function, replica))

    async def _wait_ready(self, function: LocalFunction) -> list[Replica]:
        deployment = function.deployment
        where = f"{deployment.service}.{deployment.namespace}"
        if function.stored.replicas == 0:
            raise Unavailable(
                f"function {where} is scaled to zero: scale it up, or call it through the "
                "gateway with scale_from_zero=true"
            )
        if await function.wait_until(
            lambda: bool(function.ready()) or function.stored.replicas == 0, self._startup_wait_s
        ) and (ready := function.ready()):
            return ready
        if function.pending and function.pending_reason:
            raise Unavailable(
                f"no replica of function {where} is ready: {function.pending} pending, "
                f"{function.pending_reason}"
            )
        raise Unavailable(f"no replica of function {where} is ready")

    def _mount_dir(self, name: str, namespace: str) -> Path:
        return self._state_dir / "mounts" / namespace / name

    def _secret_key(self, secret: Secret) -> tuple[str, str]:
        namespace = namespace_or_default(secret.namespace)
        self._namespace(namespace)
        return namespace, secret.name

    async def _put_secret(self, key: tuple[str, str], value: bytes) -> None:
        self._state.secrets[key] = value
        await self._store.save(self._state)
        self._refresh_secret_files(*key)

    def _refresh_secret_files(self, namespace: str, secret: str) -> None:
        for (ns, _), function in self._functions.items():
            if ns == namespace and secret in function.deployment.secrets:
                self._write_secrets(function.deployment)

    def _write_secrets(self, deployment: FunctionDeployment) -> None:
        """Make the function's secrets directory hold exactly its secrets, each mode 0600."""
        directory = self._mount_dir(deployment.service, deployment.namespace) / "secrets"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        wanted = set(deployment.secrets)
        for existing in directory.iterdir():
            if existing.name not in wanted:
                existing.unlink()
        for name in wanted:
            value = self._state.secrets.get((deployment.namespace, name))
            path = directory / name
            if value is None:
                path.unlink(missing_ok=True)
                continue
            path.touch(mode=0o600, exist_ok=True)
            path.chmod(0o600)
            path.write_bytes(value)


def _placement_key(deployment: FunctionDeployment, instance: str) -> str:
    return f"{deployment.namespace}/{instance}"
