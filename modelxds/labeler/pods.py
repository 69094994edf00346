"""The ModelMesh runtime pods of one namespace, kept current by list and watch.

The sync `kubernetes` client runs in worker threads; every change to the cache is made
on the event loop, in the order the API server sent it. A watch that ends is resumed
from the last resourceVersion it delivered (bookmarks included); one that is too old
(410 Gone) is replaced by a fresh list. RBAC grants list and watch, never get.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelxds import metrics

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300  # the server ends each watch after this; it is resumed at once
CONNECT_TIMEOUT_S = 10.0
RETRY_FLOOR_S = 0.5
RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Pod:
    """What the labeler reads of a pod: its address and metadata."""

    namespace: str
    name: str
    ip: str
    resource_version: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], namespace: str = "") -> Pod:
        """A pod from its JSON object as the API server sends it."""
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        return cls(
            namespace=str(meta.get("namespace") or namespace),
            name=str(meta.get("name", "")),
            ip=str(status.get("podIP") or ""),
            resource_version=str(meta.get("resourceVersion", "")),
            labels=MappingProxyType(dict(meta.get("labels") or {})),
            annotations=MappingProxyType(dict(meta.get("annotations") or {})),
        )

    def newer_than(self, other: Pod) -> bool:
        """Whether this copy can replace ``other``. resourceVersions are opaque, but the
        API server's are etcd revisions: when both are numbers, an older copy (a watch
        event from before a patch whose answer is already here) is not taken."""
        mine, theirs = self.resource_version, other.resource_version
        if mine.isdigit() and theirs.isdigit():
            return int(mine) >= int(theirs)
        return True


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class PodWatch:
    """Owns the cache of one namespace's pods matching ``selector``.

    ``on_change(name)`` runs on the event loop for every pod added, changed or removed.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        selector: str,
        on_change: Callable[[str], None],
    ) -> None:
        self.namespace = namespace
        self.selector = selector
        self._api = client.CoreV1Api(api_client)
        self._on_change = on_change
        self.pods: dict[str, Pod] = {}
        self.listed = asyncio.Event()
        self._relist = asyncio.Event()
        self._stream: Any = None  # the open watch response, to cut it short

    def offer(self, pod: Pod) -> None:
        """A copy of a pod from elsewhere (a patch's answer)."""
        self._store(pod)

    def forget(self, name: str) -> None:
        """The pod is gone (a patch answered 404) before its watch said so."""
        if self.pods.pop(name, None) is not None:
            self._on_change(name)

    def relist(self) -> None:
        """Replace the cache with a fresh list: when its copies seem to lag behind."""
        self._relist.set()
        self._cut()

    async def run(self) -> None:
        """Keep the cache current until cancelled; never raises for API trouble."""
        backoff = RETRY_FLOOR_S
        while True:
            self._relist.clear()
            try:
                version = await self._list()
                backoff = RETRY_FLOOR_S
                while not self._relist.is_set():
                    version = await self._watch(version)
                metrics.LABELER_POD_WATCH_RESTARTS.labels("relist").inc()
                continue
            except _Gone:
                metrics.LABELER_POD_WATCH_RESTARTS.labels("gone").inc()
                log.info("pods in %s: watch too old (410 Gone), listing again", self.namespace)
                continue
            except Exception as e:  # an API answer or a broken connection: retry
                if self._relist.is_set():  # we cut the watch ourselves
                    metrics.LABELER_POD_WATCH_RESTARTS.labels("relist").inc()
                    continue
                metrics.LABELER_POD_WATCH_RESTARTS.labels("error").inc()
                log.warning(
                    "pods in %s: %s; retrying in %.1fs", self.namespace, _describe(e), backoff
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)

    async def _list(self) -> str:
        def fetch() -> dict[str, Any]:
            resp = self._api.list_namespaced_pod(
                self.namespace,
                label_selector=self.selector,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT_S, 60.0),
            )
            return json.loads(resp.data)  # type: ignore[no-any-return]

        listing = await asyncio.to_thread(fetch)
        fresh = {}
        for obj in listing.get("items") or ():
            pod = Pod.from_object(obj, self.namespace)
            fresh[pod.name] = pod
        touched = set(self.pods) | set(fresh)
        self.pods = fresh
        self.listed.set()
        for name in sorted(touched):
            self._on_change(name)
        return str((listing.get("metadata") or {}).get("resourceVersion", ""))

    async def _watch(self, version: str) -> str:
        """Apply events until the server ends the watch; the resourceVersion to resume at."""
        loop = asyncio.get_running_loop()
        resume = [version]
        done = threading.Event()  # set on the loop when this watch is over, cancelled too

        def stream() -> None:
            resp = self._api.list_namespaced_pod(
                self.namespace,
                label_selector=self.selector,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_TIMEOUT_S,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT_S, WATCH_TIMEOUT_S + 30.0),
            )
            self._stream = resp  # before the check: either we see `done`, or _cut sees this
            try:
                if done.is_set():
                    return
                for event in _events(resp):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == HTTPStatus.GONE:
                            raise _Gone()
                        raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        resume[0] = str(rv)
                    if done.is_set():
                        return
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        loop.call_soon_threadsafe(self._event, kind, obj)
            finally:
                self._stream = None
                resp.release_conn()

        try:
            await asyncio.to_thread(stream)
        except ApiException as e:
            if e.status == HTTPStatus.GONE:
                raise _Gone() from None
            raise
        finally:
            done.set()
            self._cut()  # cancelled: the thread must not go on reading for minutes
        return resume[0]

    def _cut(self) -> None:
        resp = self._stream
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def _event(self, kind: str, obj: Mapping[str, Any]) -> None:
        pod = Pod.from_object(obj, self.namespace)
        if kind == "DELETED":
            self.forget(pod.name)
        else:
            self._store(pod)

    def _store(self, pod: Pod) -> None:
        seen = self.pods.get(pod.name)
        if seen is not None and not pod.newer_than(seen):
            return
        self.pods[pod.name] = pod
        self._on_change(pod.name)


def _events(resp: Any) -> Iterator[dict[str, Any]]:
    """The watch events of a response: one JSON object a line."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"the API server answered {e.status} {e.reason or ''}".rstrip()
    return f"{type(e).__name__}: {e}"
