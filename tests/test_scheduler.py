"""The time-quota scheduler with numbers: shares, priority, SM packing, debt."""

from __future__ import annotations

import heapq

import pytest

from faas_provider.gate.scheduler import QuotaScheduler

WINDOW = 0.1


def simulate(
    clients: dict[str, tuple[int, float, float]], work_s: float, seconds: float = 20.0
) -> dict[str, float]:
    """Greedy clients (each always has work of `work_s` to run) behind gates; shares of time.

    A gate starts work only while its lease lasts, lets started work finish past it, then
    renews its lease or, refused, releases and asks again: what the real gate does per request.
    """
    scheduler = QuotaScheduler(WINDOW)
    for name, (sm, request, limit) in clients.items():
        scheduler.register(name, sm, request, limit)
        scheduler.want(name, 0.0)
    busy = dict.fromkeys(clients, 0.0)
    events: list[tuple[float, str, float]] = []  # (time, client, lease_end)
    now = 0.0
    while now < seconds:
        for grant in scheduler.schedule(now):
            heapq.heappush(events, (now, grant.client, grant.lease_end))
        if not events:
            now = scheduler.window_end
            continue
        start, name, lease_end = heapq.heappop(events)
        now = start
        end = start
        while end < lease_end:  # back-to-back work while the lease lasts
            end += work_s
        busy[name] += end - start
        # the release happens at `end`; run the scheduler's clock forward in order
        heapq.heappush(events, (end, f"release:{name}", 0.0))
        while events and events[0][1].startswith("release:"):
            at, tag, _ = heapq.heappop(events)
            now = at
            client = tag.removeprefix("release:")
            if (renewal := scheduler.renew(client, now)) is not None:
                heapq.heappush(events, (now, client, renewal.lease_end))
                continue
            scheduler.release(client, now)
            scheduler.want(client, now)
            for grant in scheduler.schedule(now):
                heapq.heappush(events, (now, grant.client, grant.lease_end))
    return {name: spent / now for name, spent in busy.items()}


def test_limits_split_an_exclusive_gpu() -> None:
    shares = simulate({"a": (100, 0.3, 0.3), "b": (100, 0.7, 0.7)}, work_s=0.005)
    assert shares["a"] == pytest.approx(0.3, abs=0.05)
    assert shares["b"] == pytest.approx(0.7, abs=0.05)


def test_nobody_passes_its_limit_even_alone() -> None:
    shares = simulate({"a": (100, 0.2, 0.4)}, work_s=0.004)
    assert shares["a"] == pytest.approx(0.4, abs=0.03)


def test_a_request_is_kept_against_greedy_neighbours() -> None:
    clients = {"guaranteed": (100, 0.5, 1.0)}
    clients |= {f"greedy{i}": (100, 0.1, 1.0) for i in range(3)}
    shares = simulate(clients, work_s=0.005)
    assert shares["guaranteed"] >= 0.45
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.05)


def test_partitions_that_fit_run_at_once() -> None:
    clients = {f"f{i}": (14, 1.0, 1.0) for i in range(7)}  # 7 x 14% = 98% of the SMs
    shares = simulate(clients, work_s=0.007)
    for share in shares.values():
        assert share == pytest.approx(1.0, abs=0.08)


def test_partitions_that_do_not_fit_take_turns() -> None:
    clients = {f"f{i}": (60, 1.0, 1.0) for i in range(2)}
    shares = simulate(clients, work_s=0.005)
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.06)
    assert shares["f0"] == pytest.approx(shares["f1"], abs=0.1)


def test_work_past_the_lease_is_debt_in_the_next_window() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("a", 100, 0.5, 0.5)
    scheduler.want("a", 0.0)
    (grant,) = scheduler.schedule(0.0)
    assert grant.lease_end == pytest.approx(0.05)
    scheduler.release("a", 0.17)  # ran 120 ms past its lease, into the next window
    # window 0 charged 100 ms, 50 over the limit: that debt and 70 ms more in window 1
    assert scheduler.used("a", 0.17) == pytest.approx(0.05 + 0.07, abs=1e-9)
    scheduler.want("a", 0.17)
    assert scheduler.schedule(0.17) == [], "over its limit for this window: no token"
    assert scheduler.schedule(0.2) == [], "70 ms of debt still exceed a 50 ms budget"
    assert scheduler.used("a", 0.2) == pytest.approx(0.07, abs=1e-9)
    (grant,) = scheduler.schedule(0.31)  # 20 ms of debt left: 30 ms of lease
    assert grant.lease_end == pytest.approx(0.34, abs=1e-9)


