"""Debounced pushes: quiet periods coalesce bursts, and a steady stream still gets through."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from google.protobuf.message import Message
from prometheus_client import REGISTRY

from modelxds.kserve import descriptor_set_bytes
from modelxds.placement.model import Placement
from modelxds.policy import default_policy
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.controller import Controller
from modelxds.xds.ir import Options, Strategy
from modelxds.xds.resources import CLUSTER, ENDPOINT, ROUTE
from modelxds.xds.subset import SubsetStrategy
from tests.unit.xds_messages import assignment, cluster, route_table


def _clusters(*names: str) -> dict[str, dict[str, Message]]:
    """EDS clusters with their endpoints: a config without dangling references."""
    return {
        CLUSTER: {n: cluster(n) for n in names},
        ENDPOINT: {n: assignment(n, 8033) for n in names},
    }


class Counting:
    """A placement capture that counts the pushes it is taken for."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Callable[[], Placement]:
        self.calls += 1
        return Placement


def _controller(
    snapshot: Counting, changed: asyncio.Event, quiet: float, max_delay: float
) -> Controller:
    return Controller(
        snapshot,
        changed,
        default_policy(),
        SnapshotCache(),
        Options(descriptor_set=descriptor_set_bytes()),
        quiet=quiet,
        max_delay=max_delay,
        translator=SubsetStrategy(),
    )


def _translating(translator: Strategy, cache: SnapshotCache | None = None) -> Controller:
    """A controller whose configs come from ``translator``, not from a placement."""
    return Controller(
        Counting(),
        asyncio.Event(),
        default_policy(),
        cache or SnapshotCache(),
        Options(descriptor_set=descriptor_set_bytes()),
        translator=translator,
    )


async def test_a_burst_of_changes_becomes_two_pushes_the_first_at_once() -> None:
    snapshot, changed = Counting(), asyncio.Event()
    task = asyncio.create_task(_controller(snapshot, changed, quiet=0.2, max_delay=5).run())
    try:
        for _ in range(10):
            changed.set()
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 3
        while snapshot.calls == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)
        assert snapshot.calls == 2  # the leading edge, then the rest coalesced
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_changes_that_never_pause_are_pushed_by_the_max_delay() -> None:
    snapshot, changed = Counting(), asyncio.Event()
    task = asyncio.create_task(_controller(snapshot, changed, quiet=0.2, max_delay=0.3).run())
    try:
        deadline = time.monotonic() + 3
        while snapshot.calls < 2 and time.monotonic() < deadline:
            changed.set()  # faster than the quiet period: without a cap, never pushed
            await asyncio.sleep(0.05)
        assert snapshot.calls >= 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_publish_fills_the_cache_with_every_resource_type() -> None:
    controller = _controller(Counting(), asyncio.Event(), quiet=0.1, max_delay=1)
    await controller.publish()
    assert controller.cache.ready.is_set()
    assert all(
        controller.cache.get(t).version
        for t in (
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "type.googleapis.com/envoy.config.listener.v3.Listener",
        )
    )


async def test_a_dropped_cluster_leaves_cds_when_its_time_is_up_without_a_change() -> None:
    configs = iter([_clusters("pod-a", "pod-b")])
    controller = _translating(
        lambda *_: next(configs, _clusters("pod-a")), SnapshotCache(retire_after_s=0.3)
    )
    await controller.publish()
    await controller.publish()  # pod-b dropped: it stays, its routes move first
    assert set(controller.cache.get(CLUSTER).resources) == {"pod-a", "pod-b"}
    task = asyncio.create_task(controller.run())  # and no etcd change comes
    try:
        deadline = time.monotonic() + 3
        while "pod-b" in controller.cache.get(CLUSTER).resources:
            assert time.monotonic() < deadline, "the retired cluster never left"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_slow_build_leaves_the_event_loop_free_for_ads_and_the_watch() -> None:
    def slow(*_: object) -> dict[str, dict[str, Message]]:
        time.sleep(1.0)  # a cold translation at 100,000s of models, holding its thread
        return _clusters("pod-a")

    controller = _translating(slow)
    push = asyncio.create_task(controller.publish())
    worst, last = 0.0, time.monotonic()
    while not push.done():  # what an ADS stream or the etcd watch would wait for
        await asyncio.sleep(0.01)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    await push
    assert worst < 0.2, f"the event loop stalled {worst:.2f} s"
    assert "pod-a" in controller.cache.get(CLUSTER).resources


async def test_an_isolated_change_goes_out_at_once_and_a_burst_in_a_few_pushes() -> None:
    snapshot, changed = Counting(), asyncio.Event()
    task = asyncio.create_task(_controller(snapshot, changed, quiet=0.5, max_delay=1).run())
    try:
        changed.set()
        started = time.monotonic()
        while snapshot.calls == 0:
            await asyncio.sleep(0.005)
        assert time.monotonic() - started < 0.25  # not after the 0.5 s quiet period
        await asyncio.sleep(0.6)  # quiet again
        burst_started, calls = time.monotonic(), snapshot.calls
        while time.monotonic() - burst_started < 1.0:  # 1,000 changes a second
            changed.set()
            await asyncio.sleep(0.001)
        await asyncio.sleep(1.2)  # the last of it goes out
        assert 2 <= snapshot.calls - calls <= 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_config_with_a_dangling_reference_is_refused_and_the_last_good_one_serves() -> None:
    good = _clusters("pod-a")
    bad = _clusters("pod-a")
    bad[ROUTE] = {"8008": route_table("8008", {"/": "pod-gone"})}
    configs = iter([good, bad])
    controller = _translating(lambda *_: next(configs))
    await controller.publish()
    version = controller.cache.get(CLUSTER).version
    refused = REGISTRY.get_sample_value("modelxds_snapshots_refused_total") or 0.0
    await controller.publish()
    assert not controller.cache.get(ROUTE).resources  # the route to pod-gone never went out
    assert controller.cache.get(CLUSTER).version == version
    assert REGISTRY.get_sample_value("modelxds_snapshots_refused_total") == refused + 1
