"""Watch ModelMesh's tables in etcd and keep them current.

List every prefix at one revision, then watch from the next revision: no gap and
no event twice. On compaction, cancellation or a broken stream the tables are
re-listed from scratch and the watch resumes, with capped exponential backoff that
only resets once a watch has proved healthy.
The watcher only parses and stores records; `snapshot()` turns them into an
immutable Placement when the caller asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NoReturn

import grpc
from aetcd import rpc

from modelxds import metrics
from modelxds.modelmesh import (
    READERS,
    InstanceRecord,
    Layout,
    LitelinksRecord,
    ModelRecord,
    RecordError,
    Table,
    VModelRecord,
)
from modelxds.placement.etcd import (
    REQUIRE_LEADER,
    EtcdConnection,
    EtcdSession,
    auth_related,
    check_connection,
    describe,
    prefix_range_end,
)
from modelxds.placement.index import Changes, MeshIndex
from modelxds.placement.model import DEFAULT_LOADED_AFTER_MS, Placement

log = logging.getLogger(__name__)

PAGE_SIZE = 5000
# The first pause before listing again, doubled after each failure up to max_backoff.
RETRY_FLOOR_S = 0.1
# A watch open this long (or one that delivered an event or progress notification) was
# healthy: the next failure starts again from RETRY_FLOOR_S.
HEALTHY_AFTER_S = 10.0


class _Relist(Exception):
    """The watch can't continue from where it is; list again."""


@dataclass
class MeshTables:
    """The current records of one ModelMesh deployment, as last seen in etcd."""

    namespace: str
    layout: Layout
    registry: dict[str, ModelRecord] = field(default_factory=dict)
    vmodels: dict[str, VModelRecord] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    litelinks: dict[str, LitelinksRecord] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)  # key -> why it was skipped
    # key -> fields that were read as their default (record kept), and why
    ignored: dict[str, str] = field(default_factory=dict)
    changes: Changes = field(default_factory=Changes)  # since the last snapshot

    def _table(self, table: Table) -> dict[str, object]:
        return {  # type: ignore[return-value]
            Table.REGISTRY: self.registry,
            Table.VMODELS: self.vmodels,
            Table.INSTANCES: self.instances,
            Table.LITELINKS: self.litelinks,
        }[table]

    def apply(self, key: str, value: bytes | None) -> bool:
        """Apply a put (value) or delete (None); True if it can change placement."""
        parsed = self.layout.parse_key(key)
        if parsed is None:
            return False
        table, item = parsed
        self._note(table, item)
        rows = self._table(table)
        if value is None:
            self.invalid.pop(key, None)
            self.ignored.pop(key, None)
            return rows.pop(item, None) is not None
        try:
            got = READERS[table](value)
        except RecordError as e:
            # Drop what we had: routing on a stale copy of a record we can no longer
            # read would be a guess. Without it the model falls back to any pod.
            rows.pop(item, None)
            self.ignored.pop(key, None)  # `invalid` says why, for the whole record
            if self.invalid.get(key) != str(e):
                log.warning("skipping malformed %s record %s: %s", table.value, key, e)
                metrics.INVALID_RECORDS.labels(table.value).inc()
            self.invalid[key] = str(e)
            return True
        rows[item] = got.record
        self.invalid.pop(key, None)
        if not got.problems:
            self.ignored.pop(key, None)
            return True
        why = "; ".join(got.problems)
        # A pod rewrites its instance record every few seconds: say it once, not each time.
        if self.ignored.get(key) != why:
            log.warning("%s record %s: ignoring %s", table.value, key, why)
            metrics.IGNORED_FIELDS.labels(table.value).inc(len(got.problems))
        self.ignored[key] = why
        return True

    def _note(self, table: Table, item: str) -> None:
        if table is Table.REGISTRY:
            self.changes.models.add(item)
        elif table is Table.VMODELS:
            self.changes.vmodels.add(item)
        else:
            self.changes.pods = True


