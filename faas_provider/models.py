"""Wire shapes of the OpenFaaS provider API, with OpenFaaS's JSON names (faas-provider `types/`).

Unknown fields are ignored, known fields of the wrong type are refused. Names are checked as
DNS-1123 labels, the rule Kubernetes and faas-netes apply to function names and namespaces.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, Base64Bytes, BaseModel, BeforeValidator, ConfigDict, Field

from faas_provider.errors import Conflict, InvalidRequest

DEFAULT_NAMESPACE = "openfaas-fn"
MAX_REPLICAS = 1000  # the most replicas a function may ask for, by scale or by its labels
SCALE_MIN_LABEL = "com.openfaas.scale.min"  # replicas at deploy, and from zero (the gateway's)
FUNCTION_LABEL = "faas_function"  # on every function's status, as faas-netes labels its pods
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def check_dns_label(value: str, what: str = "name") -> str:
    """Return `value` if it is a DNS-1123 label, else raise ValueError naming `what`."""
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} is not a DNS-1123 label: use at most 63 lower-case letters, "
            "digits and '-', starting and ending with a letter or digit"
        )
    return value


def check_dns_subdomain(value: str, what: str = "name") -> str:
    """Return `value` if it is a DNS-1123 subdomain (Kubernetes' rule for secret names)."""
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        raise ValueError(
            f"{what} {value!r} is not a DNS-1123 subdomain: use lower-case letters, digits, "
            "'-' and '.', starting and ending with a letter or digit"
        )
    return value


def check_namespace_deletion(name: str, has_functions: bool) -> None:
    """Conflict when namespace `name` may not be deleted: the default, or one with functions."""
    if name == DEFAULT_NAMESPACE:
        raise Conflict(
            f"namespace {name} is the default, where calls that name none go; it cannot be deleted"
        )
    if has_functions:
        raise Conflict(f"namespace {name} still has functions; delete them first")


def namespace_or_default(value: str | None) -> str:
    """Missing or empty namespace means the default function namespace."""
    return value or DEFAULT_NAMESPACE


def replica_label(labels: Mapping[str, str], label: str, default: int) -> int:
    """A replica count in label `label` (`default` without it); InvalidRequest naming the label
    when it is not a whole number from 0 to MAX_REPLICAS."""
    text = labels.get(label)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_REPLICAS:
        raise InvalidRequest(
            f"label {label} must be a whole number from 0 to {MAX_REPLICAS}, not {text!r}"
        )
    return value


def _null_to_empty_dict(value: Any) -> Any:
    return {} if value is None else value


def _null_to_empty_list(value: Any) -> Any:
    return [] if value is None else value


def _check_environment(env: dict[str, str]) -> dict[str, str]:
    """Refuse what no process environment can hold (the replica would never start)."""
    for name, value in env.items():
        if not name or "=" in name or "\x00" in name:
            raise ValueError(f"{name!r} is not an environment variable name: no '=' or NUL")
        _check_process_text(value, f"environment variable {name}")
    return env


def _check_process_text(value: str, what: str = "envProcess") -> str:
    if "\x00" in value:
        raise ValueError(f"{what} holds a NUL character")
    return _check_unicode(value, what)


def _check_unicode(value: str, what: str = "value") -> str:
    """Refuse a string with a lone surrogate (JSON can escape one; UTF-8 cannot hold it)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


FunctionName = Annotated[str, AfterValidator(check_dns_label)]
Namespace = Annotated[
    str,
    BeforeValidator(lambda v: namespace_or_default(v)),
    AfterValidator(lambda v: check_dns_label(v, "namespace")),
]
StrMap = Annotated[dict[str, str], BeforeValidator(_null_to_empty_dict)]
StrList = Annotated[list[str], BeforeValidator(_null_to_empty_list)]
EnvMap = Annotated[StrMap, AfterValidator(_check_environment)]
ProcessText = Annotated[str, AfterValidator(_check_process_text)]
SecretName = Annotated[str, AfterValidator(lambda v: check_dns_subdomain(v, "secret name"))]
SecretNames = Annotated[list[SecretName], BeforeValidator(_null_to_empty_list)]


class _Wire(BaseModel):
    """Base for wire models: camelCase aliases, unknown fields ignored, strict on types."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", strict=False)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object OpenFaaS clients expect: aliases, empty optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class FunctionResources(_Wire):
    """`limits` / `requests` of a function: memory, cpu and whole GPUs."""

    memory: str | None = None
    cpu: str | None = None
    gpu: str | None = Field(default=None, alias="nvidia.com/gpu")


