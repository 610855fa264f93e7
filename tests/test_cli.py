"""`fast-gshare up` end to end: the README's first command as a real process, with workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from faas_provider import __version__
from faas_provider.cli import _parser
from faas_provider.metrics import REPORT_INTERVAL_S
from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _call(port: int, path: str, body: bytes | None = None, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found.update(int(child) for child in children)
    return found


@contextmanager
def provider(state_dir: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run `fast-gshare up --stack stack.yml` until its function table is printed."""
    port = _free_port()
    command = [sys.executable, "-m", "faas_provider.cli", "up", "--stack", "stack.yml"]
    command += ["--port", str(port), "--state-dir", str(state_dir), *extra]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        printed = [process.stdout.readline() for _ in range(3)]
        assert f"http://127.0.0.1:{port}" in printed[0], printed
        assert any("/function/echo" in line for line in printed), printed
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _invocations(port: int) -> float:
    """echo's 200 answers in /metrics, once the workers have reported (every second)."""
    time.sleep(REPORT_INTERVAL_S * 1.5)
    _, text = _call(port, "/metrics")
    assert "/system/workers" not in text, "the workers' own reports are not requests to count"
    line = 'fast_gshare_function_invocations_total{code="200",function_name="echo.openfaas-fn"}'
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def _wait_ready(port: int, name: str, replicas: int = 1) -> None:
    for _ in range(200):
        status, body = _call(port, f"/system/function/{name}")
        if status == 200 and json.loads(body)["availableReplicas"] >= replicas:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never had {replicas} replica(s) ready")


def test_up_serves_the_stack_and_a_restart_keeps_it(tmp_path: Path) -> None:
    with provider(tmp_path) as (process, port):
        _wait_ready(port, "echo")
        _wait_ready(port, "tiny-cpu")
        assert _call(port, "/function/echo", b"hi", "POST") == (200, "hi")
        status, body = _call(
            port, "/function/tiny-cpu", json.dumps({"inputs": [[0.5] * 64]}).encode(), "POST"
        )
        assert status == 200 and len(json.loads(body)["predictions"]) == 1
        assert _call(port, "/system/scale-function/echo", b'{"replicas": 2}', "POST")[0] == 202
        replicas = _children(process.pid)
    assert process.returncode == 0
    time.sleep(0.5)
    for pid in replicas:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    with provider(tmp_path) as (_, port):
        _wait_ready(port, "echo")
        status, body = _call(port, "/system/function/echo")
        assert json.loads(body)["replicas"] == 2


