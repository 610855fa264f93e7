"""The local backend's settings: where state and handlers live, the quota window, the preload."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

from faas_provider.backends.local.forkserver import DEFAULT_PRELOAD


def default_state_dir() -> Path:
    """`$XDG_DATA_HOME/fast-gshare`, else `~/.local/share/fast-gshare`."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "fast-gshare"


class LocalSettings(BaseModel):
    """How the local backend runs functions on this machine."""

    state_dir: Path = Field(default_factory=default_state_dir)
    functions_dir: Path = Path("functions")
    quota_window_s: float = Field(default=0.1, gt=0, le=10)
    # imported once by the fork server that starts the replicas (forkserver.py)
    preload: list[str] = Field(default_factory=lambda: list(DEFAULT_PRELOAD))
