"""The autoscaler's decisions, pure: numbers in, a plan out, no I/O and no clock.

`plan()` picks, for a request rate, the GPU setting (SM partition, quota, concurrency) and the
replica count that serve the rate with headroom (each replica loaded to TARGET_UTILISATION of
what its profile says it serves within the latency target) at the least GPU footprint: SM share
x quota summed over the replicas. Without a profile it scales replicas alone, on the OpenFaaS
target of requests per second per replica (`com.openfaas.scale.target`, default 50).

`FunctionScaler` follows one function's rate over time as Knative's autoscaler does: a stable
window (60 s) to follow the load without flapping, a panic window (6 s) entered when it asks for
twice the replicas that are ready, in which it never scales down. While the load ramps up, the
panic window's rate is carried along its rise to when a replica asked for now, and the next
tick's, would serve (LEAD_S); that projected rate both enters panic and sizes it. Out of panic
it does not scale down while the panic window asks for more than the stable one. Scale to zero
after the idle period when `com.openfaas.scale.zero` allows it. The cluster simulator runs
this same code.

A profile measures one replica alone on its GPU; packed beside others (memory bandwidth, caches,
the host's CPUs) a replica may serve less within the target. So the scaler also reads how many
calls were slower than the target. When more than SLOW_RATIO of a panic window's calls were,
while each replica carried, even at the window's busiest, no more than its plan says one
serves (not a load that outran the scaling), it learns what one replica of that setting serves
here (the load it missed at, less a margin) and plans every setting at that share of its
profile's figure, for LEARNED_HOLD_S after the miss that taught it (interference slows a
replica whatever its setting).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from faas_provider.errors import InvalidRequest
from faas_provider.models import SCALE_MIN_LABEL, replica_label
from faas_provider.profile.model import Capacity

SCALE_MAX_LABEL = "com.openfaas.scale.max"
SCALE_ZERO_LABEL = "com.openfaas.scale.zero"
SCALE_ZERO_DURATION_LABEL = "com.openfaas.scale.zero-duration"
SCALE_TARGET_LABEL = "com.openfaas.scale.target"

TARGET_UTILISATION = 0.7  # Knative's: each replica is planned at 70% of what it can serve
STABLE_WINDOW_S = 60.0
PANIC_WINDOW_S = 6.0
PANIC_THRESHOLD = 2.0  # panic when the panic window asks for 200% of the ready replicas
LEAD_S = 5.0  # how far ahead a rising load is carried: a replica's start (3 s) and a tick (2 s)
SETTING_CHANGE_SAVING = 0.2  # change the setting (new replicas) only to save 20% of footprint
SLOW_RATIO = 0.01  # a window whose calls are more than 1% slower than the target missed its p99
MIN_CALLS_JUDGED = 200  # the calls a window needs before its p99 is judged
LEARNED_MARGIN = 0.85  # a replica is planned to carry at most 85% of the load it missed at
LEARNED_FLOOR = 0.5  # and is never taken to serve less than half its profile's figure
LEARNED_HOLD_S = 300.0  # how long a learned figure holds after the last miss that lowered it
DEFAULT_MAX_REPLICAS = 20  # OpenFaaS's default for com.openfaas.scale.max
DEFAULT_TARGET_RPS = 50.0  # OpenFaaS's default com.openfaas.scale.target (type rps)
DEFAULT_ZERO_DURATION_S = 15 * 60.0  # OpenFaaS's default com.openfaas.scale.zero-duration


@dataclass(frozen=True)
class ScaleBounds:
    """What a function's OpenFaaS labels allow the autoscaler."""

    min_replicas: int = 1
    max_replicas: int = DEFAULT_MAX_REPLICAS
    zero: bool = False
    zero_duration_s: float = DEFAULT_ZERO_DURATION_S
    target_rps: float = DEFAULT_TARGET_RPS  # per replica, without a profile

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> ScaleBounds:
        """The bounds in `labels`; InvalidRequest naming the label that is not valid."""
        low = replica_label(labels, SCALE_MIN_LABEL, 1)
        high = replica_label(labels, SCALE_MAX_LABEL, max(low, DEFAULT_MAX_REPLICAS))
        if high < low:
            raise InvalidRequest(
                f"label {SCALE_MAX_LABEL} ({high}) is below {SCALE_MIN_LABEL} ({low})"
            )
        zero = labels.get(SCALE_ZERO_LABEL, "false").lower()
        if zero not in ("true", "false"):
            raise InvalidRequest(f"label {SCALE_ZERO_LABEL} must be true or false, not {zero!r}")
        return cls(
            min_replicas=low,
            max_replicas=high,
            zero=zero == "true",
            zero_duration_s=_duration(labels.get(SCALE_ZERO_DURATION_LABEL)),
            target_rps=_positive(labels, SCALE_TARGET_LABEL, DEFAULT_TARGET_RPS),
        )


