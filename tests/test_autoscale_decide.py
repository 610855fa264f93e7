"""The autoscaler's decisions with numbers: the least footprint that serves a rate, a setting
kept unless another saves enough, the OpenFaaS bounds, and the stable and panic windows over
steady, flapping, bursting, ramping and idle rates, with synthetic profiles and the one recorded
on an H200; and what calls slower than the target teach it, and what they do not."""

from __future__ import annotations

import itertools
import math

import pytest

from faas_provider.autoscale.decide import (
    LEAD_S,
    LEARNED_HOLD_S,
    PANIC_WINDOW_S,
    STABLE_WINDOW_S,
    Decision,
    FunctionScaler,
    ScaleBounds,
    Setting,
    plan,
)
from faas_provider.errors import InvalidRequest
from faas_provider.profile.model import Capacity, Profile
from tests.conftest import REPO

# one replica's throughput within the target at each (SM partition, quota), as a profile says
CAPACITIES = [
    Capacity(sm_percent=100, quota=1.0, concurrency=8, throughput_rps=1000, p99_ms=20),
    Capacity(sm_percent=50, quota=1.0, concurrency=8, throughput_rps=800, p99_ms=25),
    Capacity(sm_percent=25, quota=1.0, concurrency=4, throughput_rps=450, p99_ms=30),
    Capacity(sm_percent=25, quota=0.5, concurrency=2, throughput_rps=200, p99_ms=45),
]
BOUNDS = ScaleBounds(min_replicas=1, max_replicas=20)


def test_the_least_footprint_that_serves_the_rate_with_headroom() -> None:
    low = plan(300, CAPACITIES, BOUNDS)  # 25% x 1.0 serves 450 x 0.7 = 315 alone
    assert (low.replicas, low.setting) == (1, Setting(25, 1.0, 4))
    assert low.footprint == pytest.approx(0.25)
    high = plan(2000, CAPACITIES, BOUNDS)  # 7 x 0.25 = 1.75 beats 4 x 0.5 and 3 x 1.0
    assert (high.replicas, high.setting) == (7, Setting(25, 1.0, 4))
    assert high.footprint == pytest.approx(1.75)
    assert "2000.0 req/s: 7 x (25% SMs, quota 1, 4 in flight)" in high.reason


def test_a_setting_is_kept_unless_another_saves_a_fifth_of_the_footprint() -> None:
    # 500 req/s: 25% x 1.0 needs 2 (0.5 GPU); 50% x 1.0 needs 1 (0.5): kept where it is
    kept = plan(500, CAPACITIES, BOUNDS, current=Setting(50, 1.0, 8))
    assert kept.setting == Setting(50, 1.0, 8) and kept.replicas == 1
    # 300 req/s: 25% alone (0.25) saves half of 50%'s 0.5: it changes
    changed = plan(300, CAPACITIES, BOUNDS, current=Setting(50, 1.0, 8))
    assert changed.setting == Setting(25, 1.0, 4)


def test_past_the_most_replicas_it_takes_the_setting_that_serves_most() -> None:
    capped = plan(20_000, CAPACITIES, ScaleBounds(max_replicas=5))
    assert capped.replicas == 5 and capped.setting == Setting(100, 1.0, 8)
    assert "past what 5 replicas serve" in capped.reason


def test_without_a_profile_replicas_follow_the_target_per_replica() -> None:
    bounds = ScaleBounds(min_replicas=1, max_replicas=4, target_rps=50)
    assert plan(120, [], bounds).replicas == 3
    assert plan(0, [], bounds).replicas == 1, "never under com.openfaas.scale.min"
    assert (
        plan(1000, [], bounds).replicas == 4 and "held at the most" in plan(1000, [], bounds).reason
    )
    assert "no profile" in plan(120, [], bounds).reason