class PlacementWatcher:
    """Owns the etcd connection and the record tables of every watched deployment."""

    def __init__(
        self,
        connection: EtcdConnection | str,
        meshes: Sequence[tuple[str, Layout]],
        *,
        loaded_after_ms: int = DEFAULT_LOADED_AFTER_MS,
        max_backoff: float = 10.0,
        healthy_after: float = HEALTHY_AFTER_S,
    ) -> None:
        """``connection``: how to reach etcd, or ``--etcd``'s plain URL(s)."""
        if isinstance(connection, str):
            connection = EtcdConnection.from_url(connection)
        self.connection = connection
        self._session = EtcdSession(connection)
        self.tables = [MeshTables(ns, layout) for ns, layout in meshes]
        self.loaded_after_ms = loaded_after_ms
        self._indexes = [MeshIndex(ns, loaded_after_ms) for ns, _ in meshes]
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self._watch_healthy = False  # the current watch delivered an event or progress
        # etcd's last answer (time.monotonic()), and whether a watch is open since: an
        # idle watch hears nothing for minutes (progress notifications come every 10)
        self._last_contact = time.monotonic()
        self._in_contact = False
        self.revision = 0
        self.changed = asyncio.Event()
        # time.monotonic() of the oldest change the next capture takes (None: none yet):
        # where the convergence of a pushed version is measured from
        self._changed_at: float | None = None
        self.synced = asyncio.Event()
        self._prefixes = [
            (prefix, tables) for tables in self.tables for prefix in tables.layout.watch_prefixes()
        ]

    def snapshot(self, now_ms: int | None = None) -> Placement:
        return self.capture(now_ms)()

    def capture(self, now_ms: int | None = None) -> Callable[[], Placement]:
        """Take what changed since the last snapshot (on the event loop, quickly); the
        returned build turns it into a Placement anywhere, a thread included, once.

        The build may take seconds after a re-list of 100,000s of records; meanwhile the
        watch goes on. It reads the pod tables as they are now (copies: small) and looks
        up the registry and vmodels by key only, so a record the watch replaces meanwhile
        is read old or new, and is marked changed for the next snapshot either way.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        revision, changed_at, self._changed_at = self.revision, self._changed_at, None
        jobs = []
        for t, index in zip(self.tables, self._indexes, strict=True):
            skipped = Counter(p[0] for key in t.invalid if (p := t.layout.parse_key(key)))
            for table in Table:
                metrics.SKIPPED_RECORDS.labels(t.namespace, table.value).set(skipped[table])
            changes, t.changes = t.changes, Changes()
            # the dicts themselves: a re-list replaces them, and this build reads the ones
            # its changes came from
            tables = (t.registry, t.vmodels, dict(t.instances), dict(t.litelinks))
            jobs.append((t.namespace, index, changes, tables))

        def build() -> Placement:
            meshes = {}
            for namespace, index, changes, (registry, vmodels, instances, litelinks) in jobs:
                mesh = index.refresh(changes, registry, vmodels, instances, litelinks, now_ms)
                meshes[namespace] = mesh
                metrics.MODELS.labels(namespace).set(len(registry))
                metrics.VMODELS.labels(namespace).set(len(mesh.vmodels))
                metrics.INSTANCES.labels(namespace).set(len(mesh.instances))
                for state, count in index.copies.items():
                    metrics.MODEL_COPIES.labels(namespace, state).set(count)
                metrics.ROUTABLE_COPIES.labels(namespace).set(index.routable_copies)
            return Placement(MappingProxyType(meshes), revision, changed_at)

        return build

    def invalid_records(self) -> dict[str, str]:
        return {k: v for t in self.tables for k, v in t.invalid.items()}

    def ignored_fields(self) -> dict[str, str]:
        """Key -> the fields of a kept record that were read as their defaults, and why."""
        return {k: v for t in self.tables for k, v in t.ignored.items()}

    def unreachable_for(self, now: float | None = None) -> float:
        """Seconds etcd has not answered for (by time.monotonic()); 0 while a watch is
        open. Before the first answer, counted from when the watcher was made."""
        if self._in_contact:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, now - self._last_contact)

    @property
    def endpoint(self) -> str:
        """The etcd endpoint in use (URL)."""
        return self._session.endpoint.url

    async def check(self, timeout: float = 3.0) -> None:
        """Authenticate and read one key under every watched prefix, trying every endpoint
        (``timeout`` for each): `EtcdUnavailable` if none works."""
        prefixes = [prefix for prefix, _ in self._prefixes]
        await check_connection(self.connection, prefixes, timeout=timeout)

    async def list_once(self) -> None:
        """Read every table once (no watch): for one-shot inspection."""
        for tries_left in reversed(range(len(self.connection.endpoints))):
            async with self._session.open() as channel:
                try:
                    await self._list(rpc.KVStub(channel))
                    return
                except grpc.aio.AioRpcError as e:
                    if not tries_left or not _connection_failed(e):
                        raise
                    why = describe(e, self.connection, self._session.endpoint)
                    log.warning("etcd %s: %s", self.endpoint, why)
            self._session.rotate()

    async def run(self) -> None:
        """Keep the tables current until cancelled; never raises for etcd trouble.

        Every restart, a re-list after compaction or cancellation included, waits first:
        a watch etcd cancels right after creating it (a permission or auth problem, a
        member without a leader) would otherwise make back-to-back full re-lists. A
        successful list is not enough to reset the wait; a healthy watch is.
        """
        loop = asyncio.get_running_loop()
        backoff = min(RETRY_FLOOR_S, self.max_backoff)
        while True:
            channel = self._session.open()
            self._watch_healthy = False
            watch_opened: float | None = None
            try:
                await self._list(rpc.KVStub(channel))
                self._in_contact = True
                watch_opened = loop.time()
                await self._watch(rpc.WatchStub(channel))
            except _Relist as e:
                delay, backoff = self._next_delay(backoff, watch_opened, loop.time())
                log.info("re-listing etcd in %.1fs: %s", delay, e)
                metrics.WATCH_RESTARTS.labels("compacted_or_cancelled").inc()
            except grpc.aio.AioRpcError as e:
                delay, backoff = self._next_delay(backoff, watch_opened, loop.time())
                failed, why = self.endpoint, describe(e, self.connection, self._session.endpoint)
                if auth_related(e):
                    # the token may be what is wrong (a JWT issued before a role change):
                    # never retry with it, whatever etcd said
                    self._session.forget_token()
                if _connection_failed(e):
                    self._session.rotate()  # with one endpoint, the same one again
                then = "" if self.endpoint == failed else f" with {self.endpoint}"
                log.warning("etcd %s: %s; retrying%s in %.1fs", failed, why, then, delay)
                metrics.WATCH_RESTARTS.labels("rpc_error").inc()
            finally:
                if self._in_contact:
                    self._in_contact, self._last_contact = False, time.monotonic()
                await channel.close()
            await self._pause(delay)

    def _next_delay(
        self, backoff: float, watch_opened: float | None, now: float
    ) -> tuple[float, float]:
        """(this pause, the next one): the floor again after a healthy watch, else doubling."""
        floor = min(RETRY_FLOOR_S, self.max_backoff)
        healthy = self._watch_healthy or (
            watch_opened is not None and now - watch_opened >= self.healthy_after
        )
        delay = floor if healthy else backoff
        return delay, min(delay * 2, self.max_backoff)

    async def _pause(self, seconds: float) -> None:
        """The wait between restarts (its own method so tests can record it)."""
        await asyncio.sleep(seconds)

    async def _list(self, kv: rpc.KVStub) -> None:
        revision = 0
        # known bad keys carry over, so a re-list does not log and count them again
        fresh = [
            MeshTables(t.namespace, t.layout, invalid=dict(t.invalid), ignored=dict(t.ignored))
            for t in self.tables
        ]
        by_layout = {id(t): f for t, f in zip(self.tables, fresh, strict=True)}
        seen: set[bytes] = set()
        for prefix, tables in self._prefixes:
            start, end = prefix.encode(), prefix_range_end(prefix.encode())
            while True:
                req = rpc.RangeRequest(key=start, range_end=end, limit=PAGE_SIZE, revision=revision)
                resp = await self._session.call(kv.Range, req, timeout=60)
                self._last_contact = time.monotonic()
                revision = revision or resp.header.revision
                for kv_ in resp.kvs:
                    seen.add(kv_.key)
                    self._apply(by_layout[id(tables)], kv_.key, kv_.value)
                if not resp.more:
                    break
                start = resp.kvs[-1].key + b"\0"
        # Swap in whole: a snapshot never mixes old and new listings.
        for t, f in zip(self.tables, fresh, strict=True):
            f.invalid = {k: v for k, v in f.invalid.items() if k.encode() in seen}
            f.ignored = {k: v for k, v in f.ignored.items() if k.encode() in seen}
            t.registry, t.vmodels, t.instances, t.litelinks = (
                f.registry,
                f.vmodels,
                f.instances,
                f.litelinks,
            )
            t.invalid, t.ignored = f.invalid, f.ignored
            # a re-list may have missed deletes: derive everything again from scratch
            t.changes = Changes()
            t.changes.all(t.registry, t.vmodels)
        self._indexes = [MeshIndex(t.namespace, self.loaded_after_ms) for t in self.tables]
        self._advance(revision)
        self.synced.set()

    async def _watch(self, watch: rpc.WatchStub) -> NoReturn:
        requests: asyncio.Queue[rpc.WatchRequest] = asyncio.Queue()
        for i, (prefix, _) in enumerate(self._prefixes, start=1):
            requests.put_nowait(
                rpc.WatchRequest(
                    create_request=rpc.WatchCreateRequest(
                        key=prefix.encode(),
                        range_end=prefix_range_end(prefix.encode()),
                        start_revision=self.revision + 1,
                        progress_notify=True,
                        watch_id=i,
                    )
                )
            )

        async def outgoing() -> AsyncIterator[rpc.WatchRequest]:
            while True:
                yield await requests.get()

        # The token is checked when each watch is created, not again for its events.
        metadata = (*(await self._session.metadata() or ()), *REQUIRE_LEADER)
        async for resp in watch.Watch(outgoing(), metadata=metadata):
            if resp.compact_revision:
                metrics.ETCD_COMPACTIONS.inc()
                raise _Relist(f"revision {self.revision + 1} compacted to {resp.compact_revision}")
            if resp.canceled:
                if "permission denied" in resp.cancel_reason or "auth" in resp.cancel_reason:
                    # how etcd refuses a watch whose token expired: the re-list re-authenticates
                    self._session.forget_token()
                raise _Relist(f"watch cancelled: {resp.cancel_reason or 'no reason given'}")
            if not resp.created:
                # an event or progress notification: etcd serves this watch, not just
                # accepted it, so the next failure need not keep backing off
                self._watch_healthy = True
            if not 1 <= resp.watch_id <= len(self._prefixes):
                continue
            tables = self._prefixes[resp.watch_id - 1][1]
            changed = False
            deletes = sum(ev.type == rpc.Event.DELETE for ev in resp.events)
            metrics.ETCD_EVENTS.labels("delete").inc(deletes)
            metrics.ETCD_EVENTS.labels("put").inc(len(resp.events) - deletes)
            for ev in resp.events:
                value = None if ev.type == rpc.Event.DELETE else ev.kv.value
                changed |= self._apply(tables, ev.kv.key, value)
            if resp.events and not resp.fragment:
                self._advance(resp.header.revision, changed)
        # etcd ended the stream without an error: nothing to resume from
        raise _Relist("watch stream ended")

    def _apply(self, tables: MeshTables, key: bytes, value: bytes | None) -> bool:
        try:
            text = key.decode()
        except UnicodeDecodeError:
            metrics.INVALID_RECORDS.labels("key").inc()
            log.warning("skipping etcd key that is not UTF-8: %r", key[:80])
            return False
        return tables.apply(text, value)

    def _advance(self, revision: int, changed: bool = True) -> None:
        self.revision = max(self.revision, revision)
        metrics.ETCD_REVISION.set(self.revision)
        if changed:
            if self._changed_at is None:
                self._changed_at = time.monotonic()
            self.changed.set()


def _connection_failed(e: grpc.aio.AioRpcError) -> bool:
    """The endpoint did not answer: another one may."""
    return e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