@dataclass(frozen=True)
class Setting:
    """A replica's GPU setting."""

    sm_percent: int
    quota: float
    concurrency: int

    @property
    def footprint(self) -> float:
        return self.sm_percent / 100 * self.quota


@dataclass(frozen=True)
class Plan:
    """Replicas, at a setting (None: the function's own, without a profile), and why."""

    replicas: int
    setting: Setting | None
    serves_rps: float  # what the replicas serve within the target, at full load
    reason: str

    @property
    def footprint(self) -> float:
        """SM share x quota summed over the replicas (0 without a setting)."""
        return self.replicas * (self.setting.footprint if self.setting else 0.0)


def plan(
    rate_rps: float,
    capacities: list[Capacity],
    bounds: ScaleBounds,
    current: Setting | None = None,
) -> Plan:
    """The replicas and setting for `rate_rps`: the least footprint that serves it with
    headroom; the function's `current` setting unless another saves SETTING_CHANGE_SAVING of
    the footprint or the current cannot serve the rate. Without capacities, replicas on
    `bounds.target_rps` alone."""
    floor = max(bounds.min_replicas, 1 if rate_rps > 0 else 0)
    if not capacities:
        need = math.ceil(rate_rps / bounds.target_rps) if rate_rps > 0 else 0
        replicas = min(max(need, floor), bounds.max_replicas)
        reason = f"{rate_rps:.1f} req/s at {bounds.target_rps:g} req/s a replica (no profile)" + (
            f"; held at the most, {bounds.max_replicas}" if need > bounds.max_replicas else ""
        )
        return Plan(replicas, None, replicas * bounds.target_rps, reason)
    options = [_option(rate_rps, c, floor, bounds) for c in capacities]
    serving = [o for o in options if o.serves_rps * TARGET_UTILISATION >= rate_rps]
    if not serving:
        best = max(options, key=lambda o: o.serves_rps)
        return Plan(
            best.replicas,
            best.setting,
            best.serves_rps,
            f"{rate_rps:.1f} req/s is past what {bounds.max_replicas} replicas serve within "
            f"the target ({best.serves_rps:.0f} req/s at best): the most it may have",
        )
    best = min(serving, key=lambda o: (o.footprint, o.replicas, -o.setting.sm_percent))  # type: ignore[union-attr]
    kept = next((o for o in serving if o.setting == current), None)
    if kept is not None and kept.footprint <= best.footprint * (1 + SETTING_CHANGE_SAVING):
        best = kept
    assert best.setting is not None
    s = best.setting
    return Plan(
        best.replicas,
        s,
        best.serves_rps,
        f"{rate_rps:.1f} req/s: {best.replicas} x ({s.sm_percent}% SMs, quota {s.quota:g}, "
        f"{s.concurrency} in flight) serve {best.serves_rps:.0f} req/s within the target, "
        f"footprint {best.footprint:.2f} GPU",
    )