def test_the_openfaas_labels() -> None:
    bounds = ScaleBounds.from_labels(
        {
            "com.openfaas.scale.min": "2",
            "com.openfaas.scale.max": "9",
            "com.openfaas.scale.zero": "true",
            "com.openfaas.scale.zero-duration": "1h30m",
            "com.openfaas.scale.target": "80",
        }
    )
    assert bounds == ScaleBounds(2, 9, True, 5400.0, 80.0)
    assert ScaleBounds.from_labels({}) == ScaleBounds(1, 20, False, 900.0, 50.0)
    assert (
        ScaleBounds.from_labels({"com.openfaas.scale.zero-duration": "30s"}).zero_duration_s == 30
    )
    for labels, named in (
        ({"com.openfaas.scale.max": "x"}, "com.openfaas.scale.max"),
        ({"com.openfaas.scale.min": "3", "com.openfaas.scale.max": "2"}, "is below"),
        ({"com.openfaas.scale.zero": "yes"}, "com.openfaas.scale.zero must be"),
        ({"com.openfaas.scale.zero-duration": "soon"}, "such as 15m"),
        ({"com.openfaas.scale.target": "-1"}, "com.openfaas.scale.target"),
    ):
        with pytest.raises(InvalidRequest, match=named):
            ScaleBounds.from_labels(labels)


def run(
    scaler: FunctionScaler, rates: list[float], tick_s: float = 2.0, start: float = 0.0
) -> list[int]:
    """Feed `rates` (req/s, one per tick) to `scaler` as a growing call counter, applying
    each decision at once; the replicas asked for after each tick."""
    calls, desired, asked = 0.0, 1, []
    scaler.observe(start, calls)
    for i, rate in enumerate(rates, start=1):
        calls += rate * tick_s
        now = start + i * tick_s
        scaler.observe(now, calls)
        decision = scaler.decide(now, ready=desired, current=None, desired=desired)
        desired = decision.plan.replicas
        asked.append(desired)
    return asked


def test_a_steady_rate_settles_and_a_flapping_one_does_not_flap() -> None:
    steady = run(FunctionScaler(BOUNDS, []), [100.0] * 60)
    assert set(steady[5:]) == {2}, "100 req/s at 50 a replica"
    flapping = run(FunctionScaler(BOUNDS, []), [40.0, 160.0] * 60)
    assert len(set(flapping[40:])) == 1, f"the stable window averages it out: {flapping[40:]}"
    assert flapping[-1] == 2


def test_a_burst_is_followed_within_the_panic_window_and_held_after_it() -> None:
    tick = 2.0
    quiet, burst = [50.0] * 40, [1000.0] * 10
    asked = run(FunctionScaler(BOUNDS, []), quiet + burst + quiet * 3, tick)
    before = len(quiet)
    assert asked[before - 1] == 1
    reached = next(i for i in range(before, len(asked)) if asked[i] >= 20) - before
    assert reached * tick <= PANIC_WINDOW_S, f"panic follows a burst within its window: {asked}"
    # Knative's rule: panic lasts a stable window past the last tick over the threshold (the
    # burst's first), and never scales down meanwhile
    held = int(STABLE_WINDOW_S / tick) - 1
    assert min(asked[before + reached : before + held]) == 20, f"held in panic: {asked}"
    assert asked[before + held + 1] < 20, "then the stable window's rate rules"
    assert asked[-1] == 1, "back down once the stable window has passed"


def test_idle_functions_go_to_zero_only_when_their_labels_allow() -> None:
    zero = ScaleBounds(min_replicas=1, zero=True, zero_duration_s=30)
    asked = run(FunctionScaler(zero, []), [10.0] * 10 + [0.0] * 60)
    idle_from = 10
    assert asked[idle_from] == 1
    first_zero = asked.index(0)
    idle_s = (first_zero - idle_from + 1) * 2.0
    assert idle_s == max(STABLE_WINDOW_S, 30), "no call in the stable window nor the idle period"
    assert set(asked[idle_from:first_zero]) == {1} and set(asked[first_zero:]) == {0}
    assert asked[-1] == 0
    kept = run(FunctionScaler(ScaleBounds(min_replicas=1), []), [10.0] * 10 + [0.0] * 60)
    assert kept[-1] == 1, "without com.openfaas.scale.zero it keeps its minimum"


def test_with_a_profile_the_setting_follows_the_rate() -> None:
    scaler = FunctionScaler(BOUNDS, CAPACITIES)
    for now, calls in ((0.0, 0.0), (60.0, 300 * 60.0)):
        scaler.observe(now, calls)
    decision = scaler.decide(60.0, ready=1, current=None, desired=1)
    assert decision.stable_rps == pytest.approx(300)
    assert decision.plan.setting == Setting(25, 1.0, 4) and decision.plan.replicas == 1


