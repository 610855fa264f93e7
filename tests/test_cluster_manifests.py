"""Everything in k8s/ and everything `fast-gshare render` prints, applied on a real API server
(`kubectl apply --server-side --dry-run=server`), and the RBAC of k8s/rbac.yaml held to what
each component does: the provider's ServiceAccount runs the contract, the node agent's
publishes and recycles, and neither may do more."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from faas_provider.api.app import create_app
from faas_provider.backends.factory import create_backend
from faas_provider.backends.kubernetes.connection import connect
from faas_provider.settings import Settings
from tests import kube
from tests.conftest import ECHO, a_profile, faas_cli_deploy, wait_available

REPO = Path(__file__).resolve().parents[1]
PLURALS = {
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Deployment": "deployments",
    "DaemonSet": "daemonsets",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
}


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def path_of(document: dict[str, Any]) -> str:
    """The REST collection a document is created in."""
    version, kind = document["apiVersion"], document["kind"]
    prefix = "/api/v1" if version == "v1" else f"/apis/{version}"
    namespace = document["metadata"].get("namespace")
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{PLURALS[kind]}"


async def apply(api: client.ApiClient, document: dict[str, Any], dry_run: bool) -> None:
    """Apply `document` server-side, as `kubectl apply --server-side` does (with `dry_run`, as
    with `--dry-run=server`); ApiException when the API server refuses it."""
    query = [("fieldManager", "fast-gshare-tests"), ("fieldValidation", "Strict")]
    if dry_run:
        query.append(("dryRun", "All"))
    await api.call_api(
        f"{path_of(document)}/{document['metadata']['name']}",
        "PATCH",
        query_params=query,
        body=document,
        header_params={"Content-Type": "application/apply-patch+yaml"},
        auth_settings=["BearerToken"],
        response_types_map={200: "object", 201: "object"},
    )


async def ensure_namespace(api: client.ApiClient, name: str) -> None:
    try:
        await client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    except ApiException as error:
        if error.status != 409:
            raise


async def test_every_manifest_of_k8s_and_of_render_is_accepted_by_the_api_server(
    kube_admin: client.ApiClient,
) -> None:
    await ensure_namespace(kube_admin, "openfaas")
    files = sorted((REPO / "k8s").glob("*.yaml"))
    render = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faas_provider.cli", "render", "-f", "stack.yml",
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    rendered = (await render.communicate())[0].decode()
    assert render.returncode == 0
    batches = [(path.name, documents(path.read_text())) for path in files]
    batches.append(("render -f stack.yml", documents(rendered)))
    applied = []
    for source, batch in batches:
        for document in batch:
            try:
                await apply(kube_admin, document, dry_run=True)
            except ApiException as error:
                pytest.fail(f"{source}: {document['kind']} refused: {error.body}")
            applied.append((source, document["kind"]))
    kinds = {kind for _, kind in applied}
    assert {"Deployment", "DaemonSet", "Service", "ClusterRole", "ConfigMap"} <= kinds
    assert any(source == "render -f stack.yml" for source, _ in applied)
    names = [n.metadata.name for n in (await client.CoreV1Api(kube_admin).list_namespace()).items]
    assert "openfaas" in names, "only the dry run was asked for: nothing else was made"


async def service_account_client(
    kube_admin: client.ApiClient, server: kube.ApiServer, account: str, tmp_path: Path
) -> Path:
    """A kubeconfig that authenticates as ServiceAccount openfaas/`account`."""
    request = await client.CoreV1Api(kube_admin).create_namespaced_service_account_token(
        account, "openfaas", {"spec": {"expirationSeconds": 3600}}
    )
    document = yaml.safe_load(server.kubeconfig.read_text())
    document["users"][0]["user"] = {"token": request.status.token}
    path = tmp_path / f"{account}.kubeconfig"
    path.write_text(yaml.safe_dump(document))
    return path


async def apply_rbac(kube_admin: client.ApiClient) -> None:
    await ensure_namespace(kube_admin, "openfaas")
    for document in documents((REPO / "k8s" / "rbac.yaml").read_text()):
        await apply(kube_admin, document, dry_run=False)


async def allowed(api: client.ApiClient, verb: str, resource: str, namespace: str = "") -> bool:
    """What a SelfSubjectAccessReview says the client may do."""
    group, _, plural = resource.rpartition("/")
    review = await client.AuthorizationV1Api(api).create_self_subject_access_review(
        {
            "spec": {
                "resourceAttributes": {
                    "verb": verb,
                    "group": group,
                    "resource": plural,
                    "namespace": namespace,
                }
            }
        }
    )
    return bool(review.status.allowed)


async def test_the_providers_service_account_runs_the_contract_and_may_do_no_more(
    aiohttp_client: Any,
    settings: Settings,
    tmp_path: Path,
    api_server: kube.ApiServer,
    kube_admin: client.ApiClient,
) -> None:
    await apply_rbac(kube_admin)
    kubeconfig = await service_account_client(
        kube_admin, api_server, "fast-gshare-provider", tmp_path
    )
    cluster = kube.on_cluster(settings, kubeconfig)
    async with kube.kubelet(kube_admin):
        provider: TestClient = await aiohttp_client(create_app(create_backend(cluster), cluster))
        try:
            secret = {"name": "s", "value": "v"}
            assert (await provider.post("/system/secrets", json=secret)).status == 201
            assert (await provider.put("/system/secrets", json=secret)).status == 202
            shared = {"fastgshare/gpu_sm_partition": "30"}
            assert (
                await faas_cli_deploy(provider, {**ECHO, "secrets": ["s"], "annotations": shared})
                == 202
            )
            await wait_available(provider, "echo")
            answer = await provider.post("/function/echo", data=b"as its SA")
            assert await answer.text() == "as its SA"
            scaled = await provider.post("/system/scale-function/echo", json={"replicas": 2})
            assert scaled.status == 202
            await wait_available(provider, "echo", 2)
            assert (await provider.get("/system/logs?name=echo")).status == 200
            profile = a_profile(f"echo.{kube.FUNCTION_NAMESPACE}")
            assert (await provider.put("/system/profiles/echo", json=profile)).status == 202
            assert (await provider.put("/system/profiles/echo", json=profile)).status == 202
            assert (await provider.get("/system/profiles/echo")).status == 200
            assert (await provider.post("/system/namespace/rbac-team")).status == 201
            deleted = await provider.delete("/system/functions", json={"functionName": "echo"})
            assert deleted.status == 202
            assert (await provider.delete("/system/secrets", json={"name": "s"})).status == 202
        finally:
            await provider.close()
    async with await connect(kubeconfig) as api:
        ns = kube.FUNCTION_NAMESPACE
        assert await allowed(api, "create", "apps/deployments", ns)
        assert await allowed(api, "watch", "discovery.k8s.io/endpointslices")
        assert not await allowed(api, "create", "/pods", ns), "Kubernetes makes the pods"
        assert not await allowed(api, "list", "/configmaps", ns)
        assert not await allowed(api, "patch", "/nodes"), "only the node agents write Nodes"
        assert not await allowed(api, "create", "rbac.authorization.k8s.io/clusterroles")


async def test_the_node_agents_service_account_may_publish_and_recycle_only(
    tmp_path: Path, api_server: kube.ApiServer, kube_admin: client.ApiClient
) -> None:
    await apply_rbac(kube_admin)
    kubeconfig = await service_account_client(kube_admin, api_server, "fast-gshare-node", tmp_path)
    async with await connect(kubeconfig) as api:
        assert await allowed(api, "patch", "/nodes")
        assert await allowed(api, "list", "/pods")
        assert await allowed(api, "delete", "/pods", kube.FUNCTION_NAMESPACE)
        assert not await allowed(api, "get", "/secrets", kube.FUNCTION_NAMESPACE)
        assert not await allowed(api, "create", "apps/deployments", kube.FUNCTION_NAMESPACE)
        assert not await allowed(api, "delete", "/nodes")
