"""Every /system route under hostile input (hypothesis): random JSON of every shape, fields of
the wrong type, huge and unicode names, bodies of many MiB, sent whole or chunked.

The answer is never a 500 nor a traceback; a refused change changes nothing; afterwards every
function listed is whole and consistent, and a new backend on the same state directory lists
the same. Derandomized and without an example database, so every run tries the same inputs.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from faas_provider.backends.local.backend import LocalBackend
from faas_provider.models import check_dns_label
from faas_provider.settings import Settings

MiB = 1024**2
KNOWN_NAMES = ["fuzz-a", "fuzz-b", "openfaas-fn", "team-x"]
STABLE_FIELDS = (
    "name",
    "namespace",
    "image",
    "envProcess",
    "envVars",
    "constraints",
    "secrets",
    "labels",
    "annotations",
    "limits",
    "requests",
    "readOnlyRootFilesystem",
    "replicas",
    "createdAt",
)

# Values of every JSON shape, and names that are valid, near-valid, unicode or huge.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.one_of(
    st.sampled_from(KNOWN_NAMES),
    st.sampled_from(KNOWN_NAMES),
    st.sampled_from(KNOWN_NAMES),
    st.sampled_from(KNOWN_NAMES),
    st.from_regex(r"[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True),
    st.sampled_from(["", ".", "..", "../etc", "a/b", "A", "-a", "a-", "a.b", "\x00", "\ud800"]),
    st.text(min_size=1, max_size=12),
    st.integers(64, 300_000).map(lambda n: "a" * n),
    st.integers(1, 2_000).map(lambda n: "ü🙂" * n),
)
text_maps = st.dictionaries(st.text(max_size=12), st.text(max_size=24), max_size=4)


def either(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right type, sometimes any JSON value."""
    return st.one_of(right, right, right, json_values)


images = st.one_of(
    st.sampled_from(
        [
            "ghcr.io/fast-gshare/echo:latest",
            "ghcr.io/fast-gshare/echo:latest",
            "example/steer:1",
            "example/steer:1",
            "x/tiny-cpu:1",
            "",
            "..",
            "x/../../etc",
            "nothing/here:1",
        ]
    ),
    st.text(max_size=16),
)
annotations = st.dictionaries(
    st.sampled_from(
        [
            "fastgshare/gpu_sm_partition",
            "fastgshare/gpu_quota_request",
            "fastgshare/gpu_quota_limit",
            "fastgshare/gpu_mem",
            "fastgshare/gpu_sm_partiton",
        ]
    )
    | st.text(max_size=8),
    st.sampled_from(["0", "1", "50", "0.5", "1.5", "-1", "4Gi", "1e400", "nan", "x", ""]),
    max_size=3,
)
# Replica counts stay small or far out of range: a valid count starts real processes.
scale_min = st.sampled_from(["0", "0", "0", "1", "-1", "x", "1.5", "1001", "9" * 30, "٣"])
labels = st.builds(lambda m, extra: {**extra, "com.openfaas.scale.min": m}, scale_min, text_maps)
mangled_deployments = st.fixed_dictionaries(
    {"service": either(names), "image": either(images)},
    optional={
        "namespace": either(names),
        "envProcess": either(st.sampled_from(["cat", "cat", "env", "", "\x00", "no-such-cmd"])),
        "envVars": either(
            text_maps | st.sampled_from([{"A=B": "1"}, {"": "x"}, {"A": "\x00"}, {"\x00": "a"}])
        ),
        "labels": either(labels),
        "annotations": either(annotations),
        "secrets": either(st.lists(names, max_size=3)),
        "constraints": either(st.lists(st.text(max_size=8), max_size=2)),
        "limits": either(st.fixed_dictionaries({}, optional={"nvidia.com/gpu": json_values})),
        "readOnlyRootFilesystem": json_values,
    },
)
# Deployments that pass, or nearly: known names, images that run, small replica counts.
valid_deployments = st.fixed_dictionaries(
    {
        "service": st.sampled_from(KNOWN_NAMES),
        "image": st.sampled_from(["ghcr.io/fast-gshare/echo:latest", "example/steer:1"]),
        "envProcess": st.sampled_from(["cat", "env"]),
        "labels": labels,
    },
    optional={
        "namespace": st.sampled_from(KNOWN_NAMES),
        "envVars": text_maps,
        "annotations": annotations,
        "secrets": st.lists(st.sampled_from(KNOWN_NAMES), max_size=2),
    },
)
deployments = st.one_of(valid_deployments, valid_deployments, mangled_deployments)
secrets = st.fixed_dictionaries(
    {"name": either(names)},
    optional={
        "namespace": either(names),
        "value": either(st.text(max_size=32) | st.sampled_from(["\ud800", "\x00"])),
        "rawValue": either(st.sampled_from(["aGk=", "not base64!", "", "===="])),
    },
)
namespace_bodies = st.fixed_dictionaries(
    {},
    optional={"name": either(names), "labels": either(text_maps), "annotations": either(text_maps)},
)
scales = st.fixed_dictionaries(
    {"replicas": either(st.integers(-3, 2) | st.integers(1001, 10**30))},
    optional={"serviceName": either(names), "namespace": either(names)},
)
deletes = st.fixed_dictionaries(
    {"functionName": either(names)}, optional={"namespace": either(names)}
)