def test_metrics_can_be_served_at_a_second_address_alone(tmp_path: Path) -> None:
    metrics_port = _free_port()
    extra = ("--metrics-address", f"127.0.0.1:{metrics_port}")
    with provider(tmp_path, *extra) as (_, port):
        _wait_ready(port, "echo")
        assert _call(port, "/function/echo", b"hi", "POST") == (200, "hi")
        status, text = _call(metrics_port, "/metrics")
        assert status == 200
        series = (
            'fast_gshare_function_invocations_total{code="200",function_name="echo.openfaas-fn"}'
        )
        assert f"{series} 1.0" in text
        assert _call(metrics_port, "/system/functions")[0] == 404, "nothing but /metrics there"
    bad = [sys.executable, "-m", "faas_provider.cli", "up", "--metrics-address", "8083"]
    refused = subprocess.run(bad, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert refused.returncode != 0 and "write HOST:PORT" in refused.stderr


def test_workers_share_the_port_and_pass_system_calls_through(tmp_path: Path) -> None:
    with provider(tmp_path, "--workers", "2") as (process, port):
        _wait_ready(port, "echo")
        workers = [
            pid
            for pid in _children(process.pid)
            if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 1
        # many fresh connections: the kernel spreads them over both processes
        for index in range(40):
            assert _call(port, "/function/echo", str(index).encode(), "POST") == (200, str(index))
            status, body = _call(port, "/system/functions")
            assert status == 200 and "echo" in body
        status, _ = _call(port, "/system/logs?name=echo&tail=1")
        assert status == 200
        assert _invocations(port) == 40, "one /metrics, whichever process proxied the call"
        # a worker that dies is replaced; once it is gone the port answers without it
        os.kill(workers[0], signal.SIGKILL)
        while Path(f"/proc/{workers[0]}").exists():
            time.sleep(0.01)
        for _ in range(20):
            assert _call(port, "/function/echo", b"x", "POST") == (200, "x")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = [
                pid
                for pid in _children(process.pid)
                if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            if alive and alive != workers:
                break
            time.sleep(0.2)
        assert alive and alive != workers
        assert _invocations(port) == 60, "a dead worker's counts stay in the sums"
    assert process.returncode == 0
    control_socket = Path(tempfile.gettempdir()) / f"fast-gshare-{process.pid}.sock"
    assert not control_socket.exists(), "a stopped provider leaves no socket behind"


def test_scale_downs_and_rollouts_under_load_through_workers_lose_no_request(
    tmp_path: Path,
) -> None:
    # a worker keeps the endpoint lists it got for a second: a replica that a scale-down or a
    # rollout stops must still answer what the workers send it meanwhile
    scale = "/system/scale-function/echo"
    with provider(tmp_path, "--workers", "2") as (_, port):
        _wait_ready(port, "echo")
        assert _call(port, scale, b'{"replicas": 3}', "POST")[0] == 202
        _wait_ready(port, "echo", 3)
        done = threading.Event()
        answers: list[tuple[int, str]] = []

        def load() -> None:
            while not done.is_set():
                answers.append(_call(port, "/function/echo", b"x", "POST"))

        callers = [threading.Thread(target=load) for _ in range(8)]
        for caller in callers:
            caller.start()
        try:
            for round_ in range(3):
                assert _call(port, scale, b'{"replicas": 1}', "POST")[0] == 202
                time.sleep(2.0)
                assert _call(port, scale, b'{"replicas": 3}', "POST")[0] == 202
                _wait_ready(port, "echo", 3)
                # a new environment: three new replicas, then the old three go
                update = {"service": "echo", "image": "ghcr.io/fast-gshare/echo:0.1.0",
                          "envProcess": "cat", "envVars": {"ROUND": str(round_)},
                          "labels": {"com.openfaas.scale.min": "1"}}  # fmt: skip
                assert (
                    _call(port, "/system/functions", json.dumps(update).encode(), "PUT")[0] == 202
                )
                time.sleep(3.0)
        finally:
            done.set()
            for caller in callers:
                caller.join()
    failed = [answer for answer in answers if answer != (200, "x")]
    assert len(answers) > 100 and not failed, f"{len(failed)} of {len(answers)}: {failed[:3]}"


def test_help_lists_only_user_commands_and_version_prints() -> None:
    command = [sys.executable, "-m", "faas_provider.cli"]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True)
    assert "{up,render,top,profile,node}" in shown.stdout
    assert "SUPPRESS" not in shown.stdout and "worker" not in shown.stdout
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"fast-gshare {__version__}"


def test_up_on_a_busy_port_says_so_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [sys.executable, "-m", "faas_provider.cli", "up", "--stack", "stack.yml"]
        command += ["--port", str(port), "--state-dir", str(tmp_path / "state")]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert not (tmp_path / "state").exists(), "a refused start leaves no state directory"
    assert f"cannot listen on http://127.0.0.1:{port}" in done.stderr
    assert "--port" in done.stderr
    assert "Traceback" not in done.stderr
    assert "started" not in done.stderr, "no replica may start when the port is taken"


def test_a_second_provider_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    with provider(tmp_path):
        command = [sys.executable, "-m", "faas_provider.cli", "up", "--stack", "stack.yml"]
        command += ["--port", str(_free_port()), "--state-dir", str(tmp_path)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "is in use by another fast-gshare provider" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (96, 8)])
def test_workers_auto_is_one_process_per_four_cpus_from_one_to_eight(
    monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert _parser().parse_args(["up"]).workers == workers
    assert _parser().parse_args(["up", "--workers", "auto"]).workers == workers
    assert _parser().parse_args(["up", "--workers", "3"]).workers == 3


@pytest.mark.parametrize("value", ["0", "65", "many"])
def test_a_bad_workers_value_says_what_to_write(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["up", "--workers", value])
    assert f"argument --workers: {value!r}: write auto or a number from 1 to 64" in (
        capsys.readouterr().err
    )
