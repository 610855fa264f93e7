"""stack.yml is read as faas-cli reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from faas_provider.gpu.share import gpu_share
from faas_provider.stack import StackError, load_stack

REPO = Path(__file__).resolve().parents[1]


def test_repository_stack_file_loads() -> None:
    functions = {f.service: f for f in load_stack(REPO / "stack.yml")}
    assert functions["echo"].env_process == "cat"
    assert "tiny-cpu" in functions
    shares = {name: gpu_share(f) for name, f in functions.items()}
    assert shares["echo"] is None and shares["tiny-cpu"] is None
    small = shares["resnet50-small"]
    assert small is not None and (small.sm_percent, small.memory_bytes) == (14, 2 * 1024**3)
    gpu = [share for share in shares.values() if share is not None]
    assert len(gpu) == 3 and sum(share.footprint for share in gpu) <= 100, "one GPU holds them"


def test_stack_fields_map_to_the_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAG", "0.3")
    (tmp_path / "env.yml").write_text("environment:\n  FROM_FILE: yes\n  BOTH: file\n")
    (tmp_path / "stack.yml").write_text(
        """
version: 1.0
provider:
  name: openfaas
  gateway: http://127.0.0.1:8080
functions:
  hello:
    lang: python3-http
    handler: ./hello
    image: acme/hello:${TAG}
    fprocess: python3 index.py
    namespace: team-a
    environment:
      write_debug: true
      BOTH: inline
    environment_file: [env.yml]
    secrets: [api-key]
    labels: {com.openfaas.scale.min: 2}
    annotations: {fastgshare/gpu_sm_partition: "25"}
    limits: {memory: 256Mi}
"""
    )
    (hello,) = load_stack(tmp_path / "stack.yml")
    assert hello.image == "acme/hello:0.3"
    assert hello.env_process == "python3 index.py"
    assert hello.namespace == "team-a"
    assert hello.env_vars == {"write_debug": "True", "BOTH": "inline", "FROM_FILE": "True"}
    assert hello.secrets == ["api-key"]
    assert hello.labels == {"com.openfaas.scale.min": "2"}
    assert hello.annotations == {"fastgshare/gpu_sm_partition": "25"}
    assert hello.limits is not None and hello.limits.memory == "256Mi"


def test_bad_stack_names_the_function(tmp_path: Path) -> None:
    (tmp_path / "stack.yml").write_text("functions:\n  Bad_Name:\n    image: x\n")
    with pytest.raises(StackError, match="Bad_Name"):
        load_stack(tmp_path / "stack.yml")