def test_a_rising_ramp_never_scales_down_while_it_rises() -> None:
    # 50 -> 1500 req/s over 120 s, then steady: the 60 s average lags the ramp all the way up,
    # so once a panic early in the ramp has ended the stable plan alone would ask for fewer
    ticks = 60
    up = [50.0 + (1500.0 - 50.0) * i / ticks for i in range(ticks)] + [1500.0] * 60
    down = list(reversed(up)) + [50.0] * 60
    asked = run(FunctionScaler(ScaleBounds(min_replicas=1, max_replicas=40), []), up + down)
    rising = asked[: len(up)]
    drops = [(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(rising)) if b < a]
    assert not drops, f"scaled down at (tick, from, to) {drops}: {rising}"
    assert rising[-1] == 30, "1500 req/s at 50 a replica"
    assert asked[-1] == 1, f"and down again once the load has gone: {asked[len(up) :]}"


@pytest.mark.parametrize(("low", "top"), [(50.0, 1500.0), (10.0, 100.0)], ids=["steep", "gentle"])
def test_a_rising_load_is_planned_for_when_new_replicas_are_ready(low: float, top: float) -> None:
    # low -> top req/s over 60 s: the 6 s average lags the load by 3 s, and what is asked now
    # must serve until the next tick's replicas have started (LEAD_S), so planning on the
    # average (steep), or entering panic on it (gentle), leaves the replicas short
    tick, ticks = 2.0, 30
    up = [low + (top - low) * i / ticks for i in range(ticks)] + [top] * 10
    asked = run(FunctionScaler(ScaleBounds(min_replicas=1, max_replicas=40), []), up, tick)
    ready_ticks = math.ceil(LEAD_S / tick)  # asked at tick i, it serves until i + ready_ticks
    history = int(PANIC_WINDOW_S / tick)  # from when the panic window has a rise to read
    short = [
        (i, asked[i], math.ceil(up[i + ready_ticks] / 50))
        for i in range(history, len(up) - ready_ticks)
        if asked[i] < math.ceil(up[i + ready_ticks] / 50)
    ]
    assert not short, f"(tick, asked, needed once ready) {short}: {asked}"


def test_a_step_is_not_carried_forward_as_a_ramp() -> None:
    # 50 -> 1000 req/s at once: panic follows it, but asks for no more than 1000 req/s need
    asked = run(FunctionScaler(ScaleBounds(min_replicas=1, max_replicas=100), []),
                [50.0] * 40 + [1000.0] * 40)  # fmt: skip
    assert max(asked) == 20, f"1000 req/s at 50 a replica: {asked[38:]}"


def test_decisions_from_the_recorded_h200_profile() -> None:
    # benchmarks/results/profile-resnet50.json, measured on an H200: one replica serves about
    # as much at 12% of the SMs as at 100%, so the least footprint is many small replicas
    recorded = REPO / "benchmarks" / "results" / "profile-resnet50.json"
    profile = Profile.model_validate_json(recorded.read_text())
    assert profile.gpu_model == "NVIDIA H200"
    capacities = profile.capacities(50)
    bounds = ScaleBounds(max_replicas=20)
    at_peak = plan(1500, capacities, bounds)
    assert (at_peak.replicas, at_peak.setting.sm_percent) == (4, 12)  # type: ignore[union-attr]
    assert at_peak.footprint == pytest.approx(0.48)
    ramp = [50.0 + 1450.0 * i / 30 for i in range(30)] + [1500.0] * 30
    asked = run(FunctionScaler(bounds, capacities), ramp + list(reversed(ramp)) + [50.0] * 40)
    rising = asked[: len(ramp)]
    assert rising == sorted(rising) and max(asked) == 4 and asked[-1] == 1, asked


class Fed:
    """A scaler with one setting, AT, fed a call counter and a slow-call counter, tick by
    tick."""

    AT = Setting(25, 1.0, 4)  # 450 req/s a replica within the target, as CAPACITIES say

    def __init__(self) -> None:
        self.scaler = FunctionScaler(BOUNDS, [CAPACITIES[2]])
        self.now = self.calls = self.slow = 0.0
        self.desired = 1
        self.scaler.observe(0.0, 0.0, 0.0)

    def feed(
        self, ticks: int, rate: float, slow_ratio: float = 0.0, ready: int | None = None
    ) -> list[Decision]:
        """`ticks` of 2 s at `rate` req/s, `slow_ratio` of them slower than the target, with
        `ready` replicas serving (None: what was asked, at once)."""
        decisions = []
        for _ in range(ticks):
            self.now += 2.0
            self.calls += rate * 2.0
            self.slow += rate * 2.0 * slow_ratio
            self.scaler.observe(self.now, self.calls, self.slow)
            serving = self.desired if ready is None else ready
            decision = self.scaler.decide(self.now, serving, self.AT, self.desired)
            self.desired = decision.plan.replicas
            decisions.append(decision)
        return decisions


