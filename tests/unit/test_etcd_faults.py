"""PlacementWatcher and EtcdSession against etcd faults a real etcd shows only in special
setups: refused tokens (JWT after a role change), watches cancelled at creation, a
member without a leader, a prefix the user may not read, a hung Authenticate.

The etcd is tests/unit/fake_etcd.py's in-process server; the watcher's pauses between
restarts are recorded instead of slept, so backoff is checked exactly and quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from aetcd import rpc

from modelxds.modelmesh import Layout, ModelRecord, Table, encode
from modelxds.placement.etcd import EtcdConnection, EtcdSession, EtcdUnavailable
from modelxds.placement.watch import PlacementWatcher
from tests.unit.fake_etcd import (
    FakeEtcd,
    WatchScript,
    cancel_after_create,
    progress_then_cancel,
    quiet,
    serving,
    wait_for,
)

NS = "modelmesh-serving"
PASSWORD = "fake-Pa55word"


class RecordingWatcher(PlacementWatcher):
    """Records each pause between restarts and barely waits, so tests run in ms."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pauses: list[float] = []

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        await asyncio.sleep(0.002)  # yield to the fake server sharing this loop


def connection(fake: FakeEtcd, *, user: bool = True) -> EtcdConnection:
    doc: dict[str, str] = {"endpoints": fake.url}
    if user:
        doc |= {"userid": "root", "password": PASSWORD}
    return EtcdConnection.from_json(json.dumps(doc))


@contextlib.asynccontextmanager
async def fake_etcd(*scripts: WatchScript, users: bool = True) -> AsyncIterator[FakeEtcd]:
    fake = FakeEtcd(users={"root": PASSWORD} if users else {}, watch_scripts=list(scripts))
    async with serving(fake):
        yield fake


@contextlib.asynccontextmanager
async def running(watcher: PlacementWatcher) -> AsyncIterator[PlacementWatcher]:
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def put_model(fake: FakeEtcd, layout: Layout, model: str) -> None:
    fake.kvs[layout.key(Table.REGISTRY, model).encode()] = encode(ModelRecord())
    fake.revision += 1


# ---- 1. a token etcd no longer accepts ------------------------------------------------

