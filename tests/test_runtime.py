"""The function runtime, run as a real process (`python -m faas_provider.runtime`) over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from yarl import URL

from faas_provider.runtime.watchdog import (
    RuntimeConfig,
    build_response,
    canonical_header_key,
    parse_duration,
)

REPO = Path(__file__).resolve().parents[1]
RUNTIME_COMMAND = [sys.executable, "-m", "faas_provider.runtime"]
DURATION = re.compile(r"\d+\.\d{6}")

# Prints the Http_* variables (and one of the function's own) it was given, as JSON.
ENV_DUMP = """
import json, os
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("Http_") or k == "GREETING"}))
"""
# Writes its pid and a grandchild's pid to the file named on the command line, then sleeps.
SLEEPER = """
import subprocess, sys, time
grandchild = subprocess.Popen(["sleep", "30"])
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write(f"{__import__('os').getpid()} {grandchild.pid}")
__import__("os").rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(30)
"""
# Keeps state between calls, and behaves by path.
HANDLER = """
import time

calls = 0


def handle(event, context):
    global calls
    calls += 1
    if event.path == "/boom":
        raise ValueError("bad thing")
    if event.path == "/slow":
        time.sleep(30)
    return {
        "statusCode": 201,
        "body": {
            "calls": calls,
            "method": event.method,
            "path": event.path,
            "query": event.query.get("a"),
            "header": event.headers.get("x-test"),
            "body": event.body.decode(),
            "hostname": context.hostname,
        },
        "headers": {"X-Custom": "yes"},
    }
"""

# Batches: answers each body with the batch it was in and every batch seen so far; a body
# "sleep S" holds the batch S seconds (the measured stand-in for a GPU forward pass).
BATCH_HANDLER = """
import time

batches = []


def handle_batch(events, context):
    bodies = [event.body.decode() for event in events]
    batches.append(bodies)
    if "boom" in bodies:
        raise ValueError("bad batch")
    if "short" in bodies:
        return []
    for body in bodies:
        if body.startswith("sleep "):
            time.sleep(float(body.split()[1]))
    return [{"body": {"body": body, "batch": bodies, "seen": list(batches)}} for body in bodies]


def handle(event, context):
    raise AssertionError("handle_batch is defined: handle must not be called")