def _option(rate_rps: float, capacity: Capacity, floor: int, bounds: ScaleBounds) -> Plan:
    per_replica = capacity.throughput_rps
    need = math.ceil(rate_rps / (per_replica * TARGET_UTILISATION)) if rate_rps > 0 else 0
    replicas = min(max(need, floor), bounds.max_replicas)
    setting = Setting(capacity.sm_percent, capacity.quota, capacity.concurrency)
    return Plan(replicas, setting, replicas * per_replica, "")


@dataclass(frozen=True)
class Learned:
    """What the function's replicas were seen to serve within the target here, against what
    its profile says: the ratio it plans every setting's figure at, and why."""

    sm_percent: int  # the setting it was seen at
    quota: float
    throughput_rps: float  # what one replica of that setting serves here
    profiled_rps: float  # what the profile says it serves
    learned_at: float

    @property
    def ratio(self) -> float:
        return self.throughput_rps / self.profiled_rps

    @property
    def until(self) -> float:
        """When the profile's figures are back."""
        return self.learned_at + LEARNED_HOLD_S

    @property
    def reason(self) -> str:
        return (
            f"planning on {self.ratio:.0%} of its profile's figures for {LEARNED_HOLD_S:g} s "
            f"({self.throughput_rps:.0f} req/s a replica at {self.sm_percent}% SMs, quota "
            f"{self.quota:g}, not {self.profiled_rps:.0f})"
        )


@dataclass(frozen=True)
class Decision:
    """What the autoscaler asks of one function at one tick."""

    plan: Plan
    panic: bool
    stable_rps: float
    panic_rps: float
    learned: Learned | None = None  # what this tick learned, if it learned something
    learned_why: str = ""


Sample = tuple[float, float, float]  # (time, calls so far, of them slower than the target)


