"""benchmarks/cluster_sim.py, small: it runs fast-gshare's autoscaler and placement over a
seeded trace from the H200 profiles kept in benchmarks/results, and the three strategies
order as the sharing each allows says they must."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_simulation_writes_its_result_and_sharing_uses_fewer_gpus(tmp_path: Path) -> None:
    command = [sys.executable, "benchmarks/cluster_sim.py", "--functions", "30", "--hours",
               "0.1", "--pool", "300", "--out", str(tmp_path)]  # fmt: skip
    shown = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "fast-gshare uses" in shown and "fewer GPUs than equal-mps" in shown
    result = json.loads((tmp_path / "cluster_sim.json").read_text())
    strategies = result["strategies"]
    assert set(strategies) == {"exclusive", "equal-mps", "fast-gshare"}
    for r in strategies.values():
        assert r["gpus"] >= 1 and 0 <= r["slo_miss_ratio"] < 0.05 and r["requests"] > 1000
    gpus = {name: r["gpus"] for name, r in strategies.items()}
    assert gpus["fast-gshare"] < gpus["equal-mps"] < gpus["exclusive"], gpus
    assert (tmp_path / "cluster_sim.png").read_bytes()[:4] == b"\x89PNG"
    assert result["profiles"] and all("NVIDIA H200" in p for p in result["profiles"])
