"""The autoscaler as it runs in the provider: every TICK_S it reads each autoscaled function's
calls by how long they took (the proxy's latency histogram, every worker's counts included),
decides (decide.py) and applies the decision through the backend, so either backend scales
the same way.

A function is autoscaled when it asks for it: a latency target (`fastgshare/latency_slo_ms`),
a most (`com.openfaas.scale.max`) or scale to zero (`com.openfaas.scale.zero=true`); others
keep the replicas they are given (the OpenFaaS scale API and the gateway's scale from zero
work for all). With a profile of the GPU model the install has, it picks the setting too: a
new setting is a new share of the GPU, so it updates the function (its annotations), whose new
replicas are ready before the old ones go, then scales. Without one it scales replicas alone,
and says so once. The calls slower than the function's target (at the histogram's largest
bound at or below it) are what the scaler learns from, when a replica serves less here than
the profile says. Every decision is a log line with its reason, and shows in /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from faas_provider.autoscale.decide import (
    SCALE_MAX_LABEL,
    SCALE_ZERO_LABEL,
    Decision,
    FunctionScaler,
    Learned,
    ScaleBounds,
    Setting,
)
from faas_provider.backends.base import Backend
from faas_provider.errors import NotFound, ProviderError
from faas_provider.gpu.share import (
    LATENCY_SLO,
    QUOTA_LIMIT,
    QUOTA_REQUEST,
    SM_PARTITION,
    gpu_share,
)
from faas_provider.models import FUNCTION_LABEL, FunctionDeployment, FunctionStatus
from faas_provider.profile.model import Capacity, Profile

log = logging.getLogger("fast_gshare.autoscaler")

TICK_S = 2.0  # Knative's
PROFILE_REFRESH_S = 30.0  # how often a function's stored profile is read again (and at once
# when one is stored through this provider)


def autoscaled(status: FunctionStatus) -> bool:
    """Whether a function asks to be autoscaled."""
    return (
        LATENCY_SLO in status.annotations
        or SCALE_MAX_LABEL in status.labels
        or status.labels.get(SCALE_ZERO_LABEL, "").lower() == "true"
    )


def deployment_of(status: FunctionStatus) -> FunctionDeployment:
    """The deployment a function's status shows (what an update of it starts from)."""
    wire = status.to_wire()
    wire["service"] = wire.pop("name")
    wire["labels"] = {k: v for k, v in status.labels.items() if k != FUNCTION_LABEL}
    return FunctionDeployment.model_validate(wire)


def current_setting(deployment: FunctionDeployment, capacities: list[Capacity]) -> Setting | None:
    """The GPU setting a function runs at now: its share, with the concurrency its profile
    measured there (None for a function with no GPU share, or a whole GPU)."""
    share = gpu_share(deployment)
    if share is None or share.exclusive:
        return None
    here = (share.sm_percent, share.quota_request)
    concurrency = next(
        (c.concurrency for c in capacities if (c.sm_percent, c.quota) == here),
        capacities[0].concurrency if capacities else 1,
    )
    return Setting(share.sm_percent, share.quota_request, concurrency)


@dataclass
class _Followed:
    """What the autoscaler keeps of one function between ticks."""

    scaler: FunctionScaler
    profile: Profile | None = None
    profile_read_at: float = float("-inf")
    last: Decision | None = None
    told_no_profile: bool = False
    target_s: float | None = None  # its latency target


def _slower_than(latencies: dict[float, float], target_s: float | None) -> float:
    """Calls answered later than the largest bucket bound at or below `target_s` (0 without a
    target, or one below every bound)."""
    within = [bound for bound in latencies if target_s is not None and bound <= target_s]
    if not within:
        return 0.0
    return latencies[math.inf] - latencies[max(within)]


