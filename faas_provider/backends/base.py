"""The one seam between the HTTP contract and a backend: the `Backend` protocol.

The API layer speaks only to this protocol; the local backend (processes on this machine) and
the Kubernetes backend implement it. Its methods raise the errors of faas_provider/errors.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from prometheus_client.registry import Collector

from faas_provider.models import FunctionDeployment, FunctionStatus, LogMessage, Secret
from faas_provider.profile.model import Profile


@dataclass(frozen=True)
class LogQuery:
    """What GET /system/logs asked for."""

    name: str
    namespace: str
    instance: str | None = None
    tail: int | None = None  # the last `tail` stored lines; None: all of them
    since: datetime | None = None
    follow: bool = False


@dataclass(frozen=True)
class ReplicaCounts:
    """A function's replicas as the backend holds them now."""

    desired: int
    available: int  # ready to take requests
    pending: int  # wanted, but no GPU has room for them yet
    restarts: dict[str, int] = field(default_factory=dict)  # by reason, since the provider started
    pending_reason: str | None = None  # why the pending ones wait, while some do


class Backend(Protocol):
    """What a backend provides to the provider API. Every method may raise a ProviderError."""

    orchestration: str

    async def start(self) -> None:
        """Restore state and start what was running before."""

    async def close(self) -> None:
        """Stop everything the backend started (replicas keep their desired counts on disk)."""

    async def list_functions(self, namespace: str) -> list[FunctionStatus]:
        """Every function of `namespace`."""

    async def get_function(self, name: str, namespace: str) -> FunctionStatus:
        """One function's status; NotFound when unknown."""

    async def deploy(self, deployment: FunctionDeployment) -> None:
        """Create a function; Conflict when it exists, InvalidRequest when it cannot run."""

    async def update(self, deployment: FunctionDeployment) -> None:
        """Replace an existing function's spec; NotFound when unknown."""

    async def delete(self, name: str, namespace: str) -> None:
        """Remove a function and its replicas; NotFound when unknown."""

    async def scale(self, name: str, namespace: str, replicas: int) -> None:
        """Set the desired replica count; NotFound when unknown."""

    async def list_namespaces(self) -> list[str]:
        """Namespaces functions may be deployed to."""

    async def get_namespace(self, name: str) -> dict[str, object]:
        """A namespace with its labels and annotations; NotFound when unknown."""

    async def create_namespace(
        self, name: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> None:
        """Create a namespace; Conflict when it exists."""

    async def update_namespace(
        self, name: str, labels: dict[str, str], annotations: dict[str, str]
    ) -> None:
        """Replace a namespace's labels and annotations; NotFound when unknown."""

    async def delete_namespace(self, name: str) -> None:
        """Delete an empty namespace; NotFound when unknown, Conflict while functions use it."""

    async def list_secrets(self, namespace: str) -> list[Secret]:
        """Secret names of `namespace`, without values."""

    async def create_secret(self, secret: Secret) -> None:
        """Create a secret; Conflict when it exists."""

    async def update_secret(self, secret: Secret) -> None:
        """Replace a secret's value; NotFound when unknown."""

    async def delete_secret(self, name: str, namespace: str) -> None:
        """Delete a secret; NotFound when unknown."""

    def logs(self, query: LogQuery) -> AsyncIterator[LogMessage]:
        """Log lines of a function's replicas, then (with follow) new ones as they come."""

    async def endpoints(self, name: str, namespace: str) -> list[str]:
        """Base URLs of the ready replicas, waiting a while for one that is starting.

        NotFound when the function is unknown, Unavailable when no replica becomes ready.
        """

    async def get_profile(self, name: str, namespace: str) -> Profile:
        """The function's profile; NotFound when the function or its profile is unknown."""

    async def store_profile(self, name: str, namespace: str, profile: Profile) -> None:
        """Keep `profile` as the function's (replacing any); NotFound when it is unknown. A
        function's profile goes with it when it is deleted."""

    def replica_counts(self) -> dict[tuple[str, str], ReplicaCounts]:
        """Every function's replicas by (namespace, name), from what the backend holds: no
        I/O, so /metrics can ask at each scrape."""

    def metric_collectors(self) -> list[Collector]:
        """What the provider's /metrics serves of the backend beyond its replica counts (the
        local backend: its in-process node agent's)."""