REFUSALS = [
    # --auth-token=jwt after any user, role or grant change
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: revision of auth store is old"),
    # what etcd 3.5.1 answers a Range with such a JWT (checked against the real one)
    (grpc.StatusCode.UNKNOWN, "auth: revision in header is old"),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: invalid auth token"),
    (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"),
]


@pytest.mark.parametrize(
    ("code", "details"), REFUSALS, ids=["old-revision", "old-header", "invalid", "unauth"]
)
async def test_a_refused_token_is_replaced_and_the_call_retried(
    code: grpc.StatusCode, details: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_etcd() as fake:
        session = EtcdSession(connection(fake))
        kv = rpc.KVStub(session.open())
        try:
            await session.call(kv.Range, rpc.RangeRequest(key=b"k"), timeout=5)
            fake.refuse_tokens(code, details)
            caplog.set_level("INFO", logger="modelxds.placement")
            await session.call(kv.Range, rpc.RangeRequest(key=b"k"), timeout=5)
        finally:
            await session.channel.close()
    assert fake.authentications == 2
    assert [r.token for r in fake.ranges] == ["token-1", "token-1", "token-2"]
    assert "auth token refused" in caplog.text and details in caplog.text
    assert PASSWORD not in caplog.text


async def test_the_watcher_relists_with_a_new_token_after_a_role_change() -> None:
    # every watch is cancelled at once, so the watcher keeps re-listing: each re-list
    # after the change must authenticate again, not retry the stale JWT forever
    layout = Layout("rp-role-change")
    async with fake_etcd(cancel_after_create("test: cancelled")) as fake:
        watcher = RecordingWatcher(connection(fake), [(NS, layout)], max_backoff=0.01)
        async with running(watcher):
            await asyncio.wait_for(watcher.synced.wait(), 5)
            fake.refuse_tokens(
                grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: revision of auth store is old"
            )
            put_model(fake, layout, "after-change")
            await wait_for(
                lambda: "after-change" in watcher.tables[0].registry, "the model after the change"
            )
    assert fake.authentications >= 2


async def test_run_drops_the_token_on_any_auth_error() -> None:
    # PERMISSION_DENIED is no token refusal etcd documents, but a token issued before a
    # grant changed may get it: run() must not resend that token on every retry
    layout = Layout("rp-denied-token")
    async with fake_etcd(cancel_after_create("test: cancelled")) as fake:
        watcher = RecordingWatcher(connection(fake), [(NS, layout)], max_backoff=0.01)
        async with running(watcher):
            await asyncio.wait_for(watcher.synced.wait(), 5)
            fake.refuse_tokens(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
            put_model(fake, layout, "after-denial")
            await wait_for(
                lambda: "after-denial" in watcher.tables[0].registry, "the model after the denial"
            )
    assert "token-2" in {r.token for r in fake.ranges}


# ---- 2. the watch needs a leader --------------------------------------------------------


async def test_the_watch_asks_etcd_to_end_it_when_the_member_has_no_leader() -> None:
    async def no_leader(
        fake: FakeEtcd, requests: AsyncIterator[rpc.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpc.WatchResponse]:
        # what etcd does to a hasleader stream once its member loses the leader
        yield rpc.WatchResponse(header=fake.header(), watch_id=1, created=True)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader")

    layout = Layout("rp-leader")
    for users in (True, False):
        async with fake_etcd(no_leader, quiet(), users=users) as fake:
            watcher = RecordingWatcher(connection(fake, user=users), [(NS, layout)])
            async with running(watcher):
                await wait_for(lambda: len(fake.watch_metadata) == 2, "a second watch")
        for metadata in fake.watch_metadata:
            assert ("hasleader", "true") in metadata
            assert any(k == "token" for k, _ in metadata) is users  # both, not either
        # listed, then re-listed once after etcd ended the watch
        assert sum(r.key == layout.mm_prefix.encode() for r in fake.ranges) == 2


# ---- 3. backoff -------------------------------------------------------------------------


async def test_a_watch_cancelled_at_creation_backs_off_instead_of_relisting_at_once() -> None:
    layout = Layout("rp-storm")
    async with fake_etcd(cancel_after_create()) as fake:
        watcher = RecordingWatcher(connection(fake), [(NS, layout)], max_backoff=1.0)
        async with running(watcher):
            await wait_for(lambda: len(watcher.pauses) >= 7, "seven restarts")
        # every list succeeded, yet the wait kept growing: a list alone is no health
        assert watcher.pauses[:7] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
        lists = sum(r.key == layout.mm_prefix.encode() for r in fake.ranges)
        assert lists <= len(watcher.pauses) + 1  # one list per pause, none in between


@pytest.mark.parametrize(
    ("healthy", "expected"),
    [
        (progress_then_cancel(progress=True), [0.1, 0.2, 0.4, 0.1, 0.2]),
        # open longer than healthy_after, with no notification: healthy too
        (progress_then_cancel(after=0.3, progress=False), [0.1, 0.2, 0.4, 0.1, 0.2]),
        # open briefly, no notification: still failing, keep backing off
        (progress_then_cancel(after=0.01, progress=False), [0.1, 0.2, 0.4, 0.8, 1.6]),
    ],
    ids=["progress", "open-long-enough", "open-briefly"],
)
async def test_the_backoff_resets_only_after_a_healthy_watch(
    healthy: WatchScript, expected: list[float]
) -> None:
    layout = Layout("rp-reset")
    bad = cancel_after_create()
    async with fake_etcd(bad, bad, bad, healthy, bad) as fake:
        watcher = RecordingWatcher(
            connection(fake), [(NS, layout)], max_backoff=5.0, healthy_after=0.2
        )
        async with running(watcher):
            await wait_for(lambda: len(watcher.pauses) >= 5, "five restarts")
    assert watcher.pauses[:5] == expected


# ---- 5. the start-up check ----------------------------------------------------------------


async def test_check_reads_every_watched_prefix_and_names_the_one_refused() -> None:
    meshes = [("ns-a", Layout("rp-a")), ("ns-b", Layout("rp-b"))]
    prefixes = [p for _, lay in meshes for p in lay.watch_prefixes()]
    async with fake_etcd() as fake:
        watcher = PlacementWatcher(connection(fake), meshes)
        await watcher.check(timeout=2)
        assert [r.key.decode() for r in fake.ranges] == prefixes  # each one, once

        denied = meshes[1][1].litelinks_prefix
        fake.denied.add(denied.encode())
        with pytest.raises(EtcdUnavailable) as e:
            await watcher.check(timeout=2)
    assert e.value.fatal  # a wrong role does not heal: serve exits at start
    assert f"user 'root' is not allowed to read keys under {denied!r}" in str(e.value)
    assert PASSWORD not in str(e.value)


async def test_check_bounds_authenticate_by_its_timeout() -> None:
    async with fake_etcd() as hung, fake_etcd() as good:
        hung.auth_delay = 30.0
        both = EtcdConnection.from_json(
            json.dumps(
                {"endpoints": f"{hung.url},{good.url}", "userid": "root", "password": PASSWORD}
            )
        )
        watcher = PlacementWatcher(both, [(NS, Layout("rp-hung"))])
        loop = asyncio.get_running_loop()
        started = loop.time()
        await watcher.check(timeout=0.3)  # the hung endpoint is left for the next
        assert loop.time() - started < 2

        only_hung = EtcdConnection.from_json(
            json.dumps({"endpoints": hung.url, "userid": "root", "password": PASSWORD})
        )
        started = loop.time()
        with pytest.raises(EtcdUnavailable, match="no answer in time") as e:
            await PlacementWatcher(only_hung, [(NS, Layout("rp-hung"))]).check(timeout=0.3)
        assert loop.time() - started < 2
        assert not e.value.fatal
