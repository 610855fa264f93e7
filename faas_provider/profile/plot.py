"""A profile as a picture: one replica's throughput against its GPU footprint (SM share x
quota), one line per SM partition, at the latency target (filled: what it serves within the
target, from Poisson runs where there are some) and at any latency, kept busy (hollow,
dashed). Needs matplotlib (`pip install 'fast-gshare[plot]'`)."""

from __future__ import annotations

from pathlib import Path

from faas_provider.profile.model import Profile


def plot_profile(profile: Profile, path: Path) -> None:
    """Draw `profile` into the PNG `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = profile.latency_slo_ms
    figure, axes = plt.subplots(figsize=(8, 5))
    for sm in sorted({m.sm_percent for m in profile.measurements}):
        mine = [m for m in profile.measurements if m.sm_percent == sm]
        quotas = sorted({m.quota for m in mine})
        best = [max(m.throughput_rps for m in mine if m.quota == q) for q in quotas]
        line = axes.plot(
            [sm / 100 * q for q in quotas], best, linestyle="--", marker="o",
            markerfacecolor="none", alpha=0.6, label=f"{sm}% SMs, kept busy, any latency",
        )  # fmt: skip
        if target is not None:
            within = {c.quota: c.throughput_rps for c in profile.capacities(target)
                      if c.sm_percent == sm}  # fmt: skip
            kept = [q for q in quotas if q in within]
            axes.plot(
                [sm / 100 * q for q in kept], [within[q] for q in kept], marker="o",
                color=line[0].get_color(), label=f"{sm}% SMs, p99 <= {target:g} ms",
            )  # fmt: skip
    axes.set_xlabel("GPU footprint of one replica (SM share x quota)")
    axes.set_ylabel("requests per second, one replica")
    slo = f"latency target p99 <= {target:g} ms" if target is not None else "no latency target"
    axes.set_title(f"{profile.function} on {profile.gpu_model} ({slo})")
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
