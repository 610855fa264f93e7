"""A function's profile: what one replica serves under each GPU setting it was measured at.

A setting is an SM partition, a time quota (request = limit: the replica's share of every
window) and a concurrency (requests kept in flight on the replica, which its runtime batches).
Per setting the profile keeps the throughput and the latency percentiles measured through the
real path (provider proxy, gate, replica) with closed-loop clients: what a replica serves when
it is kept busy. Per (SM partition, quota) it also keeps open-loop runs at Poisson arrival
rates below that: traffic that comes when it comes queues more, and what a replica serves
within a latency target is the highest such rate whose p99 met it. A profile names the GPU
model it was made on and is applied to that model only. The same JSON is stored by the
backends, served at /system/profiles/{name} and written by `fast-gshare profile`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Measurement(BaseModel):
    """One replica of the function at one setting, under `concurrency` closed-loop clients."""

    model_config = ConfigDict(extra="forbid")

    sm_percent: int = Field(ge=1, le=100)
    quota: float = Field(gt=0, le=1)
    concurrency: int = Field(ge=1)
    throughput_rps: float = Field(ge=0)
    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)
    errors: int = Field(default=0, ge=0)

    @property
    def footprint(self) -> float:
        """The share of a GPU's SM-time one replica at this setting holds: SM share x quota."""
        return self.sm_percent / 100 * self.quota


class RateMeasurement(BaseModel):
    """One replica of the function at one (SM partition, quota), under Poisson arrivals at
    `offered_rps`."""

    model_config = ConfigDict(extra="forbid")

    sm_percent: int = Field(ge=1, le=100)
    quota: float = Field(gt=0, le=1)
    offered_rps: float = Field(gt=0)
    answered_rps: float = Field(ge=0)
    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)
    errors: int = Field(default=0, ge=0)


class Capacity(BaseModel):
    """What one replica at an (SM partition, quota) serves within a latency target: the highest
    Poisson rate whose p99 met it where open-loop runs were made, at most the best closed-loop
    throughput among its concurrencies whose p99 met it."""

    sm_percent: int
    quota: float
    concurrency: int
    throughput_rps: float
    p99_ms: float

    @property
    def footprint(self) -> float:
        """SM share x quota of one replica."""
        return self.sm_percent / 100 * self.quota


class Profile(BaseModel):
    """A function's measurements on one GPU model."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(min_length=1)  # name.namespace
    gpu_model: str = Field(min_length=1)  # as NVML names it: "NVIDIA H200"
    made_at: str  # RFC 3339
    latency_slo_ms: float | None = Field(default=None, gt=0)  # the target it was made for
    measurements: list[Measurement] = Field(min_length=1)
    open_loop: list[RateMeasurement] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_measurement_per_setting(self) -> Profile:
        seen = set()
        for m in self.measurements:
            key = (m.sm_percent, m.quota, m.concurrency)
            if key in seen:
                raise ValueError(f"setting {key} is measured twice")
            seen.add(key)
        return self

    def capacities(self, latency_slo_ms: float) -> list[Capacity]:
        """Per (SM partition, quota): the most one replica served with p99 within
        `latency_slo_ms` and no errors, closed loop, and where open-loop runs were made the
        highest Poisson rate that met it, if lower; settings that never met it are left out."""
        best: dict[tuple[int, float], Measurement] = {}
        for m in self.measurements:
            if m.errors or m.p99_ms > latency_slo_ms or m.throughput_rps <= 0:
                continue
            key = (m.sm_percent, m.quota)
            if key not in best or m.throughput_rps > best[key].throughput_rps:
                best[key] = m
        capacities = []
        for key, m in sorted(best.items()):
            runs = [r for r in self.open_loop if (r.sm_percent, r.quota) == key]
            met = [r for r in runs if not r.errors and r.p99_ms <= latency_slo_ms]
            if runs and not met:
                continue  # kept busy it meets the target; with arrivals as they come, never
            rate, p99 = m.throughput_rps, m.p99_ms
            if met and (fastest := max(met, key=lambda r: r.offered_rps)).offered_rps < rate:
                rate, p99 = fastest.offered_rps, fastest.p99_ms
            capacities.append(Capacity(sm_percent=m.sm_percent, quota=m.quota,
                                       concurrency=m.concurrency, throughput_rps=rate,
                                       p99_ms=p99))  # fmt: skip
        return capacities
