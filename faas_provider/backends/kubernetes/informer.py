"""A local copy of one kind of Kubernetes object, kept by list and watch.

As client-go's informers: list, then watch from the list's resourceVersion; a watch that ends
or drops is resumed from the last resourceVersion seen, so no event is lost, and one the API
server can no longer resume (410 Gone) starts over with a fresh list, which replaces the copy
whole. While the API server cannot be reached, or refuses, it retries with backoff and says why once
in the log, and once more when it is back. Objects are plain dicts, as the API sends them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("fast_gshare.kubernetes")

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
ListCall = Callable[..., Awaitable[Any]]  # a kubernetes_asyncio list_* method
WATCH_TIMEOUT_S = 240  # the API server ends each watch after this; it is then resumed
MAX_BACKOFF_S = 5.0


def key_of(obj: dict[str, Any]) -> Key:
    """The (namespace, name) of an object."""
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


async def checked(response: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    """`response` of a call made with `_preload_content=False` (which raises nothing), or the
    ApiException its error status and body say."""
    if 200 <= response.status <= 299:
        return response
    body = await response.read()
    response.release()
    try:
        reason = str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        reason = body.decode(errors="replace")[:200] or response.reason or ""
    raise ApiException(status=response.status, reason=reason)


async def list_document(list_call: ListCall, **arguments: Any) -> dict[str, Any]:
    """The List object a kubernetes_asyncio `list_*` call answers, as the API sent it."""
    response = await checked(await list_call(**arguments, _preload_content=False))
    document: dict[str, Any] = json.loads(await response.read())
    return document


def _newer(incoming: dict[str, Any], held: dict[str, Any] | None) -> bool:
    """Whether `incoming` is not older than `held`: resourceVersions are etcd revisions, which
    grow; one that is not a number is taken as newer."""
    if held is None:
        return True
    try:
        return int(incoming["metadata"]["resourceVersion"]) >= int(
            held["metadata"]["resourceVersion"]
        )
    except (KeyError, ValueError):
        return True


class Informer:
    """The objects one list call returns, kept current by its watch."""

    def __init__(self, kind: str, list_call: ListCall, **selectors: str) -> None:
        """`list_call` is a kubernetes_asyncio `list_*` method; `selectors` its label_selector
        or field_selector."""
        self.kind = kind
        self.items: dict[Key, dict[str, Any]] = {}
        self.synced = asyncio.Event()  # listed once
        self.tried = asyncio.Event()  # listed once, or failed to
        self.problem: str | None = None  # why the copy is not current, while it is not
        self.on_change: Callable[[str, dict[str, Any]], None] | None = None
        self._list_call = list_call
        self._selectors = selectors
        self._changed = asyncio.Event()
        self._resource_version: str | None = None

    async def run(self) -> None:
        """Keep the copy current until cancelled."""
        backoff = 0.25
        while True:
            try:
                if self._resource_version is None:
                    await self._list()
                await self._watch()
                backoff = 0.25
            except ApiException as error:
                if error.status == 410:  # too old to resume: list again
                    log.info("watch of %s expired; listing again", self.kind)
                    self._resource_version = None
                    continue
                if error.status in (401, 403):
                    self._lost(
                        f"the API server refuses to list {self.kind} ({error.status} "
                        f"{error.reason}): give the provider's ServiceAccount the rules of "
                        "k8s/rbac.yaml"
                    )
                else:
                    self._lost(
                        f"the API server failed to list {self.kind}: {error.status} {error.reason}"
                    )
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                reason = str(error) or type(error).__name__
                self._lost(f"the Kubernetes API server does not answer: {reason}")
            except (ValueError, KeyError, TypeError) as error:  # an answer that is not a list
                self._resource_version = None
                self._lost(f"the API server's answer for {self.kind} is unreadable: {error!r}")
            else:
                continue
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF_S, backoff * 2)

    def apply(self, event: str, obj: dict[str, Any]) -> None:
        """Take in one object (from the watch, or the answer to our own write)."""
        key = key_of(obj)
        if event == "DELETED":
            if key in self.items and _newer(obj, self.items[key]):
                del self.items[key]
        elif _newer(obj, self.items.get(key)):
            self.items[key] = obj
        else:
            return
        if self.on_change is not None:
            self.on_change(event, obj)
        self._notify()

    async def wait_changed(self, timeout_s: float) -> None:
        """Return when something changed, or after `timeout_s`."""
        changed = self._changed
        try:
            async with asyncio.timeout(timeout_s):
                await changed.wait()
        except TimeoutError:
            pass

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _lost(self, problem: str) -> None:
        if problem != self.problem:
            log.warning("%s (watching %s)", problem, self.kind)
        self.problem = problem
        self.tried.set()
        self._notify()

    def _found(self) -> None:
        if self.problem is not None:
            log.info("the Kubernetes API server answers again (watching %s)", self.kind)
        self.problem = None

    async def _list(self) -> None:
        document = await list_document(self._list_call, **self._selectors)
        self._found()
        fresh = {key_of(obj): obj for obj in document.get("items", [])}
        for key, obj in list(self.items.items()):
            if key not in fresh:
                del self.items[key]
                if self.on_change is not None:
                    self.on_change("DELETED", obj)
        for obj in fresh.values():
            obj.setdefault("metadata", {})
            self.items[key_of(obj)] = obj
            if self.on_change is not None:
                self.on_change("ADDED", obj)
        self._resource_version = document["metadata"]["resourceVersion"]
        self.synced.set()
        self.tried.set()
        self._notify()

    async def _watch(self) -> None:
        response = await checked(
            await self._list_call(
                **self._selectors,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=self._resource_version,
                timeout_seconds=WATCH_TIMEOUT_S,
                _preload_content=False,
            )
        )
        self._found()
        try:
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                self._resource_version = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self.apply(kind, obj)
        finally:
            response.release()