"""


@dataclass
class Replica:
    """A runtime process under test and what it wrote to stderr."""

    process: asyncio.subprocess.Process
    port: int = 0
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")

    async def wait_for_log(self, text: str, within_s: float = 5.0) -> None:
        deadline = time.monotonic() + within_s
        while text not in self.log:
            assert time.monotonic() < deadline, f"{text!r} never logged; log:\n{self.log}"
            await asyncio.sleep(0.02)


def runtime_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("fprocess", "exec_timeout")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


async def spawn(*args: str, env: dict[str, str] | None = None) -> Replica:
    """Start the runtime; stderr is collected into `Replica.stderr` in the background."""
    process = await asyncio.create_subprocess_exec(
        *RUNTIME_COMMAND,
        *args,
        env=runtime_env(env or {}),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    replica = Replica(process)
    asyncio.get_running_loop().create_task(_collect(process.stderr, replica.stderr))
    return replica


async def _collect(stream: asyncio.StreamReader | None, sink: bytearray) -> None:
    assert stream is not None
    while chunk := await stream.read(4096):
        sink.extend(chunk)


async def read_port(replica: Replica) -> int:
    assert replica.process.stdout is not None
    line = await asyncio.wait_for(replica.process.stdout.readline(), 10)
    match = re.fullmatch(rb"Listening on port: (\d+)\n", line)
    assert match, f"no port line, got {line!r}; log:\n{replica.log}"
    return int(match[1])


@contextlib.asynccontextmanager
async def running(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Replica]:
    """A ready runtime on a port the OS picked; stopped with SIGTERM afterwards."""
    replica = await spawn("--port", "0", *args, env=env)
    try:
        replica.port = await read_port(replica)
        yield replica
    finally:
        if replica.process.returncode is None:
            replica.process.terminate()
            try:
                await asyncio.wait_for(replica.process.wait(), 5)
            except TimeoutError:
                replica.process.kill()
                await replica.process.wait()


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def process_state(pid: int) -> str | None:
    """The state letter of `pid` in /proc (`Z` for a zombie), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent, or a zombie waiting to be reaped)."""
    return process_state(pid) in (None, "Z")


async def wait_gone(pid: int, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        await asyncio.sleep(0.05)


def read_if_written(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


async def wait_for_file(path: Path, within_s: float = 5.0) -> str:
    deadline = time.monotonic() + within_s
    while (text := read_if_written(path)) is None:
        assert time.monotonic() < deadline, f"{path} never written"
        await asyncio.sleep(0.02)
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# --- configuration and mapping, without a process ---------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1.5h", 5400.0), ("0", 0.0)],
)
def test_parse_duration_reads_seconds_and_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "5 s", "30sec", "1d", "s"])
def test_parse_duration_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="Go duration"):
        parse_duration(text)


def test_config_reads_the_watchdog_environment() -> None:
    config = RuntimeConfig.from_env({"fprocess": "cat"})
    assert (config.exec_timeout_s, config.combine_output, config.max_inflight) == (30.0, True, 0)
    config = RuntimeConfig.from_env(
        {"fprocess": "cat", "exec_timeout": "0", "combine_output": "false", "max_inflight": "3"}
    )
    assert (config.exec_timeout_s, config.combine_output, config.max_inflight) == (None, False, 3)
    with pytest.raises(ValueError, match="exec_timeout"):
        RuntimeConfig.from_env({"fprocess": "cat", "exec_timeout": "soon"})
    with pytest.raises(ValueError, match="max_inflight"):
        RuntimeConfig.from_env({"fprocess": "cat", "max_inflight": "-1"})
    assert RuntimeConfig.from_env({"fprocess": "cat"}).max_batch_size == 8
    assert RuntimeConfig.from_env({"fprocess": "cat", "max_batch_size": "2"}).max_batch_size == 2
    with pytest.raises(ValueError, match="max_batch_size"):
        RuntimeConfig.from_env({"fprocess": "cat", "max_batch_size": "0"})
    assert RuntimeConfig.from_env({"fprocess": "cat"}).max_batch_delay_s == 0.005
    config = RuntimeConfig.from_env({"fprocess": "cat", "max_batch_delay": "2ms"})
    assert config.max_batch_delay_s == pytest.approx(0.002)
    with pytest.raises(ValueError, match="max_batch_delay"):
        RuntimeConfig.from_env({"fprocess": "cat", "max_batch_delay": "soon"})
    assert RuntimeConfig.from_env({"fprocess": "cat"}).batches_in_flight == 1
    config = RuntimeConfig.from_env({"fprocess": "cat", "batches_in_flight": "2"})
    assert config.batches_in_flight == 2
    with pytest.raises(ValueError, match="batches_in_flight"):
        RuntimeConfig.from_env({"fprocess": "cat", "batches_in_flight": "0"})
    with pytest.raises(ValueError, match="fprocess"):
        RuntimeConfig.from_env({})


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("x-call-id", "X-Call-Id"), ("CONTENT-TYPE", "Content-Type"), ("x_foo", "X_foo")],
)
def test_canonical_header_key_follows_go(name: str, canonical: str) -> None:
    assert canonical_header_key(name) == canonical


def test_build_response_follows_the_template_and_flask() -> None:
    none = build_response(None)
    assert (none.status, none.body, none.content_type) == (200, b"", "text/html")
    text = build_response("plain")
    assert (text.status, text.body, text.content_type) == (200, b"plain", "text/html")
    listed = build_response({"body": [2, 1]})
    assert (listed.body, listed.content_type) == (b"[2,1]\n", "application/json")
    raw = build_response({"statusCode": 202, "body": b"\x00\x01", "headers": [("X-A", "1")]})
    assert (raw.status, raw.body, raw.headers["X-A"]) == (202, b"\x00\x01", "1")
    overridden = build_response({"body": {"b": 1, "a": 2}, "headers": {"Content-Type": "x/y"}})
    assert (overridden.body, overridden.headers["Content-Type"]) == (b'{"a":2,"b":1}\n', "x/y")
    assert build_response(("made", 201)).status == 201
    assert build_response(("made", {"X-B": "2"})).headers["X-B"] == "2"
    assert build_response(("made", 203, {"X-C": "3"})).status == 203
    with pytest.raises(TypeError, match="tuple of 4"):
        build_response((1, 2, 3, 4))


# --- fprocess mode ----------------------------------------------------------------------


async def test_cat_echoes_the_body_with_the_callers_content_type(
    session: aiohttp.ClientSession,
) -> None:
    async with (
        running(env={"fprocess": "cat"}) as cat,
        running(env={"fprocess": "cat", "content_type": "application/x-fixed"}) as fixed,
    ):
        headers = {"Content-Type": "application/json"}
        async with session.post(f"{cat.url}/", data=b'{"a": 1}', headers=headers) as response:
            assert response.status == 200
            assert await response.read() == b'{"a": 1}'
            assert response.headers["Content-Type"] == "application/json"
            assert DURATION.fullmatch(response.headers["X-Duration-Seconds"])
        bare = session.post(f"{cat.url}/", data=b"hello", skip_auto_headers=["Content-Type"])
        async with bare as response:
            assert await response.read() == b"hello"
            assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        async with session.post(f"{fixed.url}/", data=b"x", headers=headers) as response:
            assert response.headers["Content-Type"] == "application/x-fixed"
        await cat.wait_for_log("Wrote 8 Bytes - Duration: ")
        assert "Forking fprocess." in cat.log


async def test_fprocess_sees_the_request_in_http_variables(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    script = write(tmp_path / "env_dump.py", ENV_DUMP)
    env = {"fprocess": f"{sys.executable} {script}", "GREETING": "hi"}
    async with running(env=env) as replica:
        url = URL(f"{replica.url}/some/path?q=a%20b&x=1", encoded=True)
        headers = {"X-Call-Id": "abc", "x-lower-case": "v", "Content-Type": "text/plain"}
        async with session.put(url, data=b"12345", headers=headers) as response:
            assert response.status == 200
            seen = json.loads(await response.read())
        assert seen["Http_Method"] == "PUT"
        assert seen["Http_Path"] == "/some/path"
        assert seen["Http_Query"] == "q=a%20b&x=1"
        assert seen["Http_X_Call_Id"] == "abc"
        assert seen["Http_X_Lower_Case"] == "v"
        assert seen["Http_Content_Type"] == "text/plain"
        assert seen["Http_Content_Length"] == seen["Http_ContentLength"] == "5"
        assert seen["Http_Host"] == f"127.0.0.1:{replica.port}"
        assert seen["GREETING"] == "hi"

        for method in ("GET", "POST", "PATCH", "DELETE", "OPTIONS"):
            async with session.request(method, f"{replica.url}/m") as response:
                seen = json.loads(await response.read())
            assert seen["Http_Method"] == method
            assert "Http_Query" not in seen
        async with session.head(f"{replica.url}/m") as response:
            assert response.status == 200
            assert DURATION.fullmatch(response.headers["X-Duration-Seconds"])


async def test_nonzero_exit_is_500_with_the_output(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    script = write(
        tmp_path / "fail.py",
        """
        import sys
        print("partial out", flush=True)
        print("boom", file=sys.stderr, flush=True)
        sys.exit(3)
        """,
    )
    env = {"fprocess": f"{sys.executable} {script}"}
    async with (
        running(env=env) as combined,
        running(env={**env, "combine_output": "false"}) as split,
    ):
        async with session.post(f"{combined.url}/") as response:
            assert response.status == 500
            body = await response.text()
            assert DURATION.fullmatch(response.headers["X-Duration-Seconds"])
        assert body.startswith("exit status 3\n")
        assert "partial out" in body and "boom" in body
        async with session.post(f"{split.url}/") as response:
            assert response.status == 500
            assert await response.text() == "exit status 3\npartial out\n"
        await split.wait_for_log("stderr: boom")
        await combined.wait_for_log("exit status 3 - Duration: ")


async def test_timeout_answers_408_and_kills_the_process_group(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    script = write(tmp_path / "sleeper.py", SLEEPER)
    pids = tmp_path / "pids"
    env = {"fprocess": f"{sys.executable} {script} {pids}", "exec_timeout": "500ms"}
    async with running(env=env) as replica:
        started = time.monotonic()
        async with session.post(f"{replica.url}/") as response:
            assert response.status == 408
            assert await response.text() == "Killed process.\n"
            assert DURATION.fullmatch(response.headers["X-Duration-Seconds"])
        assert time.monotonic() - started < 3
        child, grandchild = (int(pid) for pid in pids.read_text().split())
        await wait_gone(child)
        await wait_gone(grandchild)
        assert "Killing process: " in replica.log


async def test_max_inflight_turns_away_the_excess_with_429(
    session: aiohttp.ClientSession,
) -> None:
    async with running(env={"fprocess": "sleep 0.6", "max_inflight": "1"}) as replica:
        first = asyncio.create_task(session.post(f"{replica.url}/"))
        await replica.wait_for_log("Forking fprocess.")
        async with session.post(f"{replica.url}/") as response:
            assert response.status == 429
            assert "Max concurrent requests: 1" in await response.text()
        async with await first as response:
            assert response.status == 200


async def test_sigterm_lets_the_request_in_flight_finish_then_exits(
    session: aiohttp.ClientSession,
) -> None:
    async with running(env={"fprocess": "sleep 0.5"}) as replica:
        request = asyncio.create_task(session.post(f"{replica.url}/"))
        await replica.wait_for_log("Forking fprocess.")
        replica.process.send_signal(signal.SIGTERM)
        async with await request as response:
            assert response.status == 200
        assert await asyncio.wait_for(replica.process.wait(), 3) == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{replica.url}/_/health")


# --- handler mode -----------------------------------------------------------------------


async def test_handler_mode_maps_the_response_and_keeps_state(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    write(tmp_path / "handler.py", HANDLER)
    env = {"exec_timeout": "1s", "HOSTNAME": "replica-1"}
    async with running("--handler", str(tmp_path), env=env) as replica:
        url = f"{replica.url}/predict?a=7"
        async with session.patch(url, data=b"in", headers={"X-Test": "t"}) as response:
            assert response.status == 201
            assert response.headers["X-Custom"] == "yes"
            assert response.headers["Content-Type"] == "application/json"
            assert DURATION.fullmatch(response.headers["X-Duration-Seconds"])
            assert await response.json() == {
                "calls": 1,
                "method": "PATCH",
                "path": "/predict",
                "query": "7",
                "header": "t",
                "body": "in",
                "hostname": "replica-1",
            }

        async with session.post(f"{replica.url}/boom") as response:
            assert response.status == 500
            assert await response.text() == "ValueError: bad thing\n"
        await replica.wait_for_log("ValueError: bad thing - Duration: ")
        assert "Traceback" in replica.log

        async with session.get(f"{replica.url}/again") as response:
            assert response.status == 201
            assert (await response.json())["calls"] == 3

        started = time.monotonic()
        async with session.get(f"{replica.url}/slow") as response:
            assert response.status == 504
            assert DURATION.fullmatch(response.headers["X-Duration-Seconds"])
        assert time.monotonic() - started < 3

        # The thread still sleeping in handle() does not hold the exit.
        replica.process.terminate()
        assert await asyncio.wait_for(replica.process.wait(), 3) == 0


LONG_LIVED_HANDLER = """
import gc