class FunctionDeployment(_Wire):
    """Body of POST/PUT /system/functions."""

    service: FunctionName
    image: str = Field(min_length=1)
    namespace: Namespace = DEFAULT_NAMESPACE
    env_process: ProcessText | None = Field(default=None, alias="envProcess")
    env_vars: EnvMap = Field(default_factory=dict, alias="envVars")
    constraints: StrList = Field(default_factory=list)
    secrets: SecretNames = Field(default_factory=list)
    labels: StrMap = Field(default_factory=dict)
    annotations: StrMap = Field(default_factory=dict)
    limits: FunctionResources | None = None
    requests: FunctionResources | None = None
    read_only_root_filesystem: bool = Field(default=False, alias="readOnlyRootFilesystem")

    def min_replicas(self) -> int:
        """Replicas it starts with: label com.openfaas.scale.min, default 1; InvalidRequest
        naming the label when that is not a whole number from 0 to MAX_REPLICAS."""
        return replica_label(self.labels, SCALE_MIN_LABEL, 1)

    def runtime_digest(self) -> str:
        """A digest of what its replicas are started from (all but the labels): an update that
        changes it replaces the replicas."""
        wire = self.to_wire()
        wire.pop("labels", None)
        return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()

    def status(
        self,
        replicas: int,
        available: int,
        created_at: datetime,
        usage: FunctionUsage | None = None,
    ) -> FunctionStatus:
        """Its FunctionStatus: `replicas` desired, `available` ready, labelled
        `faas_function: <name>` as faas-netes labels every function."""
        return FunctionStatus(
            name=self.service,
            namespace=self.namespace,
            image=self.image,
            envProcess=self.env_process,
            envVars=self.env_vars,
            constraints=self.constraints,
            secrets=self.secrets,
            labels={**self.labels, FUNCTION_LABEL: self.service},
            annotations=self.annotations,
            limits=self.limits,
            requests=self.requests,
            readOnlyRootFilesystem=self.read_only_root_filesystem,
            replicas=replicas,
            availableReplicas=available,
            createdAt=created_at,
            usage=usage,
        )


class FunctionUsage(_Wire):
    """Resource usage of a function's replicas."""

    cpu: float = 0.0
    total_memory_bytes: float = Field(default=0.0, alias="totalMemoryBytes")


class FunctionStatus(_Wire):
    """One entry of GET /system/functions and the body of GET /system/function/{name}."""

    name: str
    image: str
    namespace: str
    env_process: str | None = Field(default=None, alias="envProcess")
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    constraints: list[str] | None = None
    secrets: list[str] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    limits: FunctionResources | None = None
    requests: FunctionResources | None = None
    read_only_root_filesystem: bool = Field(default=False, alias="readOnlyRootFilesystem")
    invocation_count: float = Field(default=0.0, alias="invocationCount")
    replicas: int = 0
    available_replicas: int = Field(default=0, alias="availableReplicas")
    created_at: datetime = Field(alias="createdAt")
    usage: FunctionUsage | None = None

    def to_wire(self) -> dict[str, Any]:
        """As `_Wire.to_wire`, createdAt in RFC 3339, `labels` and `annotations` always there
        (`{}` when empty, as faas-netes sends them: clients dereference both), other empty
        maps and lists left out."""
        wire = super().to_wire()
        for key in ("envVars", "constraints", "secrets"):
            if not wire.get(key):
                wire.pop(key, None)
        wire["createdAt"] = rfc3339(self.created_at)
        return wire


class DeleteFunctionRequest(_Wire):
    """Body of DELETE /system/functions (faas-cli sends it; faas-netes reads the query)."""

    function_name: FunctionName = Field(alias="functionName")
    namespace: str | None = None


class ScaleServiceRequest(_Wire):
    """Body of POST /system/scale-function/{name}."""

    service_name: str | None = Field(default=None, alias="serviceName")
    namespace: str | None = None
    replicas: int = Field(ge=0, le=MAX_REPLICAS)


class Secret(_Wire):
    """Body of the /system/secrets calls. `rawValue` is base64 on the wire and wins over `value`."""

    name: SecretName
    namespace: str | None = None
    value: Annotated[str, AfterValidator(_check_unicode)] | None = None
    raw_value: Base64Bytes | None = Field(default=None, alias="rawValue")

    def payload(self) -> bytes:
        """The secret's bytes: rawValue when given, else value."""
        if self.raw_value is not None:
            return self.raw_value
        return (self.value or "").encode()


class NamespaceRequest(_Wire):
    """Body of POST/PUT /system/namespace/{name}."""

    name: str | None = None
    labels: StrMap = Field(default_factory=dict)
    annotations: StrMap = Field(default_factory=dict)


class LogMessage(_Wire):
    """One NDJSON line of GET /system/logs."""

    name: str
    namespace: str
    instance: str
    timestamp: datetime
    text: str

    def to_wire(self) -> dict[str, Any]:
        """As `_Wire.to_wire`, with the timestamp in RFC 3339 with nanosecond-style precision."""
        wire = super().to_wire()
        wire["timestamp"] = rfc3339(self.timestamp)
        return wire


def rfc3339(moment: datetime) -> str:
    """Format a timestamp as Go's time.RFC3339Nano does for UTC times."""
    text = moment.astimezone(UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)
