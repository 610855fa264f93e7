"""The time-quota scheduler of one GPU: who may run now, for how long. Pure logic, no I/O.

Time is cut into windows (default 100 ms). A replica ("client") may run only while it holds a
token; the time from grant to release is charged to it. Those under their guaranteed request
are served first (least served first), then those under their limit; nobody is granted past its
limit. Tokens are not exclusive: several clients hold them at once as long as their SM
partitions sum to at most 100, so temporal sharing keeps what MPS's spatial sharing gains.
A lease ends at the window's end or when the client's current budget (request, then limit) is
spent; work that runs on past it is charged all the same. Into the next window a client
carries as debt what its window's charge exceeds its limit by, or, if more, the time it ran
past its lease while a client that could run waited, as far as its charge passed its request:
time taken from others, which a limit of 1 would otherwise forgive. (Overrun within its
request has cost it its own budget already, as time run past a window's end does in the
next.) A holder whose lease ran out may renew
it without giving the token back while its budget allows and no one else can be served: then
its replica never stalls at a window's edge. A holder may also go idle and keep its token,
uncharged, so that its next request needs no new grant. When a client with budget waits for
the room holders keep, `in_the_way` names them, to be asked to yield: an idle holder gives its
token back, a busy one starts no work that would run past its lease (work it cannot stop once
started, so the overrun is bounded where it begins).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_LEASE_S = 0.001  # less budget than this left counts as none: no lease that short


@dataclass
class _Client:
    sm_percent: int
    request: float
    limit: float
    used_s: float = 0.0
    waiting_since: float | None = None
    holding: bool = False
    busy_since: float | None = None  # holding and charged since; None while it idles
    total_s: float = 0.0  # every second charged since it registered, none forgiven
    lease_end: float = 0.0  # of its last grant or renewal
    overrun_s: float = 0.0  # run past its lease in this window while another could run


@dataclass(frozen=True)
class Grant:
    """A token handed to `client`, valid until `lease_end` (scheduler time, seconds)."""

    client: str
    lease_end: float


class QuotaScheduler:
    """Tokens of one GPU. Every method takes the current time; times are seconds."""

    def __init__(self, window_s: float = 0.1, now: float = 0.0) -> None:
        if window_s <= 0:
            raise ValueError("the window must be longer than 0 s")
        self.window_s = window_s
        self._origin = now
        self._windows = 1
        self.window_end = now + window_s
        self._clients: dict[str, _Client] = {}

    def register(self, client: str, sm_percent: int, request: float, limit: float) -> None:
        """Add a client with its SM partition (1..100), request and limit (0 < r <= l <= 1)."""
        if not (1 <= sm_percent <= 100 and 0 < request <= limit <= 1):
            raise ValueError(f"bad share for {client}: sm {sm_percent}, {request}..{limit}")
        self._clients[client] = _Client(sm_percent, request, limit)

    def unregister(self, client: str, now: float) -> None:
        """Remove a client, returning its token if it held one."""
        self.release(client, now)
        self._clients.pop(client, None)

    def want(self, client: str, now: float) -> None:
        """The client asks for a token (it is granted by a later `schedule`)."""
        self._roll(now)
        state = self._clients[client]
        if not state.holding and state.waiting_since is None:
            state.waiting_since = now

    def release(self, client: str, now: float) -> None:
        """The client gives its token back; the time it held it busy is charged."""
        self.idle(client, now)
        state = self._clients.get(client)
        if state is not None:
            state.holding = False

    def idle(self, client: str, now: float) -> None:
        """The holder has no work running: it keeps its token, and its room, uncharged."""
        self._roll(now)
        state = self._clients.get(client)
        if state is not None and state.busy_since is not None:
            state.overrun_s += self._overrun(state, now)
            state.used_s += now - state.busy_since
            state.total_s += now - state.busy_since
            state.busy_since = None

    def busy(self, client: str, now: float) -> None:
        """An idle holder runs work again: its time is charged from `now`."""
        self._roll(now)
        state = self._clients.get(client)
        if state is not None and state.holding and state.busy_since is None:
            state.busy_since = now

    def schedule(self, now: float) -> list[Grant]:
        """Grant tokens to waiting clients as priority and free SMs allow."""
        self._roll(now)
        holders = [c for c in self._clients.values() if c.holding]
        free_sm = 100 - sum(c.sm_percent for c in holders)
        guaranteed: list[tuple[float, float, str]] = []
        best_effort: list[tuple[float, float, str]] = []
        for name, state in self._clients.items():
            if state.waiting_since is None:
                continue
            if state.used_s + MIN_LEASE_S <= state.request * self.window_s:
                share = state.used_s / (state.request * self.window_s)
                guaranteed.append((share, state.waiting_since, name))
            elif state.used_s + MIN_LEASE_S <= state.limit * self.window_s:
                share = state.used_s / (state.limit * self.window_s)
                best_effort.append((share, state.waiting_since, name))
        grants = []
        for _, _, name in sorted(guaranteed) + sorted(best_effort):
            state = self._clients[name]
            if state.sm_percent > free_sm:
                return grants  # the first in line waits for room: nobody overtakes it
            lease_end = self._lease_end(state, state.used_s, now)
            assert lease_end is not None  # it is in a tier: it has budget
            free_sm -= state.sm_percent
            state.waiting_since = None
            state.holding, state.busy_since, state.lease_end = True, now, lease_end
            grants.append(Grant(name, lease_end))
        return grants

    def in_the_way(self, now: float) -> list[str]:
        """The holders to ask to yield: all of them while a client that has budget waits
        (after `schedule`, it waits for room). An idle one gives its token back at once; a busy
        one starts no work that would run past its lease, and is refused renewal."""
        self._roll(now)
        if not self._a_waiter_could_run(now):
            return []
        return [name for name, c in self._clients.items() if c.holding]

    def renew(self, client: str, now: float) -> Grant | None:
        """A new lease for a holder whose lease ran out, without giving its token back; None
        (it must release) when its budget is spent or another client could be served."""
        self._roll(now)
        state = self._clients.get(client)
        if state is None or not state.holding:
            return None
        if self._a_waiter_could_run(now):
            return None  # someone who could run now waits: the holder steps aside
        lease_end = self._lease_end(state, self._charged(state, now), now)
        if lease_end is None:
            return None
        state.lease_end = lease_end
        return Grant(client, lease_end)

    def waiting(self) -> bool:
        """Whether some client waits for a token (then schedule again at `window_end`)."""
        return any(c.waiting_since is not None for c in self._clients.values())

    def _a_waiter_could_run(self, now: float) -> bool:
        """Whether a client that waits for a token has budget left in this window."""
        return any(
            state.waiting_since is not None
            and self._lease_end(state, state.used_s, now) is not None
            for state in self._clients.values()
        )

    def _lease_end(self, state: _Client, used_s: float, now: float) -> float | None:
        """Until when a client that has used `used_s` may run: the rest of its request, else
        of its limit, within this window; None when it has no budget left."""
        for fraction in (state.request, state.limit):
            if used_s + MIN_LEASE_S <= fraction * self.window_s:
                return min(self.window_end, now + fraction * self.window_s - used_s)
        return None

    def used(self, client: str, now: float) -> float:
        """Seconds charged to `client` in the current window so far, debt and busy time included."""
        self._roll(now)
        return self._charged(self._clients[client], now)

    def charged_total(self, now: float) -> dict[str, float]:
        """Seconds charged to each client since it registered (busy time, debt not counted
        twice): their rates are the GPU-time shares the scheduler enforced."""
        return {
            name: state.total_s + (now - state.busy_since if state.busy_since is not None else 0)
            for name, state in self._clients.items()
        }

    @staticmethod
    def _charged(state: _Client, now: float) -> float:
        busy = now - state.busy_since if state.busy_since is not None else 0.0
        return state.used_s + busy

    def _overrun(self, state: _Client, now: float) -> float:
        """How long the busy `state` has run, since it was last charged and up to `now`, past
        its lease while a client that could run waited for a token."""
        waiting = [
            c.waiting_since
            for c in self._clients.values()
            if c.waiting_since is not None and self._lease_end(c, c.used_s, now) is not None
        ]
        if state.busy_since is None or not waiting:
            return 0.0
        return max(0.0, now - max(state.busy_since, state.lease_end, min(waiting)))

    def _roll(self, now: float) -> None:
        """Close every window that ended by `now`: charge busy holders up to its end, carry
        debt."""
        while now >= self.window_end:
            end = self.window_end
            busy = False
            for state in self._clients.values():
                if state.busy_since is not None:
                    state.overrun_s += self._overrun(state, end)
                    state.used_s += end - state.busy_since
                    state.total_s += end - state.busy_since
                    state.busy_since = end
                    busy = True
            windows = 1 if busy else int((now - end) // self.window_s) + 1
            for state in self._clients.values():
                budget = state.limit * self.window_s
                # overrun its request did not pay for (run past the request, it was forgiven)
                unpaid = min(state.overrun_s, state.used_s - state.request * self.window_s)
                debt = max(state.used_s - budget, unpaid)
                state.used_s = max(0.0, debt - (windows - 1) * budget)
                state.overrun_s = 0.0
            self._windows += windows
            self.window_end = self._origin + self._windows * self.window_s  # no drift
