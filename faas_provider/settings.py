"""Provider settings: one model, read once from flags and environment, passed down explicitly."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

from faas_provider.backends.local.forkserver import DEFAULT_PRELOAD


def default_state_dir() -> Path:
    """`$XDG_DATA_HOME/fast-gshare`, else `~/.local/share/fast-gshare`."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "fast-gshare"


class Settings(BaseModel):
    """How the provider runs. Environment names follow OpenFaaS where it has one."""

    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    state_dir: Path = Field(default_factory=default_state_dir)
    functions_dir: Path = Path("functions")
    basic_auth: bool = False
    secret_mount_path: Path = Path("/var/openfaas/secrets")
    upstream_timeout_s: float = Field(default=300.0, gt=0)
    startup_wait_s: float = Field(default=30.0, ge=0)
    workers: int = Field(default=1, ge=1, le=64)
    quota_window_s: float = Field(default=0.1, gt=0, le=10)
    # Request bodies past these get 413 before they are read whole: /system/* carries JSON
    # (a deployment, a secret of up to Kubernetes' 1 MiB in base64), /function/* whatever a
    # function takes (images for inference).
    max_system_body: int = Field(default=2 * 1024**2, gt=0)
    max_function_body: int = Field(default=64 * 1024**2, gt=0)
    # imported once by the fork server that starts the replicas (backends/local/forkserver.py)
    preload: list[str] = Field(default_factory=lambda: list(DEFAULT_PRELOAD))


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
