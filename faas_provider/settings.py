"""Provider settings: one model, read once from flags and environment, passed down explicitly.

The provider API's own settings, the name of the backend, and a section per backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from faas_provider.backends.kubernetes.settings import KubernetesSettings
from faas_provider.backends.local.settings import LocalSettings

BackendName = Literal["local", "kubernetes"]


class Settings(BaseModel):
    """How the provider runs. Environment names follow OpenFaaS where it has one."""

    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    backend: BackendName = "local"
    local: LocalSettings = Field(default_factory=LocalSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    basic_auth: bool = False
    secret_mount_path: Path = Path("/var/openfaas/secrets")
    upstream_timeout_s: float = Field(default=300.0, gt=0)
    startup_wait_s: float = Field(default=30.0, ge=0)
    workers: int = Field(default=1, ge=1, le=64)
    autoscale_tick_s: float | None = Field(default=2.0, gt=0)  # None: no autoscaler
    # Request bodies past these get 413 before they are read whole: /system/* carries JSON
    # (a deployment, a secret of up to Kubernetes' 1 MiB in base64), /function/* whatever a
    # function takes (images for inference).
    max_system_body: int = Field(default=2 * 1024**2, gt=0)
    max_function_body: int = Field(default=64 * 1024**2, gt=0)


def read_basic_auth(secret_mount_path: Path) -> tuple[str, str]:
    """User and password from `basic-auth-user` / `basic-auth-password`, trimmed (faas-provider)."""
    try:
        user = (secret_mount_path / "basic-auth-user").read_text().strip()
        password = (secret_mount_path / "basic-auth-password").read_text().strip()
    except OSError as error:
        raise SystemExit(
            f"basic auth is on but its credentials cannot be read: {error}; put basic-auth-user "
            f"and basic-auth-password in {secret_mount_path} or set secret_mount_path"
        ) from error
    return user, password
