"""The Kubernetes backend's settings: how to reach the API server, and what pods are made of."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from faas_provider.backends.kubernetes.manifests import GATE_IMAGE


class KubernetesSettings(BaseModel):
    """How the Kubernetes backend reaches its cluster and renders function pods."""

    kubeconfig: Path | None = None  # None: in the cluster, its ServiceAccount; else $KUBECONFIG
    gate_image: str = GATE_IMAGE
    node_run_dir: str = "/run/fast-gshare"  # where the node agents keep what pods mount