def test_the_first_in_line_is_not_overtaken_by_smaller_partitions() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("big", 80, 0.5, 1.0)
    scheduler.register("holder", 30, 0.5, 1.0)
    scheduler.register("small", 10, 0.1, 1.0)
    scheduler.want("holder", 0.0)
    assert [g.client for g in scheduler.schedule(0.0)] == ["holder"]
    scheduler.want("big", 0.001)
    scheduler.want("small", 0.002)
    assert scheduler.schedule(0.002) == [], "small must not overtake big, who waits for room"
    scheduler.release("holder", 0.01)
    assert [g.client for g in scheduler.schedule(0.01)] == ["big", "small"]


def test_a_lease_is_renewed_while_nobody_else_could_run() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("holder", 50, 0.2, 0.6)
    scheduler.register("neighbour", 50, 0.5, 1.0)
    scheduler.want("holder", 0.0)
    (grant,) = scheduler.schedule(0.0)
    assert grant.lease_end == pytest.approx(0.02)  # its request first
    renewal = scheduler.renew("holder", 0.02)
    assert renewal is not None
    assert renewal.lease_end == pytest.approx(0.06)  # then the rest of its limit
    assert scheduler.renew("holder", 0.06) is None, "its limit is spent for this window"
    # It held on to 0.1 (its request ran on): 40 ms over its limit, carried as debt.
    renewal = scheduler.renew("holder", 0.1)  # a new window, never having let go
    assert renewal is not None
    assert renewal.lease_end == pytest.approx(0.12)  # 60 ms of limit less 40 of debt
    assert scheduler.used("holder", 0.11) == pytest.approx(0.05)

    scheduler.register("big", 80, 0.5, 1.0)  # does not fit beside the holder
    scheduler.want("big", 0.11)
    assert scheduler.schedule(0.11) == []
    assert scheduler.renew("holder", 0.12) is None, "someone who could run waits: step aside"
    scheduler.release("holder", 0.125)
    assert [g.client for g in scheduler.schedule(0.125)] == ["big"]
    assert scheduler.renew("neighbour", 0.13) is None, "only a holder renews"


def test_an_idle_holder_keeps_its_token_and_is_not_charged_while_idle() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("a", 60, 1.0, 1.0)
    scheduler.register("b", 60, 1.0, 1.0)
    scheduler.want("a", 0.0)
    assert [g.client for g in scheduler.schedule(0.0)] == ["a"]
    scheduler.idle("a", 0.01)
    assert scheduler.used("a", 0.05) == pytest.approx(0.01)
    # Idle across two windows' ends: nothing charged, so nothing left once the debt-free
    # windows have passed (held busy all along it would owe 70 ms in this window).
    assert scheduler.used("a", 0.25) == 0.0
    scheduler.busy("a", 0.25)
    assert scheduler.used("a", 0.27) == pytest.approx(0.02)
    assert scheduler.in_the_way(0.27) == [], "nobody waits"
    scheduler.idle("a", 0.28)
    scheduler.want("b", 0.28)
    assert scheduler.schedule(0.28) == [], "the idle holder still keeps its room"


def test_holders_in_the_way_of_a_waiting_client_are_asked_to_yield() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("idle", 40, 1.0, 1.0)
    scheduler.register("busy", 30, 1.0, 1.0)
    scheduler.register("waiter", 50, 1.0, 1.0)
    for client in ("idle", "busy"):
        scheduler.want(client, 0.0)
    assert len(scheduler.schedule(0.0)) == 2
    assert scheduler.in_the_way(0.0) == [], "nobody waits"
    scheduler.idle("idle", 0.01)
    scheduler.want("waiter", 0.02)
    assert scheduler.schedule(0.02) == []
    # The idle one gives its token back; the busy one starts nothing past its lease.
    assert scheduler.in_the_way(0.02) == ["idle", "busy"]
    scheduler.release("idle", 0.031)
    assert [g.client for g in scheduler.schedule(0.031)] == ["waiter"]
    assert scheduler.in_the_way(0.031) == [], "the waiter runs: nobody waits"


def test_a_waiter_without_budget_does_not_move_idle_holders() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("idle", 100, 1.0, 1.0)
    scheduler.register("spent", 100, 0.1, 0.1)
    scheduler.want("spent", 0.0)
    scheduler.schedule(0.0)
    scheduler.release("spent", 0.01)  # its 10 ms of this window are used
    scheduler.want("idle", 0.01)
    scheduler.schedule(0.01)
    scheduler.idle("idle", 0.02)
    scheduler.want("spent", 0.03)
    assert scheduler.in_the_way(0.03) == [], "it could not run before the next window anyway"
    assert scheduler.in_the_way(0.1) == ["idle"], "a new window: now it could"