MODEL = [[index] for index in range(100_000)]  # what a model's import leaves: long-lived objects


def handle(event, context):
    seen = {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}
    return {"statusCode": 200, "body": seen}
"""


async def test_no_collection_walks_again_what_the_handlers_import_made(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A full collection walks every tracked object (0.17 s with torch imported, a pause for
    every request in flight); the handler's import is moved out of their way."""
    write(tmp_path / "handler.py", LONG_LIVED_HANDLER)
    async with (
        running("--handler", str(tmp_path)) as replica,
        session.post(replica.url, data=b"") as response,
    ):
        seen = await response.json(content_type=None)
    assert seen["frozen"] > 100_000
    assert seen["tracked"] < 100_000, seen
    assert "objects kept out of garbage collection" in replica.log


async def test_requests_that_arrive_while_a_batch_runs_form_the_next_batch(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    write(tmp_path / "handler.py", BATCH_HANDLER)
    async with running("--handler", str(tmp_path), env={"max_batch_size": "4"}) as replica:
        assert "Batching requests: up to 4 a call of handle_batch()" in replica.log

        async def call(body: str) -> dict[str, Any]:
            async with session.post(replica.url, data=body.encode()) as response:
                assert response.status == 200, await response.text()
                assert DURATION.fullmatch(response.headers["X-Duration-Seconds"])
                return await response.json()

        first = asyncio.create_task(call("sleep 0.5"))
        await asyncio.sleep(0.2)  # the first batch is running
        queued = await asyncio.gather(*(call(f"r{index}") for index in range(5)))
        assert (await first)["batch"] == ["sleep 0.5"]
        # Five arrived during the first call: the next takes four (max_batch_size), oldest
        # first, and the one left over goes alone.
        sizes = sorted(len(answer["batch"]) for answer in queued)
        assert sizes == [1, 4, 4, 4, 4]
        for answer in queued:
            assert answer["body"] in answer["batch"]

        alone = await call("alone")
        assert alone["batch"] == ["alone"]  # one request at a time waits for no other
        assert [len(batch) for batch in alone["seen"]] == [1, 4, 1, 1]


OVERLAPPING_BATCH_HANDLER = """
import threading
import time

lock = threading.Lock()
running = most = 0


def handle_batch(events, context):
    global running, most
    with lock:
        running += 1
        most = max(most, running)
    time.sleep(float(events[0].body))
    with lock:
        running -= 1
    return [{"body": {"size": len(events), "most": most}} for _ in events]
"""


async def test_with_two_batches_in_flight_a_batch_starts_while_another_runs(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    write(tmp_path / "handler.py", OVERLAPPING_BATCH_HANDLER)
    env = {"max_batch_size": "4", "batches_in_flight": "2", "max_batch_delay": "0"}
    async with running("--handler", str(tmp_path), env=env) as replica:
        assert "2 call(s) at once" in replica.log

        async def call(seconds: float) -> dict[str, Any]:
            async with session.post(replica.url, data=str(seconds).encode()) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        slow = asyncio.create_task(call(0.8))
        await asyncio.sleep(0.2)  # the first batch is running
        started = time.monotonic()
        beside = await asyncio.gather(*(call(0.2) for _ in range(4)))
        assert time.monotonic() - started < 0.5  # they did not wait for the slow one
        assert not slow.done()
        assert max(answer["most"] for answer in beside) == 2
        # Ten at once, the slow one still running: never more than two calls at a time.
        many = await asyncio.gather(*(call(0.1) for _ in range(10)))
        assert max(answer["most"] for answer in many) == 2
        assert all(answer["size"] <= 4 for answer in many)
        assert (await slow)["size"] == 1


@pytest.mark.parametrize(("delay", "in_step"), [("400ms", True), ("0", False)])
async def test_closed_loop_callers_fall_into_step_and_share_batches(
    tmp_path: Path, session: aiohttp.ClientSession, delay: str, in_step: bool
) -> None:
    write(tmp_path / "handler.py", BATCH_HANDLER)
    async with running("--handler", str(tmp_path), env={"max_batch_delay": delay}) as replica:

        async def call(body: str) -> tuple[list[list[str]], float]:
            started = time.monotonic()
            async with session.post(replica.url, data=body.encode()) as response:
                assert response.status == 200, await response.text()
                return (await response.json())["seen"], time.monotonic() - started

        _, took = await call("alone")
        assert took < 0.3  # a lone caller does not wait for company

        async def caller(name: str) -> list[list[str]]:
            for index in range(6):
                seen, _ = await call(f"sleep 0.05 {name}{index}")
            return seen

        first, second = await asyncio.gather(caller("a"), caller("b"))
        sizes = [len(batch) for batch in max(first, second, key=len)[1:]]
        assert sum(sizes) == 12
        # The two start one behind the other; waiting for the expected second request puts
        # them in step, two to a batch (but the first and last calls). Without the wait they
        # stay out of step, one a batch.
        assert sizes == ([1, 2, 2, 2, 2, 2, 1] if in_step else [1] * 12)


async def test_a_failing_batch_answers_500_to_each_of_its_requests(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    write(tmp_path / "handler.py", BATCH_HANDLER)
    async with running("--handler", str(tmp_path)) as replica:
        first = asyncio.create_task(session.post(replica.url, data=b"sleep 0.4"))
        await asyncio.sleep(0.2)
        boom, neighbour = await asyncio.gather(
            session.post(replica.url, data=b"boom"), session.post(replica.url, data=b"other")
        )
        for response in (boom, neighbour):
            assert response.status == 500
            assert await response.text() == "ValueError: bad batch\n"
        assert (await first).status == 200

        async with session.post(replica.url, data=b"short") as response:
            assert response.status == 500
            assert await response.text() == (
                "TypeError: handle_batch() returned 0 results for 1 events; "
                "return a list with one result per event\n"
            )
        async with session.post(replica.url, data=b"fine") as response:
            assert response.status == 200
            assert (await response.json())["batch"] == ["fine"]


async def test_a_request_that_times_out_in_the_queue_is_never_run(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    write(tmp_path / "handler.py", BATCH_HANDLER)
    async with running("--handler", str(tmp_path), env={"exec_timeout": "0.5s"}) as replica:
        first = asyncio.create_task(session.post(replica.url, data=b"sleep 1"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        async with session.post(replica.url, data=b"late") as response:
            assert response.status == 504
            assert await response.text() == "Timed out after 0.5s.\n"
        assert time.monotonic() - started < 0.9
        async with await first as response:
            assert response.status == 504  # it ran past exec_timeout too
        await asyncio.sleep(0.6)  # the first batch's thread is free again
        async with session.post(replica.url, data=b"after") as response:
            assert response.status == 200
            assert (await response.json())["seen"] == [["sleep 1"], ["after"]]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("raise RuntimeError('weights missing')\n", "RuntimeError: weights missing"),
        ("handle = 42\n", "defines no handle(event, context) or handle_batch(events, context)"),
    ],
)
async def test_a_handler_that_cannot_load_exits_nonzero(
    tmp_path: Path, source: str, expected: str
) -> None:
    write(tmp_path / "handler.py", source)
    replica = await spawn("--port", "0", "--handler", str(tmp_path))
    assert await asyncio.wait_for(replica.process.wait(), 10) == 1
    assert replica.process.stdout is not None
    assert await replica.process.stdout.read() == b""
    await replica.wait_for_log(expected)
    assert "Traceback" in replica.log


async def test_no_function_is_refused_at_start() -> None:
    replica = await spawn("--port", "0")
    assert await asyncio.wait_for(replica.process.wait(), 10) == 2
    await replica.wait_for_log("Provide a valid process via fprocess")


async def test_health_is_503_until_the_handler_is_imported(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    write(
        tmp_path / "handler.py",
        """
        import time
        time.sleep(1.5)

        def handle(event, context):
            return "loaded"
        """,
    )
    port = free_port()
    replica = await spawn("--port", str(port), "--handler", str(tmp_path))
    replica.port = port
    try:
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline, f"never answered; log:\n{replica.log}"
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"{replica.url}/_/health") as response:
                    assert response.status == 503
                    break
            await asyncio.sleep(0.05)
        async with session.get(f"{replica.url}/") as response:
            assert response.status == 503

        assert await read_port(replica) == port
        async with session.get(f"{replica.url}/_/health") as response:
            assert (response.status, await response.text()) == (200, "OK")
        async with session.post(f"{replica.url}/_/health") as response:
            assert response.status == 405
        async with session.get(f"{replica.url}/") as response:
            assert (response.status, await response.text()) == (200, "loaded")
    finally:
        replica.process.kill()
        await replica.process.wait()


# --- the tiny-cpu sample ----------------------------------------------------------------


async def test_tiny_cpu_classifies_with_the_given_weights(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    rng = np.random.default_rng(7)
    weights = {
        "w1": rng.normal(size=(64, 128)).astype(np.float32),
        "b1": rng.normal(size=128).astype(np.float32),
        "w2": rng.normal(size=(128, 10)).astype(np.float32),
        "b2": rng.normal(size=10).astype(np.float32),
    }
    np.savez(tmp_path / "weights.npz", **weights)
    inputs = rng.normal(size=(5, 64)).astype(np.float32)
    hidden = np.maximum(inputs @ weights["w1"] + weights["b1"], 0)
    logits = hidden @ weights["w2"] + weights["b2"]

    env = {"TINY_CPU_WEIGHTS": str(tmp_path / "weights.npz")}
    async with running("--handler", str(REPO / "functions" / "tiny-cpu"), env=env) as replica:
        async with session.post(replica.url, json={"inputs": inputs.tolist()}) as response:
            assert response.status == 200
            result = await response.json()
        assert result["predictions"] == logits.argmax(axis=1).tolist()
        probabilities = np.array(result["probabilities"])
        assert probabilities.shape == (5, 10)
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
        assert np.allclose(probabilities, expected, atol=1e-4)

        bad = [
            (b"not json", "not JSON"),
            (b'{"rows": []}', '"inputs" key'),
            (b'{"inputs": []}', "non-empty list"),
            (b'{"inputs": [[1, 2, 3]]}', "inputs[0] must be a list of 64 numbers, not 3 items"),
            (json.dumps({"inputs": [[0.0] * 63 + ["x"]]}).encode(), "not a number"),
            (b'{"inputs": [[' + b"NaN," * 63 + b"1]]}", "finite"),
        ]
        for body, message in bad:
            async with session.post(replica.url, data=body) as response:
                assert response.status == 400, body
                assert message in (await response.json())["error"]
        assert "random weights" not in replica.log


async def test_tiny_cpu_starts_from_seeded_random_weights(
    session: aiohttp.ClientSession,
) -> None:
    handler_dir = str(REPO / "functions" / "tiny-cpu")
    async with running("--handler", handler_dir) as one, running("--handler", handler_dir) as two:
        body = {"inputs": [[float(i % 7) for i in range(64)]] * 2}
        answers = []
        for replica in (one, two):
            async with session.post(replica.url, json=body) as response:
                assert response.status == 200
                answers.append(await response.json())
            assert "TINY_CPU_WEIGHTS is not set; using random weights (seed 0)" in replica.log
        assert answers[0] == answers[1]
        assert len(answers[0]["predictions"]) == 2


# --- lifetime tied to the parent ----------------------------------------------------------


async def test_exits_with_its_parent_killing_fprocess_children(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    script = write(tmp_path / "sleeper.py", SLEEPER)
    pids = tmp_path / "pids"
    # The parent is a shell that prints its pid and starts the runtime. Its own parent then
    # becomes `sleep`, which never reaps it: killed with -9 it stays a zombie, as a provider
    # killed with -9 may, and a zombie still answers kill(pid, 0).
    parent = " ".join(RUNTIME_COMMAND) + " --port 0 --parent-pid $$ & echo $$; wait"
    holder = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f"sh -c '{parent}' & exec sleep 30 >/dev/null",
        env=runtime_env({"fprocess": f"{sys.executable} {script} {pids}"}),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert holder.stdout is not None
        shell = int(await asyncio.wait_for(holder.stdout.readline(), 10))
        line = await asyncio.wait_for(holder.stdout.readline(), 10)
        port = int(line.removeprefix(b"Listening on port: "))
        request = asyncio.create_task(session.post(f"http://127.0.0.1:{port}/"))
        child, grandchild = (int(pid) for pid in (await wait_for_file(pids)).split())

        os.kill(shell, signal.SIGKILL)
        # The runtime held the other end of the pipe: EOF means it has exited.
        assert await asyncio.wait_for(holder.stdout.read(), 4) == b""
        assert process_state(shell) == "Z"
        await wait_gone(child)
        await wait_gone(grandchild)
        with contextlib.suppress(aiohttp.ClientError):
            (await request).close()
    finally:
        holder.kill()
        await holder.wait()


async def test_exits_when_a_parent_pid_that_is_not_its_parent_ends() -> None:
    other = await asyncio.create_subprocess_exec("sleep", "30")
    async with running("--parent-pid", str(other.pid), env={"fprocess": "cat"}) as replica:
        other.kill()
        await other.wait()
        assert await asyncio.wait_for(replica.process.wait(), 4) == 0
        await replica.wait_for_log(f"Parent process {other.pid} is gone")


# A handler that fails as torch does once its MPS server is gone ("lose"), or as a CUDA
# allocation that does not fit fails ("oom"); "batch" names the mode it runs in.
LOST_GPU_HANDLER = """
import os

MPS_GONE = (
    "CUDA error: the remote procedural call between the MPS server and the MPS client failed\\n"
    "CUDA kernel errors might be asynchronously reported at some other API call"
)
calls = 0


class AcceleratorError(RuntimeError):
    pass


def answer(body):
    global calls
    calls += 1
    if body == b"lose":
        raise AcceleratorError(MPS_GONE)
    if body == b"oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.79 GiB")
    return {"body": {"calls": calls}}
"""


@pytest.mark.parametrize(
    "entry",
    [
        "def handle(event, context):\n    return answer(event.body)\n",
        "def handle_batch(events, context):\n    return [answer(e.body) for e in events]\n",
    ],
    ids=["handle", "handle_batch"],
)
async def test_a_lost_gpu_context_makes_the_replica_not_ready_for_good(
    tmp_path: Path, session: aiohttp.ClientSession, entry: str
) -> None:
    write(tmp_path / "handler.py", LOST_GPU_HANDLER + "\n\n" + entry)
    async with running("--handler", str(tmp_path)) as replica:
        # An error that a later call may not meet leaves the replica ready.
        async with session.post(replica.url, data=b"oom") as response:
            assert response.status == 500
        async with session.get(f"{replica.url}/_/health") as response:
            assert response.status == 200

        async with session.post(replica.url, data=b"lose") as response:
            assert response.status == 500
            assert "remote procedural call" in await response.text()
        lost = (
            "AcceleratorError: CUDA error: the remote procedural call between the MPS server "
            "and the MPS client failed"
        )
        async with session.get(f"{replica.url}/_/health") as response:
            assert response.status == 503
            assert await response.text() == f"GPU context lost: {lost}\n"
        await replica.wait_for_log(f"GPU context lost ({lost}): not ready from now on")
        # Calls are turned away at once, without running the handler (it would count them).
        async with session.post(replica.url, data=b"fine") as response:
            assert response.status == 503
            assert "lost its GPU context" in await response.text()
        async with session.get(f"{replica.url}/_/health") as response:
            assert response.status == 503
        assert replica.log.count("GPU context lost (") == 1
