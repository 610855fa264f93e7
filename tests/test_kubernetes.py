"""The Kubernetes backend on a real API server (tests/kube.py): the objects it leaves there,
a deploy that fails halfway leaving nothing, a restart that finds everything again, placement
across GPUs, a lost API server, and the RBAC of k8s/ allowing what the backend does."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from faas_provider.api.app import create_app
from faas_provider.backends.factory import create_backend
from faas_provider.backends.kubernetes.informer import Informer
from faas_provider.settings import Settings
from tests import kube
from tests.conftest import ECHO, faas_cli_deploy, wait_available

NS = kube.FUNCTION_NAMESPACE
SHARED = {"fastgshare/gpu_sm_partition": "40", "fastgshare/gpu_mem": "2Gi"}
PENDING_INFO = "fast_gshare_function_pending_info{"


@contextlib.asynccontextmanager
async def provider_on(
    aiohttp_client: Any, settings: Settings, kubeconfig: Path
) -> AsyncIterator[TestClient]:
    """A provider server on the cluster of `kubeconfig`, closed (backend and all) on exit."""
    cluster = kube.on_cluster(settings, kubeconfig)
    provider = await aiohttp_client(create_app(create_backend(cluster), cluster))
    try:
        yield provider
    finally:
        await provider.close()


async def test_the_api_server_holds_the_function_as_faas_netes_would_make_it(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
        secret = {"name": "token", "rawValue": base64.b64encode(b"\x00raw").decode()}
        assert (await provider.post("/system/secrets", json=secret)).status == 201
        body = {
            **ECHO,
            "secrets": ["token"],
            "labels": {"team": "vision"},
            "annotations": {"topic": "jobs", **SHARED},
            "limits": {"memory": "512Mi"},
            "readOnlyRootFilesystem": True,
        }
        assert await faas_cli_deploy(provider, body) == 202
    core, apps = client.CoreV1Api(kube_admin), client.AppsV1Api(kube_admin)
    stored = await core.read_namespaced_secret("token", NS)
    assert stored.metadata.labels == {"app.kubernetes.io/managed-by": "openfaas"}
    assert base64.b64decode(stored.data["token"]) == b"\x00raw"
    service = await core.read_namespaced_service("echo", NS)
    assert service.spec.selector == {"faas_function": "echo"}
    assert service.spec.ports[0].target_port == "http"
    (deployment,) = (await apps.list_namespaced_deployment(NS)).items
    assert deployment.metadata.name.startswith("echo-")
    assert deployment.spec.selector.match_labels == {
        "faas_function": "echo",
        "fastgshare/gpu": kube.GPU_UUID,
    }
    pod = deployment.spec.template
    assert pod.metadata.labels["team"] == "vision"
    assert pod.metadata.annotations["prometheus.io.scrape"] == "false"
    (container,) = pod.spec.containers
    env = {e.name: e.value for e in container.env}
    assert env["fprocess"] == "cat" and env["NVIDIA_VISIBLE_DEVICES"] == kube.GPU_UUID
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert container.resources.limits == {"memory": "512Mi"}
    assert container.security_context.read_only_root_filesystem is True
    (gate,) = pod.spec.init_containers
    assert gate.restart_policy == "Always" and "--token-socket" in gate.args
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["secrets"].projected.sources[0].secret.name == "token"
    assert volumes["fast-gshare-mps"].host_path.path == "/run/fast-gshare/mps/5ee0e11d/pipe"
    affinity = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    assert affinity.node_selector_terms[0].match_fields[0].values == [kube.GPU_NODE]


async def test_a_deploy_the_api_refuses_halfway_leaves_nothing_behind(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
        # the Service is made first; the API server then refuses the Deployment's limit
        response = await provider.post(
            "/system/functions", json={**ECHO, "limits": {"memory": "lots"}}
        )
        text = await response.text()
        assert response.status == 400, text
        assert f"Deployment {NS}/echo" in text and "quantities must match" in text
        assert await (await provider.get("/system/functions")).json() == []
    core, apps = client.CoreV1Api(kube_admin), client.AppsV1Api(kube_admin)
    assert (await core.list_namespaced_service(NS)).items == []
    assert (await apps.list_namespaced_deployment(NS)).items == []


async def test_a_restarted_provider_finds_functions_counts_and_placement_again(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    async with kube.kubelet(kube_admin):
        async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
            body = {**ECHO, "annotations": SHARED, "labels": {"com.openfaas.scale.min": "2"}}
            assert await faas_cli_deploy(provider, body) == 202
            await wait_available(provider, "echo", 2)
            assert (
                await provider.post("/system/secrets", json={"name": "k", "value": "v"})
            ).status == 201
        async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as again:
            status = await wait_available(again, "echo", 2)
            assert status["replicas"] == 2 and status["annotations"]["fastgshare/gpu_mem"] == "2Gi"
            assert await (await again.get("/system/secrets")).json() == [
                {"name": "k", "namespace": NS}
            ]
            # 2 x 40 of 100 SM-time are held: a third replica of 40 must wait
            third = {**ECHO, "service": "third", "annotations": SHARED}
            assert await faas_cli_deploy(again, third) == 202
            await asyncio.sleep(0.3)
            status = await (await again.get("/system/function/third")).json()
            assert status["availableReplicas"] == 0
            refused = await again.post("/function/third", data=b"")
            assert refused.status == 503
            assert "has 20 of 100 SM-time left" in await refused.text()
            metrics = await (await again.get("/metrics")).text()
            for state, count in (("desired", 1), ("available", 0), ("pending", 1)):
                series = (
                    f'fast_gshare_function_replicas{{function_name="third.{NS}",state="{state}"}}'
                )
                assert f"{series} {count}.0" in metrics
            why = next(line for line in metrics.splitlines() if line.startswith(PENDING_INFO))
            assert f'function_name="third.{NS}"' in why and "has 20 of 100 SM-time left" in why


async def test_replicas_spread_to_a_second_gpu_node_when_the_first_is_full(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    core, apps = client.CoreV1Api(kube_admin), client.AppsV1Api(kube_admin)
    gpus = [{"index": 0, "uuid": "GPU-bbbbbbbb-2", "memory_bytes": kube.GPU_MEMORY}]
    await core.create_node(
        {"metadata": {"name": "gpu-node-2", "annotations": {"fastgshare/gpus": json.dumps(gpus)}}}
    )
    try:
        async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
            body = {**ECHO, "annotations": SHARED, "labels": {"com.openfaas.scale.min": "3"}}
            assert await faas_cli_deploy(provider, body) == 202
            held = {
                d.spec.selector.match_labels["fastgshare/gpu"]: d.spec.replicas
                for d in (await apps.list_namespaced_deployment(NS)).items
            }
            assert sorted(held.values()) == [1, 2], "packed: 2 of 40 on one GPU, then another"
            scaled = await provider.post("/system/scale-function/echo", json={"replicas": 2})
            assert scaled.status == 202
            held = {
                d.spec.selector.match_labels["fastgshare/gpu"]: d.spec.replicas
                for d in (await apps.list_namespaced_deployment(NS)).items
            }
            assert list(held.values()) == [2], "scaling down empties the emptier GPU"
    finally:
        await core.delete_node("gpu-node-2")


class Switch:
    """A TCP forwarder to the API server that can be cut (connections refused, open ones
    dropped) and joined again: an API server that goes away and comes back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.open = False
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        self.open = False
        for writer in list(self._links):
            writer.close()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._links |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links -= {writer, up_writer}


