"""One function replica over HTTP, with the OpenFaaS watchdogs' semantics.

Two ways to run a function:

- fprocess mode, as the classic watchdog: each request forks the `fprocess` command with the
  body on stdin and the request in `Http_*` environment variables, and answers its output.
- handler mode, as the python3-http template behind the of-watchdog: `DIR/handler.py` is
  imported once and `handle(event, context)` is called per request in a thread pool, so a model
  loaded at import stays loaded between requests.
- batch handler mode: when `DIR/handler.py` also defines `handle_batch(events, context)`, one
  thread calls it with the requests that queued while the previous call ran (up to
  `max_batch_size`; a batch may wait up to `max_batch_delay` for requests that recent load
  says are coming), and it returns one result per event. A batch-1 model on a GPU is bound by
  kernel launches, so a batch of concurrent requests costs about what one does. With
  `batches_in_flight` N > 1, up to N calls run at once, each on a thread of its own, so a
  thread-safe handler prepares one batch while the GPU runs another.

`GET /_/health` answers 200 once the function is loaded, and 503 from the moment a handler
raised an error that says its GPU context is lost (runtime/lost_gpu.py): such a replica can
never serve again, answers every call with 503 at once, and waits to be replaced. Every other
path and method invokes the function.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDictProxy, MultiDictProxy
from pydantic import BaseModel, ConfigDict, Field, model_validator

from faas_provider.runtime.lost_gpu import lost_gpu

log = logging.getLogger("fast_gshare.runtime")

HEALTH_PATH = "/_/health"
DEFAULT_EXEC_TIMEOUT_S = 30.0
# Without max_inflight, handle() runs on as many threads as waitress (the python3-http
# template's server) gives it by default, so handlers see the concurrency they were written for.
DEFAULT_HANDLER_THREADS = 4
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_DELAY_S = 0.005
DEFAULT_BATCHES_IN_FLIGHT = 1
BATCH_MEMORY = 16  # batches over which a replica remembers how many requests it held at once
PLAIN_TEXT = "text/plain; charset=utf-8"
FLASK_DEFAULT_CONTENT_TYPE = "text/html; charset=utf-8"

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = r"(\d+\.?\d*|\.\d+)(ns|us|ms|s|m|h)"
_GO_DURATION = re.compile(rf"([+-]?)((?:{_DURATION_PART})+)")
_HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_duration(text: str) -> float:
    """Seconds in `text`, read as the watchdogs read `exec_timeout`.

    A whole number is seconds ("30"); anything else must be a Go duration ("1m30s", "500ms").
    Raises ValueError otherwise.
    """
    if text.isascii() and text.isdigit():
        return float(text)
    match = _GO_DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is neither whole seconds nor a Go duration such as 1m30s")
    seconds = sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in re.findall(_DURATION_PART, match[2])
    )
    return -seconds if match[1] == "-" else seconds


def canonical_header_key(name: str) -> str:
    """Go's canonical form of a header name (`x-call-id` -> `X-Call-Id`), as the watchdog sees it.

    Names with characters outside the HTTP token set are left as they are, as Go leaves them.
    """
    if not _HEADER_TOKEN.fullmatch(name):
        return name
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


class RuntimeConfig(BaseModel):
    """Settings of one replica: its command line plus the watchdog's environment variables."""

    model_config = ConfigDict(frozen=True)

    port: int = Field(default=0, ge=0, le=65535)
    handler_dir: Path | None = None
    fprocess: str = ""
    exec_timeout_s: float | None = Field(default=DEFAULT_EXEC_TIMEOUT_S, gt=0)
    content_type: str = ""
    write_debug: bool = False
    combine_output: bool = True
    max_inflight: int = Field(default=0, ge=0)
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1)
    max_batch_delay_s: float = Field(default=DEFAULT_MAX_BATCH_DELAY_S, ge=0)
    batches_in_flight: int = Field(default=DEFAULT_BATCHES_IN_FLIGHT, ge=1)
    parent_pid: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _has_function(self) -> RuntimeConfig:
        if self.handler_dir is None and not self.fprocess:
            raise ValueError(
                "Provide a valid process via fprocess environmental variable, or --handler DIR."
            )
        return self

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str],
        *,
        port: int = 0,
        handler_dir: Path | None = None,
        parent_pid: int | None = None,
    ) -> RuntimeConfig:
        """The config from the command line's values and the watchdog variables in `environ`.

        `exec_timeout` of 0 (or negative) means no limit, as in the watchdogs. Raises ValueError
        (a pydantic ValidationError for a bad `max_inflight`, `max_batch_size`,
        `batches_in_flight` or a negative `max_batch_delay`) for an unreadable value.
        """
        timeout = _read_duration(environ, "exec_timeout", DEFAULT_EXEC_TIMEOUT_S)
        return cls(
            port=port,
            handler_dir=handler_dir,
            fprocess=environ.get("fprocess", ""),
            exec_timeout_s=timeout if timeout > 0 else None,
            content_type=environ.get("content_type", ""),
            write_debug=environ.get("write_debug") == "true",
            combine_output=(environ.get("combine_output") or "true") == "true",
            max_inflight=environ.get("max_inflight") or 0,
            max_batch_size=environ.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE,
            max_batch_delay_s=_read_duration(environ, "max_batch_delay", DEFAULT_MAX_BATCH_DELAY_S),
            batches_in_flight=environ.get("batches_in_flight") or DEFAULT_BATCHES_IN_FLIGHT,
            parent_pid=parent_pid,
        )