class Autoscaler:
    """Decides and applies, every TICK_S, for every autoscaled function of `backend`."""

    def __init__(
        self,
        backend: Backend,
        latencies: Callable[[], dict[str, dict[float, float]]],
        gpu_models: Callable[[], set[str]],
        tick_s: float = TICK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`latencies`: each function's (`name.namespace`) calls answered so far by bucket of
        how long they took, +Inf holding all (ProviderMetrics.latencies); `gpu_models`: the
        models of the install's GPUs."""
        self._backend = backend
        self._latencies = latencies
        self._gpu_models = gpu_models
        self._tick_s = tick_s
        self._clock = clock
        self._followed: dict[str, _Followed] = {}
        self.decisions = Counter(
            "fast_gshare_autoscaler_decisions",
            "Changes the autoscaler made to a function, by action: up, down, zero, setting, "
            "learned (it plans on less than the profile says)",
            ["function_name", "action"],
            registry=None,
        )

    async def run(self) -> None:
        """Tick until cancelled; a failed tick is logged and the next one tries again (so the
        task never ends with an error that would keep the provider from closing its backend)."""
        while True:
            try:
                await self.tick()
            except ProviderError as error:
                log.warning("autoscaler: this tick failed: %s", error)
            except Exception:
                log.exception("autoscaler: this tick failed")
            await asyncio.sleep(self._tick_s)

    async def tick(self) -> None:
        """One look at every autoscaled function, and what it asks of the backend."""
        now = self._clock()
        latencies = self._latencies()
        seen = set()
        for namespace in await self._backend.list_namespaces():
            for status in await self._backend.list_functions(namespace):
                if not autoscaled(status):
                    continue
                function = f"{status.name}.{status.namespace}"
                seen.add(function)
                await self._follow(now, function, status, latencies.get(function, {}))
        for gone in set(self._followed) - seen:
            del self._followed[gone]

    async def _follow(
        self,
        now: float,
        function: str,
        status: FunctionStatus,
        latencies: dict[float, float],
    ) -> None:
        try:
            bounds = ScaleBounds.from_labels(status.labels)
        except ProviderError as error:
            log.warning("autoscaler: %s is not scaled: %s", function, error)
            return
        followed = self._followed.get(function)
        if followed is None:
            followed = self._followed[function] = _Followed(FunctionScaler(bounds, []))
        followed.scaler.bounds = bounds
        await self._read_profile(now, function, status, followed)
        calls = latencies.get(math.inf, 0.0)
        followed.scaler.observe(now, calls, _slower_than(latencies, followed.target_s))
        deployment = deployment_of(status)
        current = current_setting(deployment, followed.scaler.capacities)
        decision = followed.scaler.decide(now, status.available_replicas, current, status.replicas)
        followed.last = decision
        if decision.learned is not None:
            log.info(
                "autoscaler: %s serves less than its profile says: %s",
                function,
                decision.learned_why,
            )
            self.decisions.labels(function, "learned").inc()
        wanted = decision.plan
        if wanted.setting is not None and current is not None and wanted.setting != current:
            # current is the capacity of its SM partition and quota: a change is a new share
            await self._apply_setting(function, deployment, wanted.setting, wanted.reason)
        if wanted.replicas != status.replicas:
            action = (
                "zero"
                if wanted.replicas == 0
                else ("up" if wanted.replicas > status.replicas else "down")
            )
            log.info(
                "autoscaler: %s %d -> %d replicas: %s",
                function,
                status.replicas,
                wanted.replicas,
                wanted.reason,
            )
            await self._backend.scale(status.name, status.namespace, wanted.replicas)
            self.decisions.labels(function, action).inc()

    async def _apply_setting(
        self, function: str, deployment: FunctionDeployment, setting: Setting, reason: str
    ) -> None:
        annotations = {
            **deployment.annotations,
            SM_PARTITION: str(setting.sm_percent),
            QUOTA_REQUEST: f"{setting.quota:g}",
            QUOTA_LIMIT: f"{setting.quota:g}",
        }
        deployment = deployment.model_copy(update={"annotations": annotations})
        log.info(
            "autoscaler: %s to %d%% SMs, quota %g (new replicas, then the old ones go): %s",
            function,
            setting.sm_percent,
            setting.quota,
            reason,
        )
        await self._backend.update(deployment)
        self.decisions.labels(function, "setting").inc()

    async def _read_profile(
        self, now: float, function: str, status: FunctionStatus, followed: _Followed
    ) -> None:
        if now - followed.profile_read_at < PROFILE_REFRESH_S:
            return
        followed.profile_read_at = now
        try:
            profile: Profile | None = await self._backend.get_profile(status.name, status.namespace)
        except NotFound:
            profile = None
        target = status.annotations.get(LATENCY_SLO)
        slo = float(target) if target is not None else (profile.latency_slo_ms if profile else None)
        followed.target_s = slo / 1000 if slo else None
        capacities: list[Capacity] = []
        why = ""
        if profile is None:
            why = "it has no profile (fast-gshare profile makes one)"
        elif profile.gpu_model not in self._gpu_models():
            why = f"its profile is of an {profile.gpu_model}, which this install does not have"
        elif target is None and profile.latency_slo_ms is None:
            why = f"it has no latency target ({LATENCY_SLO})"
        elif SM_PARTITION not in status.annotations:
            why = "it has no GPU share to set"
        else:
            assert slo
            capacities = profile.capacities(slo)
            if not capacities:
                why = f"no setting of its profile met p99 <= {slo:g} ms"
        if why and not followed.told_no_profile:
            log.info("autoscaler: %s scales its replicas on the rate alone: %s", function, why)
        followed.told_no_profile = bool(why)
        if capacities and followed.profile != profile:
            log.info(
                "autoscaler: %s follows its profile (%s, %d settings within the target)",
                function,
                profile.gpu_model if profile else "",
                len(capacities),
            )
        followed.profile = profile
        followed.scaler.capacities = capacities

    def profile_changed(self, function: str) -> None:
        """Read `function`'s (`name.namespace`) profile again at the next tick."""
        followed = self._followed.get(function)
        if followed is not None:
            followed.profile_read_at = float("-inf")

    def last_decisions(self) -> dict[str, Decision]:
        """The last decision for each function followed, by `name.namespace`."""
        return {f: followed.last for f, followed in self._followed.items() if followed.last}

    def learned(self) -> dict[str, Learned]:
        """The lessons the autoscaler plans on in place of profiles, by `name.namespace`."""
        return {
            f: followed.scaler.learned
            for f, followed in self._followed.items()
            if followed.scaler.learned is not None
        }

    def collector(self) -> Collector:
        """What /metrics shows of the autoscaler: its last decision per function."""
        return _AutoscalerCollector(self)


class _AutoscalerCollector(Collector):
    def __init__(self, autoscaler: Autoscaler) -> None:
        self._autoscaler = autoscaler

    def collect(self) -> list[Metric]:
        desired = GaugeMetricFamily(
            "fast_gshare_autoscaler_desired_replicas",
            "The replicas the autoscaler last asked for a function",
            labels=("function_name",),
        )
        footprint = GaugeMetricFamily(
            "fast_gshare_autoscaler_footprint_ratio",
            "The GPU footprint (SM share x quota, summed over replicas) the autoscaler last "
            "planned for a function, in GPUs",
            labels=("function_name",),
        )
        rate = GaugeMetricFamily(
            "fast_gshare_autoscaler_rate_rps",
            "A function's call rate over the autoscaler's windows (stable 60 s, panic 6 s)",
            labels=("function_name", "window"),
        )
        panic = GaugeMetricFamily(
            "fast_gshare_autoscaler_panic",
            "Whether the autoscaler is in panic for a function (a burst: it does not scale down)",
            labels=("function_name",),
        )
        learned = GaugeMetricFamily(
            "fast_gshare_autoscaler_learned_ratio",
            "The share of its profile's figures a function's replicas were seen to serve within "
            "its target, which the autoscaler plans on while the lesson holds",
            labels=("function_name",),
        )
        for function, lesson in sorted(self._autoscaler.learned().items()):
            learned.add_metric((function,), lesson.ratio)
        for function, decision in sorted(self._autoscaler.last_decisions().items()):
            desired.add_metric((function,), decision.plan.replicas)
            footprint.add_metric((function,), decision.plan.footprint)
            rate.add_metric((function, "stable"), decision.stable_rps)
            rate.add_metric((function, "panic"), decision.panic_rps)
            panic.add_metric((function,), int(decision.panic))
        return [
            desired,
            footprint,
            rate,
            panic,
            learned,
            *self._autoscaler.decisions.collect(),
        ]