def test_bad_shares_are_refused() -> None:
    scheduler = QuotaScheduler(WINDOW)
    for sm, request, limit in ((0, 0.5, 1.0), (50, 0.6, 0.5), (50, 0.0, 1.0), (101, 1, 1)):
        with pytest.raises(ValueError):
            scheduler.register("x", sm, request, limit)


def test_running_past_the_lease_while_another_waits_is_debt_even_under_the_limit() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("kept", 100, 0.6, 1.0)
    scheduler.register("greedy", 100, 0.1, 1.0)
    scheduler.want("greedy", 0.0)
    (grant,) = scheduler.schedule(0.0)
    assert grant.lease_end == pytest.approx(0.01)
    scheduler.want("kept", 0.005)
    assert scheduler.schedule(0.005) == []
    # Four requests in flight drain 30 ms past the lease while kept, who could run, waits.
    scheduler.release("greedy", 0.04)
    (grant,) = scheduler.schedule(0.04)
    assert grant.client == "kept"
    scheduler.release("kept", 0.1)
    # 40 ms is well under greedy's limit of 100, but 30 of them were kept's: they are owed.
    assert scheduler.used("greedy", 0.1) == pytest.approx(0.03)
    assert scheduler.used("kept", 0.1) == 0.0, "kept ran within its lease"
    scheduler.want("greedy", 0.1)
    scheduler.want("kept", 0.1)
    assert [g.client for g in scheduler.schedule(0.1)] == ["kept"], "greedy has no request left"


def test_overrun_counts_only_while_someone_who_could_run_waits() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("kept", 100, 0.6, 1.0)
    scheduler.register("greedy", 100, 0.1, 1.0)
    scheduler.want("greedy", 0.0)
    scheduler.schedule(0.0)  # a 10 ms lease
    scheduler.want("kept", 0.03)  # kept waits from 30 ms on
    scheduler.release("greedy", 0.045)
    assert scheduler.used("greedy", 0.1) == pytest.approx(0.015), "from 30 ms to 45 ms"

    alone = QuotaScheduler(WINDOW)
    alone.register("greedy", 100, 0.1, 1.0)
    alone.want("greedy", 0.0)
    alone.schedule(0.0)
    alone.release("greedy", 0.045)  # 35 ms past its lease, but nobody waited
    assert alone.used("greedy", 0.1) == 0.0, "under its limit and nobody's time: forgiven"


def test_overrun_its_request_paid_for_is_not_owed_again() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("kept", 100, 0.6, 1.0)
    scheduler.register("greedy", 100, 0.1, 1.0)
    scheduler.want("kept", 0.06)
    (grant,) = scheduler.schedule(0.06)
    assert grant.lease_end == pytest.approx(0.1), "to the window's end"
    scheduler.want("greedy", 0.08)
    scheduler.release("kept", 0.105)  # drained 5 ms into the next window while greedy waited
    assert scheduler.used("kept", 0.105) == pytest.approx(0.005), "charged in this window"
    scheduler.want("kept", 0.105)
    assert [g.client for g in scheduler.schedule(0.105)] == ["greedy"]
    scheduler.release("greedy", 0.115)
    (grant,) = scheduler.schedule(0.115)
    assert grant.lease_end == pytest.approx(0.17), "55 ms: the rest of its 60"
    scheduler.release("kept", 0.17)
    assert scheduler.used("kept", 0.2) == 0.0, "its request paid for the 5 ms: no debt"


def test_charged_totals_count_every_busy_second_once_across_windows() -> None:
    scheduler = QuotaScheduler(WINDOW)
    scheduler.register("a", 100, 0.5, 1.0)
    scheduler.want("a", 0.0)
    assert [g.client for g in scheduler.schedule(0.0)] == ["a"]
    assert scheduler.charged_total(0.25) == pytest.approx({"a": 0.25}), "busy across 2 rolls"
    scheduler.idle("a", 0.25)
    assert scheduler.charged_total(1.0) == pytest.approx({"a": 0.25}), "idle time is free"
    scheduler.busy("a", 1.0)
    scheduler.release("a", 1.02)
    assert scheduler.charged_total(5.0) == pytest.approx({"a": 0.27}), "nothing is forgiven"
