"""Keep every ModelMesh runtime pod's labels in step with placement.

Placement snapshots give each live instance its desired keys (labels.py); the pod
watches give each pod's current metadata. A pod whose desired keys or metadata change
is marked dirty; a dirty pod is patched at most once per ``patch_interval`` with the
merge patch from its current copy to what is desired *then*, so a burst of placement
changes costs one patch per pod carrying the final state. Only while leading.

Answers: 409 waits for the watch's newer copy (a re-list after repeated conflicts) and
diffs again, with backoff; 429 pauses every patch for its Retry-After; 404 drops the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modelxds import metrics
from modelxds.labeler.labels import (
    COUNT_LABEL,
    NOTHING,
    Desired,
    desired_for_mesh,
    instance_of,
    merge_patch,
)
from modelxds.labeler.pods import Pod, PodWatch
from modelxds.placement.model import MeshPlacement, Placement

log = logging.getLogger(__name__)

DEFAULT_PATCH_INTERVAL_S = 1.0
MERGE_PATCH = "application/merge-patch+json"
RETRY_FLOOR_S = 0.2
RETRY_MAX_S = 30.0
RETRY_AFTER_DEFAULT_S = 1.0  # a 429 without a usable Retry-After
RETRY_AFTER_MAX_S = 60.0
RELIST_AFTER_CONFLICTS = 3
MAX_IN_FLIGHT = 4  # patches at once, across pods
BUILD_GAP_S = 0.05  # between placement snapshots: a burst of etcd events is one build

PodKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class Target:
    """One ModelMesh deployment to label: its namespace, Service name and subset key."""

    namespace: str
    service: str
    key: str

    @property
    def selector(self) -> str:
        """ModelMesh Serving puts this label on every runtime pod of the Service."""
        return f"modelmesh-service={self.service}"


class _NotLeading(Exception):
    """Leadership ended between deciding to patch and sending."""


class Labeler:
    def __init__(
        self,
        api_client: client.ApiClient,
        targets: Sequence[Target],
        *,
        max_model_labels: int,
        patch_interval: float = DEFAULT_PATCH_INTERVAL_S,
        may_patch: Callable[[], bool] = lambda: True,
    ) -> None:
        self.targets = {t.namespace: t for t in targets}
        self.max_model_labels = max_model_labels
        self.patch_interval = patch_interval
        self._may_patch = may_patch
        self._api = client.CoreV1Api(api_client)
        self.watches = {
            t.namespace: PodWatch(api_client, t.namespace, t.selector, partial(self._changed, t))
            for t in targets
        }
        self._meshes: dict[str, MeshPlacement] = {}
        self._desired: dict[str, Mapping[str, Desired]] = {}  # namespace -> instance id ->
        self._want: dict[PodKey, Desired] = {}  # what each pod was last found to need
        # dirty pods -> time.monotonic() of the placement change that made them so, or
        # None when only the pod itself changed (nothing to measure lag from)
        self._dirty: dict[PodKey, float | None] = {}
        self._sent_at: dict[PodKey, float] = {}
        self._not_before: dict[PodKey, float] = {}
        self._failures: dict[PodKey, int] = {}
        self._in_flight: set[PodKey] = set()
        self._throttled_until = 0.0
        self._wake = asyncio.Event()

    # --- inputs -----------------------------------------------------------------------

    def desire(self, placement: Placement) -> dict[str, dict[str, Desired]]:
        """Namespace -> instance id -> our keys on its pod (pure; for a worker thread)."""
        out = {}
        for ns, target in self.targets.items():
            mesh = placement.meshes.get(ns, MeshPlacement(ns))
            out[ns] = desired_for_mesh(mesh, target.key, self.max_model_labels)
        return out

    def set_placement(
        self, placement: Placement, desired: Mapping[str, Mapping[str, Desired]]
    ) -> None:
        """Take a new snapshot and what ``desire`` made of it (on the event loop)."""
        now = time.monotonic()
        for ns, target in self.targets.items():
            self._meshes[ns] = placement.meshes.get(ns, MeshPlacement(ns))
            self._desired[ns] = desired.get(ns, {})
            for name in self.watches[ns].pods:
                self._refresh(target, name, since=now)
            self._count(ns)
        self._wake.set()

    async def apply(self, placement: Placement) -> None:
        desired = await asyncio.to_thread(self.desire, placement)
        self.set_placement(placement, desired)

    async def follow(
        self,
        capture: Callable[[], Callable[[], Placement]],
        changed: asyncio.Event,
        synced: asyncio.Event,
    ) -> None:
        """Apply every placement change from a PlacementWatcher, until cancelled."""
        await synced.wait()
        while True:
            changed.clear()
            build = capture()

            def derive(build: Callable[[], Placement] = build) -> tuple[Placement, Any]:
                placement = build()
                return placement, self.desire(placement)

            placement, desired = await asyncio.to_thread(derive)
            self.set_placement(placement, desired)
            due = placement.next_transition_ms  # a loading copy counts as loaded by then
            await wait_for_event(changed, None if due is None else due / 1000 - time.time())
            await asyncio.sleep(BUILD_GAP_S)

    def leadership_changed(self, leading: bool) -> None:
        """On gaining the Lease every pod is compared again: the last leader may have
        left them anywhere (on the event loop)."""
        if leading:
            for ns, watch in self.watches.items():
                for name in watch.pods:
                    self._dirty.setdefault((ns, name), None)
        self._wake.set()

    def _changed(self, target: Target, name: str) -> None:
        self._refresh(target, name, since=None)
        self._count(target.namespace)
        self._wake.set()

    def _refresh(self, target: Target, name: str, since: float | None) -> None:
        """Mark a pod dirty if what it needs changed (``since``), or if the pod did."""
        key = (target.namespace, name)
        pod = self.watches[target.namespace].pods.get(name)
        if pod is None:
            for table in (self._want, self._dirty, self._sent_at, self._not_before):
                table.pop(key, None)
            self._failures.pop(key, None)
            return
        want = self._desired_for(pod)
        if since is None:
            self._dirty.setdefault(key, None)
        elif self._want.get(key) != want:
            seen = self._dirty.get(key)
            self._dirty[key] = since if seen is None else seen
        self._want[key] = want

    def _desired_for(self, pod: Pod) -> Desired:
        mesh = self._meshes.get(pod.namespace)
        if mesh is None:
            return NOTHING
        iid = instance_of(mesh, pod.name, pod.ip)
        return NOTHING if iid is None else self._desired[pod.namespace].get(iid, NOTHING)

    def _count(self, ns: str) -> None:
        wants = [w for (n, _), w in self._want.items() if n == ns]
        metrics.LABELER_PODS.labels(ns).set(sum(w.models is not None for w in wants))
        key = f"{self.targets[ns].key}/{COUNT_LABEL}"
        metrics.LABELER_OVERFLOWING_PODS.labels(ns).set(sum(key in w.labels for w in wants))

    # --- patching ---------------------------------------------------------------------

    async def run(self) -> None:
        """Watch the pods and patch them, until cancelled."""
        tasks = [asyncio.create_task(w.run()) for w in self.watches.values()]
        tasks.append(asyncio.create_task(self._patch_loop()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _patch_loop(self) -> None:
        syncs: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._wake.clear()
                await wait_for_event(self._wake, self._start_due(syncs))
        finally:
            for t in syncs:
                t.cancel()

    def _start_due(self, syncs: set[asyncio.Task[None]]) -> float | None:
        """Start the patches that are due; how long until the next one is (None: none)."""
        if not self._dirty:
            return None
        if not self._may_patch():
            # a renewal may be late without leadership ending: look again soon
            return self.patch_interval
        now = time.monotonic()
        nearest: float | None = None
        for key in list(self._dirty):
            ns = key[0]
            if key in self._in_flight or ns not in self._meshes:
                continue  # placement of the namespace not known yet: touch nothing
            at = max(
                self._sent_at.get(key, -float("inf")) + self.patch_interval,
                self._not_before.get(key, 0.0),
                self._throttled_until,
            )
            if at > now or len(self._in_flight) >= MAX_IN_FLIGHT:
                nearest = at if nearest is None else min(nearest, at)
                continue
            self._in_flight.add(key)
            task = asyncio.create_task(self._sync(key))
            syncs.add(task)
            task.add_done_callback(syncs.discard)
        return None if nearest is None else max(nearest - now, 0.01)

    async def _sync(self, key: PodKey) -> None:
        ns, name = key
        watch = self.watches[ns]
        try:
            since = self._dirty.pop(key, None)
            pod = watch.pods.get(name)
            if pod is None:
                return
            started = time.monotonic()
            try:
                answer = await asyncio.to_thread(self._send, pod, self._desired_for(pod))
            except _NotLeading:
                self._redo(key, since)
                return
            except ApiException as e:
                self._sent_at[key] = started
                self._failed(key, since, e)
                return
            except Exception as e:  # the connection, most likely
                self._sent_at[key] = started
                metrics.LABELER_PATCHES.labels("failed").inc()
                delay = self._back_off(key)
                log.warning("patching pod %s/%s: %s; retrying in %.1fs", ns, name, e, delay)
                self._redo(key, since)
                return
            if answer is None:
                return  # the pod already says what it should
            self._sent_at[key] = started
            metrics.LABELER_PATCHES.labels("applied").inc()
            if since is not None:
                metrics.LABELER_LAG_SECONDS.observe(time.monotonic() - since)
            self._failures.pop(key, None)
            self._not_before.pop(key, None)
            watch.offer(Pod.from_object(answer, ns))
        finally:
            self._in_flight.discard(key)
            self._wake.set()

    def _send(self, pod: Pod, desired: Desired) -> dict[str, Any] | None:
        """Diff and, if the pod differs, one merge patch (in a worker thread: a full
        annotation is 100,000s of names to encode). The pod as the server now has it;
        None if nothing needed sending."""
        patch = merge_patch(self.targets[pod.namespace].key, pod.labels, pod.annotations, desired)
        if patch is None:
            return None
        if not self._may_patch():
            raise _NotLeading()
        resp = self._api.patch_namespaced_pod(
            pod.name,
            pod.namespace,
            patch,
            _content_type=MERGE_PATCH,
            _preload_content=False,
            _request_timeout=(10.0, 30.0),
        )
        return json.loads(resp.data)  # type: ignore[no-any-return]

    def _failed(self, key: PodKey, since: float | None, e: ApiException) -> None:
        ns, name = key
        if e.status == HTTPStatus.NOT_FOUND:
            metrics.LABELER_PATCHES.labels("gone").inc()
            log.info("pod %s/%s is gone; skipping it", ns, name)
            self.watches[ns].forget(name)
            return
        self._redo(key, since)
        if e.status == HTTPStatus.CONFLICT:
            metrics.LABELER_PATCHES.labels("conflict").inc()
            delay = self._back_off(key)
            log.info("pod %s/%s: conflict (409); diffing again in %.1fs", ns, name, delay)
            if self._failures[key] % RELIST_AFTER_CONFLICTS == 0:
                self.watches[ns].relist()  # our copy may be what is stale
            return
        if e.status == HTTPStatus.TOO_MANY_REQUESTS:
            metrics.LABELER_PATCHES.labels("throttled").inc()
            wait = retry_after(e.headers)
            self._throttled_until = max(self._throttled_until, time.monotonic() + wait)
            log.info("API server throttles patches (429); pausing them for %.1fs", wait)
            return
        metrics.LABELER_PATCHES.labels("failed").inc()
        delay = self._back_off(key)
        log.warning(
            "patching pod %s/%s: the API server answered %s %s; retrying in %.1fs",
            ns,
            name,
            e.status,
            e.reason or "",
            delay,
        )

    def _redo(self, key: PodKey, since: float | None) -> None:
        """Dirty again, keeping the oldest placement change still to apply."""
        seen = self._dirty.get(key)
        if seen is None or (since is not None and since < seen):
            self._dirty[key] = since
        else:
            self._dirty[key] = seen

    def _back_off(self, key: PodKey) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = min(RETRY_FLOOR_S * 2.0 ** (failures - 1), RETRY_MAX_S)
        self._not_before[key] = time.monotonic() + delay
        return delay


async def wait_for_event(event: asyncio.Event, timeout: float | None) -> None:
    """Until ``event`` is set or ``timeout`` seconds pass. Not `asyncio.wait_for`: on
    Python 3.11 it can swallow a cancellation that arrives as the event is set, and a
    loop around it then never ends."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=None if timeout is None else max(timeout, 0.0))
    finally:
        waiter.cancel()


def retry_after(headers: Mapping[str, str] | None) -> float:
    """Seconds a 429 asks to wait (Retry-After in seconds), within reason."""
    raw = str((headers or {}).get("Retry-After", ""))
    try:
        seconds = float(raw)
    except ValueError:
        return RETRY_AFTER_DEFAULT_S
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)
