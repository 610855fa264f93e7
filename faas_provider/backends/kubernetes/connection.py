"""How the provider and the node agent reach the Kubernetes API server."""

from __future__ import annotations

from pathlib import Path

from kubernetes_asyncio import client, config


async def connect(kubeconfig: Path | None) -> client.ApiClient:
    """An API client: of `kubeconfig`, else of the pod's ServiceAccount when in a cluster, else
    of the default kubeconfig ($KUBECONFIG, ~/.kube/config)."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        await config.load_kube_config(str(kubeconfig), client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            await config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)
