"""The routing policy from Kubernetes: DestinationRule and VirtualService objects of
modelxds.io (the CRDs in manifests/crds), watched, read into a `Policy` and reported on in
their status.

Each kind in each watched namespace has a thread of its own that lists, then watches from
the list's resourceVersion (bookmarks keep it fresh; 410 Gone re-lists; other failures
retry with backoff), and posts what it sees to the event loop. The loop keeps the objects,
and after every batch of changes reads them (`read_objects`: one by one, collisions
decided by age) into the policy it hands on, then writes each object's conditions:

* ``Accepted``: True (reason Accepted), or False (reason Invalid, the message says what
  is wrong and where);
* ``Programmed``: True (reason Programmed) once a config built from a policy holding the
  object has been published to the gateways; else False, reason Invalid or Pending.

A status is patched only when it changes. A policy that routes no port never replaces one
that does, unless empty policies are allowed: deleting the last VirtualService, or
breaking it, leaves the gateways as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, watch

from modelxds import metrics
from modelxds.policy.loader import ObjectKey, object_key, read_objects
from modelxds.policy.model import DestinationRule, Policy, VirtualService

GROUP = "modelxds.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURALS = {"DestinationRule": "destinationrules", "VirtualService": "virtualservices"}
ACCEPTED = "Accepted"
PROGRAMMED = "Programmed"
# metav1.Condition's limit on message
MESSAGE_MAX = 32768
# A watch is renewed this often; the read timeout leaves room for the server to end it.
WATCH_SECONDS = 300
_LIST_TIMEOUT = (10, 60)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 30.0

JSON = dict[str, Any]
log = logging.getLogger(__name__)


# --- what the watch threads post to the loop -------------------------------------------


@dataclass(frozen=True, slots=True)
class _Listed:
    """Every object of one kind in one namespace, as of a list."""

    kind: str
    namespace: str
    items: tuple[JSON, ...]


@dataclass(frozen=True, slots=True)
class _Changed:
    kind: str
    namespace: str
    obj: JSON
    deleted: bool


_Post = Callable[["_Listed | _Changed | None"], None]


class LoopClosed(Exception):
    """The event loop the watch threads post to has stopped."""


class _Stream:
    """List and watch one kind in one namespace, in a thread of its own (the client's
    calls block)."""

    def __init__(
        self,
        api: client.CustomObjectsApi,
        kind: str,
        namespace: str,
        post: _Post,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.api, self.kind, self.namespace, self._post = api, kind, namespace, post
        self.watch_seconds = watch_seconds
        self.plural = PLURALS[kind]
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{self.plural}-{namespace}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        current = self._watch
        if current is not None:
            current.stop()  # unblocks the read the thread waits in

    def _run(self) -> None:
        version: str | None = None  # None: list first
        delay = _BACKOFF_FIRST
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._follow(version)
                delay = _BACKOFF_FIRST
            except client.ApiException as e:
                if e.status == 410:
                    # our version left the server's history: re-list, at once
                    log.info(
                        "%s in %s: watch expired (410 Gone), re-listing",
                        self.plural,
                        self.namespace,
                    )
                    metrics.POLICY_WATCH_RESTARTS.labels(self.kind, "expired").inc()
                    version = None
                    continue
                self._failed(_api_problem(e, self.plural, self.namespace), delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            except LoopClosed:
                return
            except Exception as e:  # connection refused or reset, a timeout, a bad body
                self._failed(f"{self.plural} in {self.namespace}: {e!r}", delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def _failed(self, problem: str, delay: float) -> None:
        if self._stop.is_set():
            return
        metrics.POLICY_WATCH_RESTARTS.labels(self.kind, "error").inc()
        log.warning("%s; retrying in %.1f s", problem, delay)
        self._stop.wait(delay * random.uniform(0.8, 1.2))

    def _list(self) -> str:
        listed = self.api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, _request_timeout=_LIST_TIMEOUT
        )
        items = tuple({**item, "kind": self.kind} for item in listed.get("items") or ())
        self._post(_Listed(self.kind, self.namespace, items))
        version: str = listed["metadata"]["resourceVersion"]
        return version

    def _follow(self, version: str) -> str:
        """Watch from ``version`` until the server ends the watch; returns the version to
        go on from (bookmarks move it on while nothing changes)."""
        self._watch = watch.Watch()
        try:
            for event in self._watch.stream(
                self.api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                self.plural,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_seconds,
                _request_timeout=(10, self.watch_seconds + 30),
            ):
                obj = event["raw_object"]
                version = obj["metadata"]["resourceVersion"]
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self._post(
                        _Changed(
                            self.kind,
                            self.namespace,
                            {**obj, "kind": self.kind},
                            event["type"] == "DELETED",
                        )
                    )
                if self._stop.is_set():
                    break
        finally:
            self._watch = None
        return version


def _api_problem(e: client.ApiException, plural: str, namespace: str) -> str:
    hint = {
        403: f"; the service account needs get/list/watch on {plural}.{GROUP} (RBAC)",
        404: f"; is the CRD installed? (kubectl apply -k manifests/crds: {plural}.{GROUP})",
    }.get(e.status or 0, "")
    return f"{plural} in {namespace}: the API server answered {e.status} {e.reason}{hint}"


# --- status ---------------------------------------------------------------------------


def desired_status(
    current: Mapping[str, Any] | None,
    generation: int,
    problems: Sequence[str],
    programmed: bool,
    pending: str,
    now: str,
) -> JSON:
    """The status an object should have; a condition keeps its lastTransitionTime while
    its status stays the same (as metav1 conditions do).

    Not yet programmed here does not undo Programmed for the same generation: another
    replica, or this process before a restart, published it, and this one will."""
    before = {
        c.get("type"): c for c in (current or {}).get("conditions") or () if isinstance(c, Mapping)
    }

    def condition(kind: str, ok: bool, reason: str, message: str) -> JSON:
        status = "True" if ok else "False"
        old = before.get(kind)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        if len(message) > MESSAGE_MAX:
            message = message[: MESSAGE_MAX - 20] + "\n... (truncated)"
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since or now,
            "observedGeneration": generation,
        }

    if problems:
        accepted = condition(ACCEPTED, False, "Invalid", "\n".join(problems))
        shown = condition(PROGRAMMED, False, "Invalid", "not programmed: the object is invalid")
    else:
        accepted = condition(ACCEPTED, True, "Accepted", "valid; collides with no other rule")
        old = before.get(PROGRAMMED)
        if programmed:
            shown = condition(
                PROGRAMMED, True, "Programmed", "in the config served to the gateways"
            )
        elif old and old.get("status") == "True" and old.get("observedGeneration") == generation:
            shown = dict(old)
        else:
            shown = condition(PROGRAMMED, False, "Pending", pending)
    return {"observedGeneration": generation, "conditions": [accepted, shown]}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the watcher ------------------------------------------------------------------------


class PolicyWatcher:
    """Watches the objects in ``namespaces`` and hands every new policy (``base``, the
    policy files', plus the valid objects) to ``apply``. Call ``published`` with each
    policy a published config was built from, so objects can be reported Programmed."""

    def __init__(
        self,
        api: client.ApiClient,
        namespaces: Sequence[str],
        apply: Callable[[Policy], None],
        *,
        base: Policy | None = None,
        allow_empty: bool = False,
        retry_s: float = 5.0,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.api = client.CustomObjectsApi(api)
        self.namespaces = tuple(dict.fromkeys(namespaces))
        self._apply = apply
        self._base = base
        self._allow_empty = allow_empty
        self._retry_s = retry_s
        self._watch_seconds = watch_seconds
        # set once a policy has been handed to `apply`: the first config may go out
        self.ready = asyncio.Event()
        self._objects: dict[tuple[str, str], dict[ObjectKey, JSON]] = {}
        self._handed: Policy | None = None
        self._held: Policy | None = None  # the last policy not handed on: it routes no port
        self._published: Policy | None = None
        # key -> (resourceVersion the patch was based on, status written)
        self._written: dict[ObjectKey, tuple[str, JSON]] = {}
        self._queue: asyncio.Queue[_Listed | _Changed | None] | None = None
        self._retry: asyncio.TimerHandle | None = None

    def set_base(self, base: Policy | None) -> None:
        """New policy files (SIGHUP): rebuild with them."""
        self._base = base
        self._wake()

    def published(self, policy: Policy) -> None:
        """On the event loop: a config built from ``policy`` went out to the gateways."""
        self._published = policy
        self._wake()

    def _wake(self) -> None:
        if self._queue is not None:
            self._queue.put_nowait(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Listed | _Changed | None] = asyncio.Queue()
        self._queue = queue

        def post(event: _Listed | _Changed | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError as e:  # raised by a closed loop
                raise LoopClosed from e

        streams = [
            _Stream(self.api, kind, ns, post, self._watch_seconds)
            for kind in PLURALS
            for ns in self.namespaces
        ]
        for stream in streams:
            stream.start()
        log.info(
            "watching %s in %s",
            ", ".join(f"{p}.{GROUP}" for p in PLURALS.values()),
            ", ".join(self.namespaces),
        )
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                for event in batch:
                    self._take(event)
                # a partial view (VirtualServices listed, their DestinationRules not yet)
                # would report valid objects invalid
                if len(self._objects) == len(streams):
                    await self._sync()
        finally:
            for stream in streams:
                stream.stop()
            if self._retry is not None:
                self._retry.cancel()
            self._queue = None

    def _take(self, event: _Listed | _Changed | None) -> None:
        if isinstance(event, _Listed):
            listed = {object_key(o): o for o in event.items}
            gone = set(self._objects.get((event.kind, event.namespace), {})) - set(listed)
            for key in gone:
                self._written.pop(key, None)
            self._objects[(event.kind, event.namespace)] = listed
        elif isinstance(event, _Changed):
            objects = self._objects.setdefault((event.kind, event.namespace), {})
            key = object_key(event.obj)
            if event.deleted:
                objects.pop(key, None)
                self._written.pop(key, None)
            else:
                objects[key] = event.obj

    async def _sync(self) -> None:
        objects = [o for by_key in self._objects.values() for o in by_key.values()]
        policy, problems = read_objects(objects, base=self._base)
        routes = bool(policy.ports()) or self._allow_empty
        if routes:
            self._held = None
        if routes and policy != self._handed:
            self._handed = policy
            self._apply(policy)
            self.ready.set()
            log.info(
                "policy from Kubernetes: %d DestinationRule(s), %d VirtualService(s), ports %s",
                len(policy.destination_rules),
                len(policy.virtual_services),
                ", ".join(map(str, policy.ports())) or "none",
            )
        elif not routes and policy != self._held:
            self._held = policy
            log.warning(
                "no valid VirtualService routes any port: %s (serve --allow-empty-policy "
                "to serve a policy without listeners)",
                "the last good policy keeps serving"
                if self._handed
                else "no config is served until one does",
            )
        for kind in PLURALS:
            valid = sum(1 for k, p in problems.items() if k[0] == kind and not p)
            metrics.POLICY_OBJECTS.labels(kind, "true").set(valid)
            metrics.POLICY_OBJECTS.labels(kind, "false").set(
                sum(1 for k in problems if k[0] == kind) - valid
            )
        await self._write_statuses(objects, policy, problems, held=not routes)

    async def _write_statuses(
        self,
        objects: list[JSON],
        policy: Policy,
        problems: Mapping[ObjectKey, list[str]],
        *,
        held: bool,
    ) -> None:
        parsed: dict[ObjectKey, DestinationRule | VirtualService] = {
            **{("DestinationRule", r.namespace, r.name): r for r in policy.destination_rules},
            **{("VirtualService", v.namespace, v.name): v for v in policy.virtual_services},
        }
        out = self._published
        served = set(out.destination_rules) | set(out.virtual_services) if out else set()
        pending = (
            "no valid VirtualService routes any port, so the gateways keep their last config"
            if held
            else "waiting for the next config push to the gateways"
        )
        failed = False
        for obj in objects:
            key = object_key(obj)
            meta = obj["metadata"]
            version = str(meta.get("resourceVersion", ""))
            known: Mapping[str, Any] | None = obj.get("status")
            written = self._written.get(key)
            if written is not None and written[0] == version:
                known = written[1]  # our patch is in, its watch event not yet
            wanted = desired_status(
                known,
                int(meta.get("generation") or 0),
                problems.get(key, []),
                parsed.get(key) in served,
                pending,
                _now(),
            )
            if wanted == known:
                continue
            failed |= not await self._patch_status(key, version, wanted)
        if failed and self._retry is None:
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(self._retry_s, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._wake()

    async def _patch_status(self, key: ObjectKey, version: str, status: JSON) -> bool:
        """Write one status; False when it should be tried again."""
        kind, namespace, name = key
        try:
            await asyncio.to_thread(
                self.api.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                PLURALS[kind],
                name,
                {"status": status},
                _content_type="application/merge-patch+json",
                _request_timeout=_LIST_TIMEOUT,
            )
        except client.ApiException as e:
            if e.status == 404:
                return True  # deleted meanwhile: its DELETED event is on its way
            metrics.POLICY_STATUS_WRITES.labels("failed").inc()
            log.warning(
                "%s %s/%s: cannot write status: %s",
                kind,
                namespace,
                name,
                _api_problem(e, f"{PLURALS[kind]}/status", namespace),
            )
            return False
        except Exception as e:
            metrics.POLICY_STATUS_WRITES.labels("failed").inc()
            log.warning("%s %s/%s: cannot write status: %r", kind, namespace, name, e)
            return False
        metrics.POLICY_STATUS_WRITES.labels("written").inc()
        self._written[key] = (version, status)
        with contextlib.suppress(KeyError):
            accepted = status["conditions"][0]
            if accepted["status"] == "False":
                log.warning("%s %s/%s is invalid: %s", kind, namespace, name, accepted["message"])
        return True
