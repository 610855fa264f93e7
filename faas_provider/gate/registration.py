"""What a gate tells its GPU's token scheduler: which GPU, which replica, and its share.

One owner for the three forms it takes: the gate's command-line flags (written by the local
backend's launch and by the Kubernetes pod template), the first JSON line the gate sends, and
that line read back by the token service. Only the standard library is used: the gate's
sidecar image needs nothing else.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any


class BadRegistration(ValueError):
    """A registration whose fields are missing or out of range."""


@dataclass(frozen=True)
class Registration:
    """Who the gate speaks for: the GPU, the replica and its share."""

    gpu: str  # the GPU's UUID, or a virtual GPU's name
    client: str  # the replica's name, unique on its GPU
    sm_percent: int  # 1..100
    quota_request: float  # guaranteed share of each window, 0 < request <= limit
    quota_limit: float  # most of each window, <= 1
    function: str  # the replica's function, `name.namespace`
    memory_bytes: int | None = None  # the replica's GPU memory cap, if it has one

    def __post_init__(self) -> None:
        if not self.gpu or not self.client or not self.function:
            raise BadRegistration("a registration names its GPU, its client and its function")
        if not 1 <= self.sm_percent <= 100:
            raise BadRegistration(f"SM partition must be 1..100, not {self.sm_percent}")
        if not 0 < self.quota_request <= self.quota_limit <= 1:
            raise BadRegistration(
                f"quotas must hold 0 < request <= limit <= 1, not request "
                f"{self.quota_request} and limit {self.quota_limit}"
            )
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise BadRegistration(f"a memory cap is a positive byte count, not {self.memory_bytes}")

    def argv(self) -> list[str]:
        """The gate's flags that carry this registration."""
        return [
            "--gpu", self.gpu,
            "--client", self.client,
            "--sm", str(self.sm_percent),
            "--request", str(self.quota_request),
            "--limit", str(self.quota_limit),
            "--function", self.function,
            *(["--memory", str(self.memory_bytes)] if self.memory_bytes is not None else []),
        ]  # fmt: skip

    def message(self) -> bytes:
        """The first line a gate sends its token service."""
        fields = {
            "gpu": self.gpu,
            "client": self.client,
            "sm": self.sm_percent,
            "request": self.quota_request,
            "limit": self.quota_limit,
            "function": self.function,
        }
        if self.memory_bytes is not None:
            fields["memory"] = self.memory_bytes
        return json.dumps(fields).encode() + b"\n"

    @classmethod
    def from_message(cls, fields: dict[str, Any]) -> Registration:
        """The registration a gate's first line carries; BadRegistration when it is not one."""
        try:
            return cls(
                str(fields["gpu"]),
                str(fields["client"]),
                int(fields["sm"]),
                float(fields["request"]),
                float(fields["limit"]),
                str(fields["function"]),
                None if fields.get("memory") is None else int(fields["memory"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, BadRegistration):
                raise
            raise BadRegistration(f"not a registration: {error!r}") from None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the flags `argv` writes to the gate's parser."""
        parser.add_argument("--gpu", required=True, help="GPU UUID (or virtual GPU name)")
        parser.add_argument("--client", required=True, help="this replica's name")
        parser.add_argument("--sm", type=int, required=True, help="SM partition, percent")
        parser.add_argument("--request", type=float, required=True, help="guaranteed time share")
        parser.add_argument("--limit", type=float, required=True, help="most time share")
        parser.add_argument("--function", required=True, help="its function, name.namespace")
        parser.add_argument("--memory", type=int, default=None, help="its GPU memory cap, bytes")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Registration:
        """The registration of parsed gate flags."""
        return cls(
            args.gpu, args.client, args.sm, args.request, args.limit, args.function, args.memory
        )