def raw_bodies(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """A route's body: mostly JSON in its shape, else any JSON, garbage, or hostile sizes."""
    return st.one_of(
        documents.map(lambda d: json.dumps(d).encode()),
        documents.map(lambda d: json.dumps(d).encode()),
        documents.map(lambda d: json.dumps(d, ensure_ascii=False).encode(errors="surrogatepass")),
        json_values.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=64),
        st.sampled_from([b"", b"   ", b"\xff\xfe{", b'{"service": "\\ud800"}', b"NaN", b"{"]),
        st.integers(100, 500_000).map(lambda n: b"[" * n + b"]" * n),  # nested past recursion
        st.integers(4400, 100_000).map(lambda n: b'{"replicas": ' + b"7" * n + b"}"),
        st.sampled_from([3, 8]).map(lambda n: b'{"service": "' + b"a" * (n * MiB) + b'"}'),
    )


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # {name} is filled from `names`
    bodies: st.SearchStrategy[Any] | None  # None: the route takes no body


ROUTES = [
    Route("GET", "/system/functions", None),
    Route("POST", "/system/functions", deployments),
    Route("PUT", "/system/functions", deployments),
    Route("DELETE", "/system/functions", deletes),
    Route("GET", "/system/function/{name}", None),
    Route("GET", "/system/endpoints/{name}", None),
    Route("POST", "/system/scale-function/{name}", scales),
    Route("POST", "/system/scale-function", scales),
    Route("GET", "/system/info", None),
    Route("GET", "/system/namespaces", None),
    Route("GET", "/system/namespace/{name}", None),
    Route("POST", "/system/namespace/{name}", namespace_bodies),
    Route("POST", "/system/namespace/", namespace_bodies),
    Route("PUT", "/system/namespace/{name}", namespace_bodies),
    Route("DELETE", "/system/namespace/{name}", None),
    Route("GET", "/system/secrets", None),
    Route("POST", "/system/secrets", secrets),
    Route("PUT", "/system/secrets", secrets),
    Route("DELETE", "/system/secrets", secrets),
    Route("GET", "/system/logs", None),
]
log_queries = st.fixed_dictionaries(
    {},
    optional={
        "name": names,
        "namespace": names,
        "instance": st.text(max_size=8),
        "tail": st.sampled_from(["", "5", "-1", "x", "9" * 5000]),
        "since": st.sampled_from(["", "2026-01-02T15:04:05Z", "2026-01-02", "x", "9999-99"]),
        "follow": st.sampled_from(["", "false", "0"]),  # a follower would stream forever
    },
)


@dataclass
class Answer:
    status: int
    text: str


