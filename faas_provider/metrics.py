"""The provider's Prometheus metrics, in one registry per app: what it serves at /metrics.

Names follow Prometheus' conventions (units in the name, `_total` for counters) and
faas-provider's for the HTTP metrics. Functions are labelled `function_name` in the gateway's
`name.namespace` form, so they join with `gateway_function_invocation_total`.

With `--workers N` the extra workers count the calls they proxy themselves and report their
counts to the provider process every REPORT_INTERVAL_S (`PUT /system/workers/{pid}/metrics`
on its control socket); /metrics serves the sums, so one scrape sees every process. A worker
that ends keeps its last report in the sums, so counters never go back.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from faas_provider.backends.base import ReplicaCounts
from faas_provider.gpu.placement import Placer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# probes, scrapes and the workers' reports: counting them counts only noise
UNCOUNTED = ("/healthz", "/metrics", "/system/workers/{worker}/metrics")
REPORT_INTERVAL_S = 1.0
# seconds, from a small model's batch of one to a large batch or a cold start; the
# autoscaler judges a latency target at the largest bound at or below it, so the bounds are
# dense where targets are set
INVOCATION_BUCKETS = (0.005, 0.01, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25,
                      0.3, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)  # fmt: skip


class ProviderMetrics:
    """The provider's metrics: its HTTP API as faas-provider counts it, and invocations."""

    def __init__(self, counted_prefix: str = "/") -> None:
        """`counted_prefix`: the paths this process counts (a worker: only /function/, for it
        passes the others to the provider process, which counts them)."""
        self.counted_prefix = counted_prefix
        self.own = CollectorRegistry()  # what this process counted
        self.registry = CollectorRegistry()  # what /metrics serves: that and the workers'
        self.registry.register(_Summed(self))
        self._reports: dict[str, list[Metric]] = {}
        labels = ("code", "method", "path")
        self.requests = Counter(
            "provider_http_requests",
            "Requests to the provider, by route",
            labels,
            registry=self.own,
        )
        self.duration = Histogram(
            "provider_http_request_duration_seconds",
            "Seconds spent serving requests to the provider, by route",
            labels,
            registry=self.own,
        )
        self.invocations = Counter(
            "fast_gshare_function_invocations",
            "Invocations of a function through the provider's proxy, by answer code",
            ("function_name", "code"),
            registry=self.own,
        )
        self.invocation_duration = Histogram(
            "fast_gshare_function_invocation_duration_seconds",
            "Seconds from an invocation's arrival at the proxy to its answer's end",
            ("function_name",),
            buckets=INVOCATION_BUCKETS,
            registry=self.own,
        )

    def watch_replicas(self, counts: Callable[[], dict[tuple[str, str], ReplicaCounts]]) -> None:
        """Serve `fast_gshare_function_replicas{function_name,state}` from `counts` (the
        backend's `replica_counts`), asked at each scrape."""
        self.registry.register(_Replicas(counts))

    def report(self, worker: str, exposition: str) -> None:
        """Take a worker's counts (what its `own` registry exposes) in place of its last."""
        self._reports[worker] = list(text_string_to_metric_families(exposition))

    def exposition(self) -> bytes:
        """What this process counted, as a worker reports it."""
        return generate_latest(self.own)

    def reports(self) -> list[list[Metric]]:
        """The workers' last reports."""
        return list(self._reports.values())

    def latencies(self) -> dict[str, dict[float, float]]:
        """Each function's invocations answered so far by how long they took, every
        process's: {bucket bound in seconds: calls answered within it}, +Inf holding all."""
        found: dict[str, dict[float, float]] = {}
        for family in _Summed(self).collect():
            if family.name == "fast_gshare_function_invocation_duration_seconds":
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        buckets = found.setdefault(sample.labels["function_name"], {})
                        bound = float(sample.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return found

    def gpu_models(self) -> set[str]:
        """The models of the GPUs the backend places replicas on (`fast_gshare_gpu_info`)."""
        return {
            sample.labels["model"]
            for family in self.registry.collect()
            if family.name == "fast_gshare_gpu"
            for sample in family.samples
        }

    def invoked(self, name: str, namespace: str, code: int, seconds: float) -> None:
        """Count one invocation of function `name.namespace` answered `code`."""
        function = f"{name}.{namespace}"
        self.invocations.labels(function, str(code)).inc()
        self.invocation_duration.labels(function).observe(seconds)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count and time every request but probes and scrapes, labelled by route template
        (`/function/{service}`), not raw path."""
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else "unmatched"
        if path in UNCOUNTED or not request.path.startswith(self.counted_prefix):
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
            labels = (str(status), request.method, path)
            self.requests.labels(*labels).inc()
            self.duration.labels(*labels).observe(time.perf_counter() - started)


class _Summed(Collector):
    """This process's metrics with the workers' reports added, sample by sample."""

    def __init__(self, metrics: ProviderMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        families = {family.name: family for family in self._metrics.own.collect()}
        for report in self._metrics.reports():
            for family in report:
                if family.name.endswith("_created"):
                    continue  # when a worker's series began: not a count
                mine = families.setdefault(family.name, _empty_like(family))
                where = {_key(s.name, s.labels): i for i, s in enumerate(mine.samples)}
                for sample in family.samples:
                    index = where.get(_key(sample.name, sample.labels))
                    if index is None:
                        where[_key(sample.name, sample.labels)] = len(mine.samples)
                        mine.samples.append(sample)
                    else:
                        held = mine.samples[index]
                        mine.samples[index] = held._replace(value=held.value + sample.value)
        return list(families.values())


def _empty_like(family: Metric) -> Metric:
    return Metric(family.name, family.documentation, family.type, family.unit)


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


class _Replicas(Collector):
    """Each function's replicas: desired, available, pending (for GPU room)."""

    def __init__(self, counts: Callable[[], dict[tuple[str, str], ReplicaCounts]]) -> None:
        self._counts = counts

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(
            "fast_gshare_function_replicas",
            "A function's replicas: desired, available (ready), pending (waiting for GPU room)",
            labels=("function_name", "state"),
        )
        restarts = CounterMetricFamily(
            "fast_gshare_function_restarts",
            "Restarts of a function's replicas, by reason: exited, unhealthy (failed its "
            "health checks), recycled (its GPU's MPS server was lost)",
            labels=("function_name", "reason"),
        )
        waiting = InfoMetricFamily(
            "fast_gshare_function_pending",
            "Why a function's pending replicas wait (while some do): the GPUs' room against "
            "what one replica needs",
            labels=("function_name",),
        )
        for (namespace, name), counts in sorted(self._counts().items()):
            function = f"{name}.{namespace}"
            for state in ("desired", "available", "pending"):
                family.add_metric((function, state), getattr(counts, state))
            for reason, count in sorted(counts.restarts.items()):
                restarts.add_metric((function, reason), count)
            if counts.pending and counts.pending_reason:
                waiting.add_metric((function,), {"reason": counts.pending_reason})
        return [family, restarts, waiting]


class PlacementCollector(Collector):
    """Each GPU's room as placement holds it: SM-time footprint allocated, memory allocated and
    total."""

    def __init__(self, placer: Callable[[], Placer]) -> None:
        self._placer = placer

    def collect(self) -> list[Metric]:
        labels = ("gpu", "node")
        footprint = GaugeMetricFamily(
            "fast_gshare_gpu_footprint_allocated_ratio",
            "SM-time footprint placed on a GPU (SM share x quota request, summed), of 1",
            labels=labels,
        )
        allocated = GaugeMetricFamily(
            "fast_gshare_gpu_memory_allocated_bytes",
            "GPU memory the caps of the replicas placed on a GPU add up to",
            labels=labels,
        )
        total = GaugeMetricFamily(
            "fast_gshare_gpu_memory_total_bytes", "A GPU's memory", labels=labels
        )
        info = InfoMetricFamily(
            "fast_gshare_gpu", "A GPU of the inventory: its model", labels=labels
        )
        for load in self._placer().loads:
            where = (load.device.uuid, load.device.node or socket.gethostname())
            footprint.add_metric(where, load.footprint / 100)
            allocated.add_metric(where, load.memory_bytes)
            total.add_metric(where, load.device.memory_bytes)
            info.add_metric(where, {"model": load.device.name})
        return [footprint, allocated, total, info]