async def test_an_unreachable_api_server_is_503_and_the_provider_serves_when_it_returns(
    aiohttp_client: Any, settings: Settings, tmp_path: Path, api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:  # fmt: skip
    document = yaml.safe_load(api_server.kubeconfig.read_text())
    host, port = document["clusters"][0]["cluster"]["server"].removeprefix("https://").split(":")
    switch = Switch((host, int(port)))
    document["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{await switch.start()}"
    through = tmp_path / "kubeconfig"
    through.write_text(yaml.safe_dump(document))
    try:
        async with provider_on(aiohttp_client, settings, through) as provider:
            response = await provider.get("/system/functions")
            assert response.status == 503
            assert "Kubernetes API server does not answer" in await response.text()
            assert (await provider.post("/system/functions", json=ECHO)).status == 503
            assert (await provider.get("/healthz")).status == 200, "the provider itself is up"
            switch.open = True  # the API server is back
            for _ in range(100):
                if (await provider.get("/system/functions")).status == 200:
                    break
                await asyncio.sleep(0.1)
            assert await faas_cli_deploy(provider, ECHO) == 202
            switch.cut()  # and away again, watches and all
            await asyncio.sleep(0.5)
            gone = await provider.get("/system/function/echo")
            assert gone.status == 503, await gone.text()
            switch.open = True
            for _ in range(100):
                answer = await provider.get("/system/function/echo")
                if answer.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert answer.status == 200, "served again from a fresh copy"
    finally:
        await switch.close()


async def test_a_provider_the_api_server_refuses_says_which_rules_it_lacks(
    aiohttp_client: Any, settings: Settings, tmp_path: Path, api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:  # fmt: skip
    core = client.CoreV1Api(kube_admin)
    with contextlib.suppress(ApiException):
        await core.create_namespace({"metadata": {"name": "openfaas"}})
    with contextlib.suppress(ApiException):
        await core.create_namespaced_service_account("openfaas", {"metadata": {"name": "nobody"}})
    token = await core.create_namespaced_service_account_token("nobody", "openfaas", {"spec": {}})
    document = yaml.safe_load(api_server.kubeconfig.read_text())
    document["users"][0]["user"] = {"token": token.status.token}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(document))
    async with provider_on(aiohttp_client, settings, kubeconfig) as provider:
        response = await provider.get("/system/functions")
        text = await response.text()
        assert response.status == 503, text
        assert "refuses to list" in text and "403" in text and "k8s/rbac.yaml" in text


async def test_an_informer_resumes_its_watch_without_losing_events(
    api_server: kube.ApiServer, kube_admin: client.ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faas_provider.backends.kubernetes import informer as informer_module

    monkeypatch.setattr(informer_module, "WATCH_TIMEOUT_S", 1)  # the server ends each watch
    core = client.CoreV1Api(kube_admin)
    secrets = Informer("secrets", core.list_namespaced_secret, namespace=NS)
    task = asyncio.create_task(secrets.run())
    try:
        await asyncio.wait_for(secrets.synced.wait(), 5)
        for index in range(6):  # across several ends of the watch
            body = {"metadata": {"name": f"s{index}"}, "stringData": {"v": str(index)}}
            await core.create_namespaced_secret(NS, body)
            await asyncio.sleep(0.4)
        await core.delete_namespaced_secret("s0", NS)
        for _ in range(50):
            names = sorted(name for _, name in secrets.items)
            if names == [f"s{i}" for i in range(1, 6)]:
                break
            await asyncio.sleep(0.1)
        assert names == [f"s{i}" for i in range(1, 6)]
        assert secrets.problem is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_informer_lists_again_when_its_watch_is_too_old(
    api_server: kube.ApiServer, kube_admin: client.ApiClient
) -> None:
    core = client.CoreV1Api(kube_admin)
    gone_once: list[bool] = []

    async def list_secrets(*args: Any, **kwargs: Any) -> Any:
        """The real call, but the first watch is answered as a compacted history is: 410."""
        if kwargs.get("watch") and not gone_once:
            gone_once.append(True)
            await core.delete_namespaced_secret("early", NS)  # an event the watch would miss
            raise ApiException(status=410, reason="Expired: too old resource version")
        return await core.list_namespaced_secret(*args, **kwargs)

    await core.create_namespaced_secret(NS, {"metadata": {"name": "early"}})
    secrets = Informer("secrets", list_secrets, namespace=NS)
    task = asyncio.create_task(secrets.run())
    try:
        await asyncio.wait_for(secrets.synced.wait(), 5)
        await core.create_namespaced_secret(NS, {"metadata": {"name": "late"}})
        for _ in range(50):
            if sorted(name for _, name in secrets.items) == ["late"]:
                break
            await asyncio.sleep(0.1)
        assert gone_once, "the watch was refused once"
        assert sorted(name for _, name in secrets.items) == ["late"], "listed again, whole"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_new_gpu_share_keeps_the_old_replicas_until_the_new_are_ready(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    apps = client.AppsV1Api(kube_admin)
    gpus = [{"index": 0, "uuid": "GPU-cccccccc-3", "memory_bytes": kube.GPU_MEMORY}]
    core = client.CoreV1Api(kube_admin)
    await core.create_node(
        {"metadata": {"name": "gpu-node-3", "annotations": {"fastgshare/gpus": json.dumps(gpus)}}}
    )
    try:
        async with (
            kube.kubelet(kube_admin) as kubelet,
            provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider,
        ):
            big = {**ECHO, "annotations": {"fastgshare/gpu_sm_partition": "70"}}
            assert await faas_cli_deploy(provider, big) == 202
            await wait_available(provider, "echo")
            (old,) = [d.metadata.name for d in (await apps.list_namespaced_deployment(NS)).items]
            new = ({"echo-5ee0e11d", "echo-cccccccc"} - {old}).pop()
            kubelet.hold(new)  # the new share's pods will not be ready until released
            # 70 + 70 do not fit one GPU: the new share goes to the other one
            assert (
                await faas_cli_deploy(
                    provider, {**ECHO, "annotations": {"fastgshare/gpu_sm_partition": "71"}}
                )
                == 202
            )
            await asyncio.sleep(1.0)
            names = {d.metadata.name for d in (await apps.list_namespaced_deployment(NS)).items}
            assert names == {old, new}, "the old replica serves until the new one is ready"
            assert await (await provider.post("/function/echo", data=b"still")).text() == "still"
            kubelet.release(new)
            for _ in range(50):
                names = {d.metadata.name for d in (await apps.list_namespaced_deployment(NS)).items}
                if names == {new}:
                    break
                await asyncio.sleep(0.1)
            assert names == {new}
    finally:
        await core.delete_node("gpu-node-3")


async def test_why_replicas_do_not_run_is_in_the_functions_logs(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    core, apps = client.CoreV1Api(kube_admin), client.AppsV1Api(kube_admin)
    async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
        assert await faas_cli_deploy(provider, {**ECHO, "image": "acme/absent:1"}) == 202
        # what a kubelet and the ReplicaSet controller would report
        await core.create_namespaced_pod(
            NS,
            {
                "metadata": {"name": "echo-abc", "labels": {"faas_function": "echo"}},
                "spec": {"containers": [{"name": "echo", "image": "acme/absent:1"}]},
            },
        )
        waiting = {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}
        status = {"name": "echo", "image": "acme/absent:1", "imageID": "", "ready": False}
        await core.patch_namespaced_pod_status(
            "echo-abc",
            NS,
            {"status": {"containerStatuses": [{**status, "restartCount": 0, "state": waiting}]}},
        )
        now = "2026-12-02T00:00:00Z"
        failure = {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": 'pods "echo-x" is forbidden: exceeded quota: gpu-team',
            "lastUpdateTime": now,
            "lastTransitionTime": now,
        }
        await apps.patch_namespaced_deployment_status(
            "echo", NS, {"status": {"conditions": [failure]}}
        )
        for _ in range(50):
            logs = await (await provider.get("/system/logs?name=echo")).text()
            if "exceeded quota" in logs:
                break
            await asyncio.sleep(0.1)
        lines = [json.loads(line) for line in logs.splitlines()]
        texts = {line["instance"]: line["text"] for line in lines}
        assert "ImagePullBackOff: pull access denied" in texts["echo-abc"]
        assert texts["echo"].startswith("FailedCreate: ") and "exceeded quota" in texts["echo"]
        status_now = await (await provider.get("/system/function/echo")).json()
        assert status_now["availableReplicas"] == 0


async def test_a_gpu_node_that_joins_takes_the_replicas_that_waited_for_room(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_admin)
    shared = {**ECHO, "annotations": {"fastgshare/gpu_sm_partition": "60"}}
    async with (
        kube.kubelet(kube_admin),
        provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider,
    ):
        assert await faas_cli_deploy(provider, {**shared, "service": "first"}) == 202
        assert await faas_cli_deploy(provider, {**shared, "service": "second"}) == 202
        await wait_available(provider, "first")
        await asyncio.sleep(0.3)
        status = await (await provider.get("/system/function/second")).json()
        assert status["availableReplicas"] == 0, "60 + 60 of 100: the second waits"
        gpus = [{"index": 0, "uuid": "GPU-dddddddd-4", "memory_bytes": kube.GPU_MEMORY}]
        await core.create_node(
            {
                "metadata": {
                    "name": "gpu-node-4",
                    "annotations": {"fastgshare/gpus": json.dumps(gpus)},
                }
            }
        )
        status = await wait_available(provider, "second")
        assert status["replicas"] == 1


async def test_a_deployment_the_provider_did_not_make_is_left_alone(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    apps = client.AppsV1Api(kube_admin)
    labels = {"faas_function": "echo"}
    foreign = {
        "metadata": {"name": "echo-by-hand", "labels": labels},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {**labels, "by": "hand"}},
            "template": {
                "metadata": {"labels": {**labels, "by": "hand"}},
                "spec": {"containers": [{"name": "x", "image": "acme/x:1"}]},
            },
        },
    }
    await apps.create_namespaced_deployment(NS, foreign)
    async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
        assert await faas_cli_deploy(provider, ECHO) == 202
        status = await (await provider.get("/system/function/echo")).json()
        assert status["replicas"] == 1
        assert (
            await provider.delete("/system/functions", json={"functionName": "echo"})
        ).status == 202
    names = [d.metadata.name for d in (await apps.list_namespaced_deployment(NS)).items]
    assert names == ["echo-by-hand"]


async def test_logs_come_from_the_pods_with_tail_since_and_follow(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_admin)
    kubelet = kube.KubeletLogs(api_server)
    await kubelet.start()
    try:
        await kubelet.node(kube_admin, "log-node")

        async def running_pod(name: str) -> None:
            """A pod of the function on the log node, its container started."""
            body = {
                "metadata": {"name": name, "labels": {"faas_function": "echo"}},
                "spec": {
                    "nodeName": "log-node",
                    "containers": [{"name": "echo", "image": ECHO["image"]}],
                },
            }
            await core.create_namespaced_pod(NS, body)
            started = {"running": {"startedAt": "2026-12-02T00:00:00Z"}}
            status = {"name": "echo", "image": ECHO["image"], "imageID": "", "ready": True}
            await core.patch_namespaced_pod_status(
                name,
                NS,
                {
                    "status": {
                        "containerStatuses": [{**status, "restartCount": 0, "state": started}]
                    }
                },
            )

        for pod in ("echo-1", "echo-2"):
            await running_pod(pod)
        old = datetime.now(UTC) - timedelta(hours=2)
        kubelet.say("echo-1", "started long ago", old)
        kubelet.say("echo-1", "Forking - cat []")
        kubelet.say("echo-2", "Forking - cat []")
        async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
            assert await faas_cli_deploy(provider, ECHO) == 202

            async def lines(query: str) -> list[dict[str, Any]]:
                response = await provider.get(f"/system/logs?name=echo&{query}")
                assert response.status == 200, await response.text()
                assert response.headers["Content-Type"] == "application/x-ndjson"
                return [json.loads(line) for line in (await response.text()).splitlines()]

            every = await lines("")
            assert sorted((m["instance"], m["text"]) for m in every) == [
                ("echo-1", "Forking - cat []"),
                ("echo-1", "started long ago"),
                ("echo-2", "Forking - cat []"),
            ]
            first = next(m for m in every if m["text"] == "started long ago")
            assert datetime.fromisoformat(first["timestamp"]) == old, "the kubelet's own time"
            assert {m["name"] for m in every} == {"echo"}
            assert {m["instance"] for m in await lines("instance=echo-2")} == {"echo-2"}
            tail = await lines("tail=1")
            assert sorted(m["instance"] for m in tail) == ["echo-1", "echo-2"]
            since = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
            assert "started long ago" not in {m["text"] for m in await lines(f"since={since}")}
            follow = await provider.get("/system/logs?name=echo&follow=true")
            seen = [json.loads(await follow.content.readline())["text"] for _ in every]
            assert sorted(seen) == sorted(m["text"] for m in every), "what there was, first"
            kubelet.say("echo-2", "a new line")
            line = await asyncio.wait_for(follow.content.readline(), 10)
            assert json.loads(line)["text"] == "a new line", "then what comes, as it comes"
            await running_pod("echo-3")  # a replica that starts while someone follows
            await asyncio.sleep(0.5)
            kubelet.say("echo-3", "from a pod that came later")
            later = json.loads(await asyncio.wait_for(follow.content.readline(), 10))
            assert (later["instance"], later["text"]) == ("echo-3", "from a pod that came later")
            follow.close()
        assert {"timestamps": "true", "follow": "true"}.items() <= kubelet.asked[-1].items()
        assert {"tailLines": "1"}.items() <= kubelet.asked[3].items()
    finally:
        await kubelet.close()


async def test_a_service_of_someone_elses_by_the_functions_name_is_a_409_naming_it(
    aiohttp_client: Any,
    settings: Settings,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    core, apps = client.CoreV1Api(kube_admin), client.AppsV1Api(kube_admin)
    theirs = {"metadata": {"name": "echo"}, "spec": {"ports": [{"port": 80}]}}
    await core.create_namespaced_service(NS, theirs)
    async with provider_on(aiohttp_client, settings, api_server.kubeconfig) as provider:
        response = await provider.post("/system/functions", json=ECHO)
        text = await response.text()
        assert response.status == 409, text
        assert f"Service {NS}/echo" in text and "already exists" in text
        assert await (await provider.get("/system/functions")).json() == []
    assert (await apps.list_namespaced_deployment(NS)).items == []
    kept = await core.read_namespaced_service("echo", NS)
    assert kept.spec.ports[0].port == 80, "theirs is left as it was"
