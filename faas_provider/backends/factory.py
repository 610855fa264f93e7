"""The backend `fast-gshare up --backend NAME` runs on, built from its section of the settings."""

from __future__ import annotations

from faas_provider.backends.base import Backend
from faas_provider.settings import Settings


def create_backend(settings: Settings) -> Backend:
    """The backend `settings.backend` names, configured from its settings section."""
    if settings.backend == "kubernetes":
        from faas_provider.backends.kubernetes.backend import KubernetesBackend

        return KubernetesBackend(settings.kubernetes, settings.startup_wait_s)
    from faas_provider.backends.local.backend import LocalBackend
    from faas_provider.gpu.discovery import discover_gpus
    from faas_provider.node.agent import NodeAgent

    local = settings.local
    node = NodeAgent(discover_gpus(), window_s=local.quota_window_s)
    return LocalBackend(
        local.state_dir,
        local.functions_dir,
        settings.startup_wait_s,
        node=node,
        preload=local.preload,
    )