class FunctionScaler:
    """One function's rate over the stable and panic windows, and the plan for it."""

    def __init__(self, bounds: ScaleBounds, capacities: list[Capacity]) -> None:
        self.bounds = bounds
        self.capacities = capacities
        self.learned: Learned | None = None  # in place of the profile's figures, while it holds
        self._counts: deque[Sample] = deque()
        self._ready: deque[tuple[float, int]] = deque()  # (time, replicas ready)
        self._panic_until: float | None = None  # in panic until then, unless it triggers again
        self._last_call = 0.0  # when calls were last seen arriving
        self._started: float | None = None

    def observe(self, now: float, calls_total: float, slow_total: float = 0.0) -> None:
        """Record the function's call counter (a total that only grows) at `now`, and how many
        of those calls were slower than its latency target."""
        if self._started is None:
            self._started = self._last_call = now
        if self._counts and calls_total > self._counts[-1][1]:
            self._last_call = now
        self._counts.append((now, calls_total, slow_total))
        while len(self._counts) > 2 and self._counts[1][0] <= now - STABLE_WINDOW_S:
            self._counts.popleft()

    def rate(self, now: float, window_s: float) -> float:
        """Calls per second over the last `window_s` (or what history there is)."""
        if len(self._counts) < 2:
            return 0.0
        return self._rate_between(self._sample_before(now - window_s), self._counts[-1])

    def projected_rate(self, now: float, whole: float) -> float:
        """The panic window's rate, `whole`, carried along its rise to `LEAD_S` from `now`.

        The window is cut in thirds; when the rate rose from each third to the next (a ramp,
        not one step, which the last third already shows whole), the last third's rate plus
        the smaller of the two rises a second, times the time from that third's middle.
        Otherwise `whole`."""
        cuts = [self._sample_before(now - PANIC_WINDOW_S * (3 - i) / 3) for i in range(3)]
        cuts.append(self._counts[-1] if self._counts else cuts[-1])
        if not all(a[0] < b[0] for a, b in itertools.pairwise(cuts)):
            return whole
        thirds = [
            (self._rate_between(a, b), (a[0] + b[0]) / 2) for a, b in itertools.pairwise(cuts)
        ]
        rises = [(r2 - r1) / (t2 - t1) for (r1, t1), (r2, t2) in itertools.pairwise(thirds)]
        rise_per_s = min(rises)
        if rise_per_s <= 0:
            return whole
        last_rate, last_middle = thirds[-1]
        return max(whole, last_rate + rise_per_s * (now - last_middle + LEAD_S))

    def planned_capacities(self, now: float) -> list[Capacity]:
        """The profile's capacities, at the ratio learned since where a lesson holds."""
        if self.learned is not None and self.learned.until <= now:
            self.learned = None
        if self.learned is None:
            return self.capacities
        ratio = self.learned.ratio
        return [
            c.model_copy(update={"throughput_rps": c.throughput_rps * ratio})
            for c in self.capacities
        ]

    def _sample_before(self, time_: float) -> Sample:
        """The last sample recorded at or before `time_`, or the first one."""
        return _last_at(self._counts, time_) if self._counts else (time_, 0.0, 0.0)

    @staticmethod
    def _rate_between(start: Sample, end: Sample) -> float:
        span = end[0] - start[0]
        return max(0.0, end[1] - start[1]) / span if span > 0 else 0.0

    def _busiest(self, since: float) -> tuple[float, int]:
        """The most calls a second one replica carried between two samples since `since`, and
        how many served then (the fewest ready at either end): infinite where none did."""
        samples = [sample for sample in self._counts if sample[0] >= since]
        busiest, serving_then = 0.0, 0
        for a, b in itertools.pairwise(samples):
            serving = min(self._ready_at(a[0]), self._ready_at(b[0]))
            rate = self._rate_between(a, b)
            per_replica = rate / serving if serving else (math.inf if rate else 0.0)
            if per_replica >= busiest:
                busiest, serving_then = per_replica, serving
        return busiest, serving_then

    def _ready_at(self, time_: float) -> int:
        """The replicas ready at the last decision at or before `time_` (or the first kept)."""
        return _last_at(self._ready, time_)[1]

    def _learn(self, now: float, ready: int, current: Setting | None) -> tuple[Learned, str] | None:
        """What the panic window teaches, and why: None unless more than SLOW_RATIO of its
        calls missed the target while `current`'s replicas carried, even at the window's
        busiest, a load they were planned to serve."""
        self._ready.append((now, ready))
        while len(self._ready) > 1 and self._ready[1][0] <= now - PANIC_WINDOW_S:
            self._ready.popleft()
        if current is None or not self._counts:
            return None
        key = (current.sm_percent, current.quota)
        profiled = next((c for c in self.capacities if (c.sm_percent, c.quota) == key), None)
        start, end = self._sample_before(now - PANIC_WINDOW_S), self._counts[-1]
        calls, slow = end[1] - start[1], end[2] - start[2]
        if profiled is None or calls < MIN_CALLS_JUDGED or slow <= SLOW_RATIO * calls:
            return None
        held = self.learned
        if held is not None and start[0] < held.learned_at + LEAD_S:
            return None  # the window began before the replicas asked for then were ready
        per_replica, serving = self._busiest(start[0])
        planned = profiled.throughput_rps * (held.ratio if held else 1.0)
        learned_rps = max(
            per_replica * LEARNED_MARGIN / TARGET_UTILISATION,
            profiled.throughput_rps * LEARNED_FLOOR,
        )
        if learned_rps >= planned:
            return None  # the load outran the replicas: what scaling is for, not a lesson
        self.learned = Learned(
            current.sm_percent, current.quota, learned_rps, profiled.throughput_rps, now
        )
        why = (
            f"{slow:.0f} of {calls:.0f} calls over {PANIC_WINDOW_S:g} s missed the target at "
            f"{per_replica:.1f} req/s a replica at most ({serving} serving), which its plan "
            f"says one serves: {self.learned.reason}"
        )
        return self.learned, why

    def decide(self, now: float, ready: int, current: Setting | None, desired: int) -> Decision:
        """The plan at `now`, with `ready` replicas serving, at setting `current`, `desired`
        asked for so far."""
        lesson = self._learn(now, ready, current)
        capacities = self.planned_capacities(now)
        stable = self.rate(now, STABLE_WINDOW_S)
        panic_rate = self.rate(now, PANIC_WINDOW_S)
        stable_plan = plan(stable, capacities, self.bounds, current)
        ahead = self.projected_rate(now, panic_rate)
        panic_plan = plan(ahead, capacities, self.bounds, current)
        if ahead > panic_rate:  # a ramp: the plan is for where it goes
            panic_plan = Plan(
                panic_plan.replicas,
                panic_plan.setting,
                panic_plan.serves_rps,
                f"rising to {ahead:.1f} req/s in {LEAD_S:g} s: " + panic_plan.reason,
            )
        if panic_plan.replicas >= PANIC_THRESHOLD * max(ready, 1) and panic_plan.replicas > ready:
            self._panic_until = now + STABLE_WINDOW_S
        panicking = self._panic_until is not None and now < self._panic_until
        if not panicking:
            self._panic_until = None
            chosen = stable_plan
            if stable_plan.replicas < desired and panic_plan.replicas > stable_plan.replicas:
                chosen = Plan(  # the 60 s average lags a load that is still rising
                    desired,
                    current,
                    panic_plan.serves_rps,
                    f"holding {desired} replicas: the last {PANIC_WINDOW_S:g} s "
                    f"({panic_rate:.1f} req/s) need more than the {STABLE_WINDOW_S:g} s "
                    f"average ({stable:.1f} req/s)",
                )
        elif panic_plan.replicas >= desired:
            chosen = Plan(
                panic_plan.replicas,
                panic_plan.setting,
                panic_plan.serves_rps,
                f"panic (a burst: {panic_rate:.1f} req/s over {PANIC_WINDOW_S:g} s): "
                + panic_plan.reason,
            )
        else:  # in panic it never scales down
            chosen = Plan(
                desired,
                current,
                panic_plan.serves_rps,
                f"panic: holding {desired} replicas until the burst has passed",
            )
        idle_s = now - self._last_call
        idle = stable == 0 and panic_rate == 0 and idle_s >= self.bounds.zero_duration_s
        if self.bounds.zero and idle and chosen.replicas > 0:
            chosen = Plan(0, chosen.setting, 0.0, f"idle for {idle_s:.0f} s: scaled to zero")
        learned, why = lesson if lesson else (None, "")
        return Decision(chosen, panicking, stable, panic_rate, learned, why)