def _read_duration(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "")
    try:
        return parse_duration(raw) if raw else default
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


@dataclass
class Event:
    """A request as the python3-http template hands it to `handle`."""

    body: bytes
    headers: CIMultiDictProxy[str]
    method: str
    query: MultiDictProxy[str]
    path: str


@dataclass(frozen=True)
class Context:
    """Where `handle` runs, as the python3-http template describes it."""

    hostname: str


Handle = Callable[[Event, Context], Any]
HandleBatch = Callable[[list[Event], Context], list[Any]]


class InvocationError(Exception):
    """The function gave no answer of its own: the runtime answers `status` with the message."""

    def __init__(self, status: int, message: str, output: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = f"{message}\n".encode() + output


class Invoker(Protocol):
    """How a request reaches the function."""

    async def invoke(self, request: web.Request) -> web.Response:
        """The function's response to `request`; InvocationError when it gave none."""
        ...

    def close(self) -> None:
        """Stop what still runs for requests in flight."""
        ...


def cgi_environment(request: web.Request) -> dict[str, str]:
    """os.environ plus the request as the classic watchdog's `Http_*` variables.

    One `Http_<Header>` per header (Go's canonical name, `-` as `_`, the first value), then
    `Http_Method`, `Http_ContentLength` and `Http_Content_Length` (-1 when chunked),
    `Http_Path`, and `Http_Query` (raw) when there is a query string.
    """
    cgi: dict[str, str] = {}
    for name, value in request.headers.items():
        cgi.setdefault("Http_" + canonical_header_key(name).replace("-", "_"), value)
    chunked = request.headers.get("Transfer-Encoding", "").lower() == "chunked"
    length = str(-1 if chunked else request.content_length or 0)
    cgi |= {
        "Http_Method": request.method,
        "Http_ContentLength": length,
        "Http_Content_Length": length,
        "Http_Path": request.path,
    }
    if query := request.rel_url.raw_query_string:
        cgi["Http_Query"] = query
    return {**os.environ, **cgi}


class ForkInvoker:
    """fprocess mode: one child per request, in its own process group, as the classic watchdog."""

    def __init__(self, config: RuntimeConfig) -> None:
        self._config = config
        self._argv = config.fprocess.split(" ")  # the watchdog splits on spaces, without quoting
        self._children: set[asyncio.subprocess.Process] = set()

    async def invoke(self, request: web.Request) -> web.Response:
        """Fork fprocess with the body on stdin; answer its output (stdout and stderr combined
        unless `combine_output=false`)."""
        body = await request.read()
        log.info("Forking fprocess.")
        try:
            child = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT
                if self._config.combine_output
                else asyncio.subprocess.PIPE,
                env=cgi_environment(request),
                start_new_session=True,
            )
        except OSError as error:
            raise InvocationError(500, f'exec: "{self._argv[0]}": {error.strerror}') from None
        self._children.add(child)
        try:
            output, errors = await asyncio.wait_for(
                child.communicate(body), self._config.exec_timeout_s
            )
        except TimeoutError:
            log.info("Killing process: %s", self._config.fprocess)
            raise InvocationError(408, "Killed process.") from None
        finally:
            if child.returncode is None:
                _kill_group(child.pid)
                await child.wait()
            self._children.discard(child)
        if errors:
            log.info("stderr: %s", errors.decode(errors="replace"))
        if child.returncode != 0:
            raise InvocationError(500, _exit_reason(child.returncode), output)
        content_type = (
            self._config.content_type or request.headers.get("Content-Type") or PLAIN_TEXT
        )
        return web.Response(body=output, headers={"Content-Type": content_type})

    def close(self) -> None:
        """Kill the process group of every child still running."""
        for child in self._children:
            _kill_group(child.pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _exit_reason(returncode: int) -> str:
    """How a child ended, in Go's words: `exit status 3`, `signal: killed`."""
    if returncode < 0:
        name = signal.strsignal(-returncode) or f"signal {-returncode}"
        return f"signal: {name.lower()}"
    return f"exit status {returncode}"


@dataclass(frozen=True)
class HandlerModule:
    """What a handler directory defines: `handle`, `handle_batch`, or both."""

    handle: Handle | None
    handle_batch: HandleBatch | None


def load_handler(handler_dir: Path) -> HandlerModule:
    """Import `handler_dir/handler.py` as module `handler`; its `handle` and `handle_batch`.

    The directory goes first on sys.path, so the handler's sibling modules import too.
    TypeError when it defines neither function.
    """
    directory = handler_dir.resolve()
    path = directory / "handler.py"
    spec = importlib.util.spec_from_file_location("handler", path)
    assert spec is not None and spec.loader is not None  # always so for a .py path
    sys.path.insert(0, str(directory))
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler"] = module
    spec.loader.exec_module(module)
    handle, handle_batch = getattr(module, "handle", None), getattr(module, "handle_batch", None)
    if not callable(handle) and not callable(handle_batch):
        raise TypeError(
            f"{path} defines no handle(event, context) or handle_batch(events, context) function"
        )
    return HandlerModule(
        handle if callable(handle) else None, handle_batch if callable(handle_batch) else None
    )


async def load_handler_invoker(handler_dir: Path, config: RuntimeConfig) -> Invoker:
    """Import the handler on a thread (the server answers health checks meanwhile) and the
    invoker for it: batches when it defines `handle_batch` (on `batches_in_flight` threads,
    the first of which imported it), else a thread pool of `max_inflight` threads
    (DEFAULT_HANDLER_THREADS without a limit) calling `handle`."""
    loader = ThreadPoolExecutor(config.batches_in_flight, thread_name_prefix="handle")
    module = await asyncio.get_running_loop().run_in_executor(loader, load_handler, handler_dir)
    # A full collection walks every object tracked (0.17 s with torch imported); what the
    # handler's import made lives as long as the process, so no collection walks it again.
    gc.freeze()
    log.info("Handler loaded: %d objects kept out of garbage collection", gc.get_freeze_count())
    context = Context(hostname=os.environ.get("HOSTNAME", "localhost"))
    if module.handle_batch is not None:
        log.info(
            "Batching requests: up to %d a call of handle_batch(), waiting up to %gs to fill, "
            "%d call(s) at once",
            config.max_batch_size,
            config.max_batch_delay_s,
            config.batches_in_flight,
        )
        return BatchInvoker(module.handle_batch, loader, context, config)
    assert module.handle is not None
    loader.shutdown()
    pool = ThreadPoolExecutor(
        config.max_inflight or DEFAULT_HANDLER_THREADS, thread_name_prefix="handle"
    )
    return HandlerInvoker(module.handle, pool, context, config)


async def read_event(request: web.Request) -> Event:
    """The request as the python3-http template's event."""
    return Event(
        body=await request.read(),
        headers=request.headers,
        method=request.method,
        query=request.query,
        path=request.path,
    )


async def await_result(call: asyncio.Future[Any], exec_timeout_s: float | None) -> web.Response:
    """The response for what `call` gives; 504 when it runs past `exec_timeout_s`, 500 when
    it raised or gave what cannot be sent."""
    done, _ = await asyncio.wait({call}, timeout=exec_timeout_s)
    if not done:
        call.cancel()
        log.warning(
            "The handler is still running after exec_timeout; a thread cannot be stopped, so "
            "it stays busy until the handler returns"
        )
        raise InvocationError(504, f"Timed out after {exec_timeout_s:g}s.")
    try:
        return build_response(call.result())
    except Exception as error:
        raise InvocationError(500, f"{type(error).__name__}: {error}") from error


class HandlerInvoker:
    """handler mode: `handle(event, context)` called in a thread pool, module loaded once."""

    def __init__(
        self, handle: Handle, pool: ThreadPoolExecutor, context: Context, config: RuntimeConfig
    ) -> None:
        self._handle = handle
        self._pool = pool
        self._timeout = config.exec_timeout_s
        self._context = context

    async def invoke(self, request: web.Request) -> web.Response:
        """Call `handle` with the request; map its return value as the template does."""
        event = await read_event(request)
        loop = asyncio.get_running_loop()
        return await await_result(
            loop.run_in_executor(self._pool, self._handle, event, self._context), self._timeout
        )

    def close(self) -> None:
        """Drop queued calls; a running handle() cannot be stopped."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class BatchInvoker:
    """batch handler mode: requests queue while `handle_batch` runs; when fewer than
    `batches_in_flight` calls run, the next call takes up to `max_batch_size` of them, oldest
    first, on a thread of its own.

    A batch waits to fill only for requests that recent load says are coming: the expected
    size is the most requests the replica held at once during the last BATCH_MEMORY batches,
    less those in the batches running, at most `max_batch_size`. Fewer waiting: the batch
    waits for that many, at most `max_batch_delay`. Without the wait, a few closed-loop callers
    fall into step one behind another and every batch holds one request; with it, the callers
    answered last get back in time to share the next batch. A lone caller never waits. A
    request that times out while queued is dropped from the queue.
    """

    def __init__(
        self,
        handle_batch: HandleBatch,
        threads: ThreadPoolExecutor,
        context: Context,
        config: RuntimeConfig,
    ) -> None:
        self._handle_batch = handle_batch
        self._threads = threads
        self._context = context
        self._timeout = config.exec_timeout_s
        self._max_batch_size = config.max_batch_size
        self._max_batch_delay_s = config.max_batch_delay_s
        self._batches_in_flight = config.batches_in_flight
        self._queue: deque[tuple[Event, asyncio.Future[Any]]] = deque()
        self._running = 0  # calls of handle_batch running
        self._running_events = 0  # the requests in them
        self._filling: asyncio.TimerHandle | None = None  # set while a batch waits to fill
        self._held = 0  # requests received and not yet answered
        self._peak = 0  # the most held at once since the last batch started
        self._peaks: deque[int] = deque(maxlen=BATCH_MEMORY)

    async def invoke(self, request: web.Request) -> web.Response:
        """Queue the request for the next batch; map its result as the template does."""
        event = await read_event(request)
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((event, result))
        self._held += 1
        self._peak = max(self._peak, self._held)
        try:
            if self._filling is not None and len(self._queue) >= self._expected_size():
                self._run_next_batch()
            elif self._running < self._batches_in_flight and self._filling is None:
                self._start_filling()
            return await await_result(result, self._timeout)
        finally:
            self._held -= 1

    def _expected_size(self) -> int:
        held = max(self._peak, max(self._peaks, default=0))
        return min(self._max_batch_size, max(1, held - self._running_events))

    def _start_filling(self) -> None:
        """A thread is free: run the waiting requests now, or once the batch has had
        `max_batch_delay` to fill to its expected size."""
        if self._queue and self._max_batch_delay_s and len(self._queue) < self._expected_size():
            loop = asyncio.get_running_loop()
            self._filling = loop.call_later(self._max_batch_delay_s, self._run_next_batch)
        else:
            self._run_next_batch()

    def _run_next_batch(self) -> None:
        if self._filling is not None:
            self._filling.cancel()
            self._filling = None
        batch: list[tuple[Event, asyncio.Future[Any]]] = []
        while self._queue and len(batch) < self._max_batch_size:
            event, result = self._queue.popleft()
            if not result.done():  # a cancelled one timed out while it waited
                batch.append((event, result))
        if batch:
            self._running += 1
            self._running_events += len(batch)
            self._peaks.append(self._peak)
            self._peak = self._held
            events = [event for event, _ in batch]
            call = asyncio.get_running_loop().run_in_executor(
                self._threads, self._handle_batch, events, self._context
            )
            call.add_done_callback(lambda done: self._deliver(batch, done))
            if self._queue and self._running < self._batches_in_flight:
                self._start_filling()

    def _deliver(
        self, batch: list[tuple[Event, asyncio.Future[Any]]], call: asyncio.Future[list[Any]]
    ) -> None:
        if call.cancelled():  # the runtime is closing
            return
        results: list[Any] = []
        failure = call.exception()
        if failure is None:
            results = call.result()
            if not isinstance(results, list) or len(results) != len(batch):
                got = f"{len(results)} results" if isinstance(results, list) else repr(results)[:80]
                failure = TypeError(
                    f"handle_batch() returned {got} for {len(batch)} events; return a list "
                    "with one result per event"
                )
        for index, (_, result) in enumerate(batch):
            if result.done():
                continue
            if failure is not None:
                result.set_exception(failure)
            else:
                result.set_result(results[index])
        self._running -= 1
        self._running_events -= len(batch)
        if self._filling is None:
            self._start_filling()

    def close(self) -> None:
        """Drop queued requests; a running handle_batch() cannot be stopped."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._filling is not None:
            self._filling.cancel()
        for _, result in self._queue:
            result.cancel()
        self._queue.clear()


def build_response(result: object) -> web.Response:
    """The HTTP response for what `handle` returned, as the python3-http template maps it.

    None is an empty 200; a dict gives its `statusCode` (200), `body` and `headers`; anything
    else follows Flask's rules for a view's return value: a body alone, or a `(body, status)`,
    `(body, headers)` or `(body, status, headers)` tuple. A dict or list body is sent as JSON
    (as Flask's jsonify writes it), bytes as they are, anything else as `str()` in text/html.
    """
    if result is None:
        return _make_response("", 200, None)
    if isinstance(result, dict):
        return _make_response(
            result.get("body", ""), result.get("statusCode", 200), result.get("headers")
        )
    if isinstance(result, tuple):
        return _make_response(*_unpack_view_tuple(result))
    return _make_response(result, 200, None)


def _unpack_view_tuple(result: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    if len(result) == 3:
        body, status, headers = result
        return body, status, headers
    if len(result) == 2:
        body, extra = result
        if isinstance(extra, Mapping | list | tuple):
            return body, 200, extra
        return body, extra, None
    raise TypeError(
        f"handle() returned a tuple of {len(result)} items; expected (body, status), "
        "(body, headers) or (body, status, headers)"
    )


def _make_response(body: Any, status: Any, headers: Any) -> web.Response:
    if isinstance(body, dict | list):
        data = (json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n").encode()
        content_type = "application/json"
    elif isinstance(body, bytes):
        data, content_type = body, FLASK_DEFAULT_CONTENT_TYPE
    else:
        data, content_type = str(body).encode(), FLASK_DEFAULT_CONTENT_TYPE
    response = web.Response(body=data, status=int(status), headers={"Content-Type": content_type})
    for name, value in headers.items() if isinstance(headers, Mapping) else headers or ():
        response.headers[str(name)] = str(value)
    return response


class Runtime:
    """One replica's state: the function once loaded, readiness, and requests in flight."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.draining = False
        self.inflight = 0
        self.gpu_lost: str | None = None  # the error that said the GPU context is lost
        self._invoker: Invoker | None = None

    @property
    def ready(self) -> bool:
        """Whether the function is loaded, its GPU context (if any) not lost, and shutdown has
        not begun."""
        return self._invoker is not None and not self.draining and self.gpu_lost is None

    async def start(self) -> None:
        """Load the function: import handler.py in handler mode; nothing to do for fprocess."""
        if self.config.handler_dir is None:
            self._invoker = ForkInvoker(self.config)
        else:
            self._invoker = await load_handler_invoker(self.config.handler_dir, self.config)

    def close(self) -> None:
        """Kill in-flight fprocess children and drop queued handler calls."""
        if self._invoker is not None:
            self._invoker.close()

    async def health(self, request: web.Request) -> web.Response:
        """`GET /_/health`: 200 `OK` while ready, else 503 (saying why when the GPU context is
        lost); other methods 405."""
        if request.method != "GET":
            raise web.HTTPMethodNotAllowed(request.method, ["GET"])
        if self.ready:
            return web.Response(text="OK")
        if self.gpu_lost is not None:
            return web.Response(status=503, text=f"GPU context lost: {self.gpu_lost}\n")
        return web.Response(status=503)

    async def invoke(self, request: web.Request) -> web.Response:
        """Every other path and method: the function's response, with `X-Duration-Seconds`."""
        invoker = self._invoker
        if invoker is None:
            return web.Response(status=503, text="The function is still loading.\n")
        if self.gpu_lost is not None:
            return web.Response(
                status=503,
                text=f"This replica lost its GPU context ({self.gpu_lost}); it is being "
                "replaced.\n",
            )
        limit = self.config.max_inflight
        if limit and self.inflight >= limit:
            return web.Response(
                status=429,
                text=f"Concurrent request limit exceeded. Max concurrent requests: {limit}\n",
                headers={"X-OpenFaaS-Internal": "faas-middleware"},
            )
        self.inflight += 1
        started = time.monotonic()
        failure: InvocationError | None = None
        try:
            try:  # the whole body before anything runs; the invoker reads it again from memory
                await request.read()
            except ConnectionResetError:
                log.warning("Request body cut short (the connection was lost); not run")
                return web.Response(status=400, text="Request body cut short.\n")
            response = await invoker.invoke(request)
        except InvocationError as error:
            failure = error
            response = web.Response(
                status=error.status, body=error.body, headers={"Content-Type": PLAIN_TEXT}
            )
        finally:
            self.inflight -= 1
        duration = time.monotonic() - started
        response.headers["X-Duration-Seconds"] = f"{duration:f}"
        body = response.body if isinstance(response.body, bytes) else b""
        if self.config.write_debug:
            log.info("Out=%s", body.decode(errors="replace"))
        if failure is None:
            log.info("Wrote %d Bytes - Duration: %fs", len(body), duration)
        else:
            log.error("%s - Duration: %fs", failure, duration, exc_info=failure.__cause__)
            self._note_lost_gpu(failure)
        return response

    def _note_lost_gpu(self, failure: InvocationError) -> None:
        """Not ready for good when the handler's error says its GPU context is lost."""
        if self.gpu_lost is not None or failure.__cause__ is None:
            return
        self.gpu_lost = lost_gpu(failure.__cause__)
        if self.gpu_lost is not None:
            log.error(
                "GPU context lost (%s): not ready from now on; this replica waits to be replaced",
                self.gpu_lost,
            )


RUNTIME = web.AppKey("runtime", Runtime)


def create_runtime_app(config: RuntimeConfig) -> web.Application:
    """The replica's aiohttp app. Serve it, then `await app[RUNTIME].start()` to load the
    function; health answers 503 until that returns."""
    runtime = Runtime(config)
    app = web.Application(client_max_size=0)  # no body size limit, as in the watchdogs
    app[RUNTIME] = runtime
    app.router.add_route("*", HEALTH_PATH, runtime.health)
    app.router.add_route("*", "/{path:.*}", runtime.invoke)
    app.on_cleanup.append(_close_runtime)
    return app


async def _close_runtime(app: web.Application) -> None:
    app[RUNTIME].close()
