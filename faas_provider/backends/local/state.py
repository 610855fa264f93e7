"""The local backend's state directory: the single source of truth that survives a restart.

`functions.json` holds every function's deployment, desired replica count and creation time,
and the namespaces; `secrets.json` (mode 0600) holds secret values; `profiles/NAMESPACE/NAME.json`
each profiled function's profile. Each is written atomically
(temporary file, fsync, rename), so a crash leaves either the old or the new file, never half.
A stored function this version cannot load (its spec written by one that accepted more) is
left out with one log line and written back as it was, unless a function of its name has been
deployed since: one bad entry never keeps the provider, or the others, from starting.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from faas_provider.models import DEFAULT_NAMESPACE, FunctionDeployment, rfc3339

log = logging.getLogger("fast_gshare.state")


@dataclass
class StoredFunction:
    """What is kept of a function: its spec, desired replicas and creation time."""

    deployment: FunctionDeployment
    replicas: int
    created_at: datetime


@dataclass
class StoredNamespace:
    """A namespace with its labels and annotations."""

    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class ProviderState:
    """Everything the local backend persists, keyed by (namespace, name)."""

    functions: dict[tuple[str, str], StoredFunction] = field(default_factory=dict)
    namespaces: dict[str, StoredNamespace] = field(
        default_factory=lambda: {DEFAULT_NAMESPACE: StoredNamespace()}
    )
    secrets: dict[tuple[str, str], bytes] = field(default_factory=dict)
    # stored functions that could not be loaded, kept as they were, by (namespace, name)
    unreadable: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


class StateDirInUse(Exception):
    """Another provider process holds the state directory."""


class StateStore:
    """Reads and writes a `ProviderState` in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._functions_file = directory / "functions.json"
        self._secrets_file = directory / "secrets.json"
        self._lock = asyncio.Lock()
        self._owner: int | None = None  # descriptor of the held lock file

    def claim(self) -> None:
        """Hold the directory for this process; StateDirInUse when another provider does."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            raise StateDirInUse(
                f"state directory {self.directory} is in use by another fast-gshare provider "
                f"(pid {holder}); stop it, or give this one another --state-dir"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        self._owner = descriptor

    def release(self) -> None:
        """Let the directory go (another provider may claim it)."""
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    def load(self) -> ProviderState:
        """The stored state, or an empty one when the directory is new."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = ProviderState()
        if self._functions_file.exists():
            document = json.loads(self._functions_file.read_text())
            for entry in document.get("functions", []):
                try:
                    stored = _stored_function(entry)
                except (ValidationError, KeyError, TypeError, ValueError) as error:
                    key = _entry_key(entry)
                    reason = " ".join(str(error).split())
                    log.error(
                        "stored function %s.%s cannot be loaded (%s); it is left out and kept "
                        "in %s as it was",
                        key[1],
                        key[0],
                        reason,
                        self._functions_file,
                    )
                    state.unreadable[key] = entry
                    continue
                key = (stored.deployment.namespace, stored.deployment.service)
                state.functions[key] = stored
            state.namespaces = {
                name: StoredNamespace(**spec)
                for name, spec in document.get("namespaces", {}).items()
            } or state.namespaces
        if self._secrets_file.exists():
            for entry in json.loads(self._secrets_file.read_text()):
                key = (entry["namespace"], entry["name"])
                state.secrets[key] = base64.b64decode(entry["value"])
        return state

    async def save(self, state: ProviderState) -> None:
        """Write functions and namespaces, then secrets, each atomically, off the event loop.

        The documents are built here, before the first await, so they are one consistent
        snapshot; the lock keeps two saves from finishing out of order.
        """
        functions: list[dict[str, Any]] = [
            {
                "deployment": stored.deployment.to_wire(),
                "replicas": stored.replicas,
                "createdAt": rfc3339(stored.created_at),
            }
            for stored in state.functions.values()
        ]
        # one deployed since under the name of an unreadable entry replaces it for good
        state.unreadable = {k: v for k, v in state.unreadable.items() if k not in state.functions}
        functions += state.unreadable.values()
        namespaces = {
            name: {"labels": ns.labels, "annotations": ns.annotations}
            for name, ns in state.namespaces.items()
        }
        secrets = [
            {"namespace": ns, "name": name, "value": base64.b64encode(value).decode()}
            for (ns, name), value in state.secrets.items()
        ]
        document = {"functions": functions, "namespaces": namespaces}
        async with self._lock:
            await asyncio.to_thread(self._write, self._functions_file, document)
            await asyncio.to_thread(self._write, self._secrets_file, secrets)

    def read_profile(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The stored profile of a function, as JSON, or None."""
        try:
            document: dict[str, Any] = json.loads(self._profile_file(name, namespace).read_text())
        except FileNotFoundError:
            return None
        return document

    async def save_profile(self, name: str, namespace: str, document: dict[str, Any]) -> None:
        """Write a function's profile atomically (replacing the one before)."""
        path = self._profile_file(name, namespace)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        async with self._lock:
            await asyncio.to_thread(self._write, path, document)

    def delete_profile(self, name: str, namespace: str) -> None:
        """Forget a function's profile, if it has one."""
        self._profile_file(name, namespace).unlink(missing_ok=True)

    def _profile_file(self, name: str, namespace: str) -> Path:
        return self.directory / "profiles" / namespace / f"{name}.json"

    def _write(self, path: Path, document: object) -> None:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(document, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _stored_function(entry: dict[str, Any]) -> StoredFunction:
    """A functions.json entry as a StoredFunction; the model's or a type's error when it is not
    one."""
    return StoredFunction(
        deployment=FunctionDeployment.model_validate(entry["deployment"]),
        replicas=int(entry["replicas"]),
        created_at=datetime.fromisoformat(entry["createdAt"]),
    )


def _entry_key(entry: Any) -> tuple[str, str]:
    """(namespace, name) of a functions.json entry, as far as it says."""
    deployment = entry.get("deployment") if isinstance(entry, dict) else None
    if not isinstance(deployment, dict):
        return DEFAULT_NAMESPACE, "?"
    namespace = deployment.get("namespace") or DEFAULT_NAMESPACE
    return str(namespace), str(deployment.get("service", "?"))