class Caller:
    """Plain HTTP/1.1 requests from the hypothesis thread to the provider under test."""

    def __init__(self, port: int) -> None:
        self.port = port

    def call(
        self, method: str, path: str, body: bytes | None = None, chunked: bool = False
    ) -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"Content-Type": "application/json"}
            try:
                if body is not None and chunked:
                    pieces = (body[i : i + 256 * 1024] for i in range(0, len(body), 256 * 1024))
                    connection.request(method, path, pieces, headers, encode_chunked=True)
                else:
                    connection.request(method, path, body, headers)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered (and closed) before the request was sent whole: read the answer
            response = connection.getresponse()
            return Answer(response.status, response.read().decode(errors="replace"))
        finally:
            connection.close()

    def json(self, path: str) -> Any:
        answer = self.call("GET", path)
        assert answer.status == 200, (path, answer)
        return json.loads(answer.text)

    def snapshot(self) -> dict[str, Any]:
        """Everything a change could touch: namespaces, their functions and their secrets."""
        state: dict[str, Any] = {}
        for namespace in self.json("/system/namespaces"):
            query = "?" + urlencode({"namespace": namespace})
            functions = self.json("/system/functions" + query)
            state[namespace] = {
                "namespace": self.json(f"/system/namespace/{quote(namespace)}"),
                "functions": {f["name"]: stable(f) for f in functions},
                "secrets": sorted(s["name"] for s in self.json("/system/secrets" + query)),
            }
        return state


def escape(text: str) -> str:
    """`text` percent-encoded for a URL, lone surrogates too (as the bytes of no UTF-8)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def stable(function: dict[str, Any]) -> dict[str, Any]:
    """The fields of a status that change only through the API (not readiness or usage)."""
    return {key: function.get(key) for key in STABLE_FIELDS}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # an endpoints call on a function whose replica never gets ready waits this long
    return settings.model_copy(update={"startup_wait_s": 0.5})


async def test_hostile_requests_to_every_system_route(
    client: TestClient, settings: Settings
) -> None:
    caller = Caller(client.port)
    seen_statuses: dict[str, set[int]] = {}

    @hypothesis_settings(
        max_examples=1000,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        route = data.draw(st.sampled_from(ROUTES), label="route")
        path = route.path
        if "{name}" in path:
            path = path.replace("{name}", escape(data.draw(names, label="name")))
        if route.path == "/system/logs":
            query = data.draw(log_queries, label="query")
        else:
            query = data.draw(st.fixed_dictionaries({}, optional={"namespace": names}))
        if query:
            path += "?" + "&".join(f"{key}={escape(value)}" for key, value in query.items())
        body = None
        if route.bodies is not None:
            body = data.draw(raw_bodies(route.bodies), label="body")
        chunked = data.draw(st.booleans(), label="chunked")
        before = caller.snapshot() if route.method != "GET" else None
        answer = caller.call(route.method, path, body, chunked)
        seen_statuses.setdefault(f"{route.method} {route.path}", set()).add(answer.status)
        endpoints_unready = route.path.startswith("/system/endpoints/") and answer.status == 503
        assert answer.status < 500 or endpoints_unready, answer
        assert "Traceback" not in answer.text, answer
        if answer.status >= 400 and before is not None:
            assert caller.snapshot() == before, f"a refused {route.method} {route.path} changed"

    await asyncio.to_thread(fuzz)
    assert len(seen_statuses) == len(ROUTES), sorted(seen_statuses)  # every route was tried

    listed = await asyncio.to_thread(caller.snapshot)
    for namespace, entry in listed.items():
        secrets = set(entry["secrets"])
        for name, function in entry["functions"].items():
            check_dns_label(name)
            path = f"/system/function/{name}?namespace={namespace}"
            assert stable(await (await client.get(path)).json()) == function
            assert function["image"]
            assert 0 <= function["replicas"] <= 1000
            assert set(function["secrets"] or []) <= secrets
            mount = settings.local.state_dir / "mounts" / namespace / name / "secrets"
            assert sorted(p.name for p in mount.iterdir()) == sorted(function["secrets"] or [])

    await client.close()  # the provider lets the state directory go
    again = LocalBackend(
        settings.local.state_dir, settings.local.functions_dir, settings.startup_wait_s
    )
    await again.start()
    try:
        reloaded = {
            namespace: {f.name: stable(f.to_wire()) for f in await again.list_functions(namespace)}
            for namespace in await again.list_namespaces()
        }
    finally:
        await again.close()
    assert reloaded == {ns: entry["functions"] for ns, entry in listed.items()}