def test_misses_at_a_load_its_plan_serves_teach_what_a_replica_serves_here() -> None:
    fed = Fed()
    assert {d.plan.replicas for d in fed.feed(40, 300.0)} == {1}, "300 <= 0.7 x 450"
    missed = fed.feed(3, 300.0, slow_ratio=0.03)
    (lesson,) = [d.learned for d in missed if d.learned]
    # 300 req/s a replica missed: planned at 85% of that, it serves 300 x 0.85 / 0.7
    assert lesson.throughput_rps == pytest.approx(300 * 0.85 / 0.7)
    assert lesson.profiled_rps == 450 and (lesson.sm_percent, lesson.quota) == (25, 1.0)
    (why,) = [d.learned_why for d in missed if d.learned]
    assert "missed the target at 300.0 req/s a replica at most (1 serving)" in why
    assert "planning on 81% of its profile's figures for 300 s (364 req/s a replica" in why
    assert missed[-1].plan.replicas == 2, "300 req/s at 0.7 x 364 a replica"
    held = fed.feed(int(LEARNED_HOLD_S / 2) - 10, 300.0)
    assert {d.plan.replicas for d in held} == {2}, "it holds while the lesson does"
    after = fed.feed(20, 300.0)
    assert after[-1].plan.replicas == 1 and not fed.scaler.learned, "then the profile again"


def test_a_lesson_applies_to_every_setting_of_the_profile() -> None:
    scaler = FunctionScaler(BOUNDS, CAPACITIES)
    scaler.observe(0.0, 0.0, 0.0)
    for now in range(2, 82, 2):  # 300 req/s at 25%, quota 1; the last 3 ticks 3% slow
        scaler.observe(now, 300.0 * now, 300.0 * 2 * 0.03 * max(0, (now - 74) // 2))
        decision = scaler.decide(now, 1, Fed.AT, 1)
    assert scaler.learned is not None
    planned = {(c.sm_percent, c.quota): c.throughput_rps for c in scaler.planned_capacities(80)}
    ratio = 300 * 0.85 / 0.7 / 450
    assert planned == {(c.sm_percent, c.quota): pytest.approx(c.throughput_rps * ratio)
                       for c in CAPACITIES}  # fmt: skip
    assert decision.plan.serves_rps * 0.7 >= 300


def test_misses_while_the_load_outruns_the_replicas_teach_nothing() -> None:
    fed = Fed()
    fed.feed(40, 300.0)
    # 800 req/s on the one replica still serving: past its plan, which more replicas are for
    outran = fed.feed(10, 800.0, slow_ratio=0.2, ready=1)
    assert not any(d.learned for d in outran) and not fed.scaler.learned
    assert outran[-1].plan.replicas == math.ceil(800 / (450 * 0.7))
    # a burst in the window's last 2 s: over the 6 s, 267 req/s a replica, within its plan;
    # at the burst, 600, past it
    burst = Fed()
    burst.feed(40, 100.0)
    burst.feed(2, 100.0)
    (at_burst,) = burst.feed(1, 600.0, slow_ratio=0.3, ready=1)
    assert at_burst.learned is None and burst.scaler.learned is None


def test_too_few_calls_are_not_judged() -> None:
    fed = Fed()
    few = fed.feed(40, 20.0, slow_ratio=0.5)  # 120 calls a window
    assert not any(d.learned for d in few)


def test_a_lesson_waits_for_the_replicas_it_asked_for_and_never_goes_below_half() -> None:
    fed = Fed()
    fed.feed(40, 300.0)
    lessons = [d.learned for d in fed.feed(30, 300.0, slow_ratio=0.05) if d.learned]
    first, second = lessons
    # the second replica came at once: the windows that still hold the first misses, shared
    # by two, would teach less again; only a window that began LEAD_S after the lesson does
    assert second.learned_at - PANIC_WINDOW_S >= first.learned_at + LEAD_S
    assert second.learned_at - PANIC_WINDOW_S < first.learned_at + LEAD_S + 2.0
    # missed at 150 req/s a replica: 150 x 0.85 / 0.7 = 182 is below half of 450
    assert second.ratio == 0.5 and second.throughput_rps == 225, "never below half the profile"