Timed = TypeVar("Timed", bound=tuple[float, ...])


def _last_at(entries: deque[Timed], time_: float) -> Timed:
    """The last of `entries` (in time order, each led by its time) at or before `time_`, or
    the first one."""
    found = entries[0]
    for entry in entries:
        if entry[0] > time_:
            break
        found = entry
    return found


def _positive(labels: Mapping[str, str], label: str, default: float) -> float:
    text = labels.get(label)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise InvalidRequest(f"label {label} must be a positive number, not {text!r}")
    return value


def _duration(text: str | None) -> float:
    """Seconds in a Go duration as OpenFaaS writes them (`15m`, `30s`, `1h30m`, `90`)."""
    if text is None:
        return DEFAULT_ZERO_DURATION_S
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    total, number, rest = 0.0, "", text.strip()
    if rest.replace(".", "", 1).isdigit():
        return float(rest)
    i = 0
    try:
        while i < len(rest):
            while i < len(rest) and (rest[i].isdigit() or rest[i] == "."):
                number += rest[i]
                i += 1
            unit = "ms" if rest[i : i + 2] == "ms" else rest[i]
            i += len(unit)
            total += float(number) * units[unit]
            number = ""
    except (IndexError, KeyError, ValueError):
        raise InvalidRequest(
            f"label {SCALE_ZERO_DURATION_LABEL} must be a duration such as 15m or 30s, not {text!r}"
        ) from None
    return total
