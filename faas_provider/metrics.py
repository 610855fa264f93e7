"""The provider's Prometheus metrics, in one registry per app: what it serves at /metrics.

Names follow Prometheus' conventions (units in the name, `_total` for counters) and
faas-provider's for the HTTP metrics. Functions are labelled `function_name` in the gateway's
`name.namespace` form, so they join with `gateway_function_invocation_total`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNCOUNTED = ("/healthz", "/metrics")  # probes and scrapes: counting them counts only noise
# seconds, from a small model's batch of one to a large batch or a cold start
INVOCATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ProviderMetrics:
    """The provider's metrics: its HTTP API as faas-provider counts it, and invocations."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("code", "method", "path")
        self.requests = Counter(
            "provider_http_requests",
            "Requests to the provider, by route",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            "provider_http_request_duration_seconds",
            "Seconds spent serving requests to the provider, by route",
            labels,
            registry=self.registry,
        )
        self.invocations = Counter(
            "fast_gshare_function_invocations",
            "Invocations of a function through the provider's proxy, by answer code",
            ("function_name", "code"),
            registry=self.registry,
        )
        self.invocation_duration = Histogram(
            "fast_gshare_function_invocation_duration_seconds",
            "Seconds from an invocation's arrival at the proxy to its answer's end",
            ("function_name",),
            buckets=INVOCATION_BUCKETS,
            registry=self.registry,
        )

    def invoked(self, name: str, namespace: str, code: int, seconds: float) -> None:
        """Count one invocation of function `name.namespace` answered `code`."""
        function = f"{name}.{namespace}"
        self.invocations.labels(function, str(code)).inc()
        self.invocation_duration.labels(function).observe(seconds)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count and time every request but probes and scrapes, labelled by route template
        (`/function/{service}`), not raw path."""
        if request.path in UNCOUNTED:
            return await handler(request)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            resource = request.match_info.route.resource
            path = resource.canonical if resource is not None else "unmatched"
            labels = (str(status), request.method, path)
            self.requests.labels(*labels).inc()
            self.duration.labels(*labels).observe(time.perf_counter() - started)
