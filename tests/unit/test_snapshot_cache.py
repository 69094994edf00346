"""SnapshotCache: content-hash versions, change detection and pre-serialized responses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from modelxds.xds import cache as cache_module
from modelxds.xds.cache import SnapshotCache, TypeSnapshot, encode_field
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SCOPED_ROUTE
from tests.unit.xds_messages import assignment, cluster

# ---------------------------------------------------------------------------- helpers

M = TypeVar("M", bound=Message)


def config(
    clusters: dict[str, int] | None = None,
    endpoints: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, dict[str, Message]]:
    """A full config, every type. clusters: name -> connect timeout; endpoints: name -> ports."""
    clusters = {"model-a": 1} if clusters is None else clusters
    endpoints = {"model-a": (8033,)} if endpoints is None else endpoints
    return {
        CLUSTER: {n: cluster(n, t) for n, t in clusters.items()},
        ENDPOINT: {n: assignment(n, *ports) for n, ports in endpoints.items()},
        LISTENER: {"ingress": listener_pb2.Listener(name="ingress")},
        SCOPED_ROUTE: {
            "scope": scoped_route_pb2.ScopedRouteConfiguration(
                name="scope", route_configuration_name="models"
            )
        },
        ROUTE: {"models": route_pb2.RouteConfiguration(name="models")},
    }


def parse(raw: bytes) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(raw)


def unpack(resource: any_pb2.Any, factory: Callable[[], M]) -> M:
    msg = factory()
    assert resource.Unpack(msg), f"Any of type {resource.type_url} is not {msg.DESCRIPTOR.name}"
    return msg


# ---------------------------------------------------------------------- change detection


def test_first_set_reports_every_type_in_push_order_and_marks_ready() -> None:
    cache = SnapshotCache()
    assert not cache.ready.is_set()
    assert all(cache.get(t).version == "" for t in PUSH_ORDER)

    assert cache.set(config()) == list(PUSH_ORDER)

    assert cache.ready.is_set()
    assert all(cache.get(t).version for t in PUSH_ORDER)


def test_setting_the_same_content_again_changes_nothing() -> None:
    cache = SnapshotCache()
    cache.set(config())
    versions = {t: cache.get(t).version for t in PUSH_ORDER}

    # Freshly built, equal messages (not the same objects) are the same content.
    assert cache.set(config()) == []
    assert {t: cache.get(t).version for t in PUSH_ORDER} == versions


def test_only_the_types_whose_content_changed_are_reported() -> None:
    cache = SnapshotCache()
    cache.set(config())
    cds, lds = cache.get(CLUSTER).version, cache.get(LISTENER).version

    assert cache.set(config(endpoints={"model-a": (8033, 8034)})) == [ENDPOINT]
    assert cache.get(CLUSTER).version == cds

    assert cache.set(config(clusters={"model-a": 5}, endpoints={"model-a": (8033, 8034)})) == [
        CLUSTER
    ]
    assert cache.get(CLUSTER).version != cds
    assert cache.get(LISTENER).version == lds


def test_removing_a_resource_is_a_change() -> None:
    cache = SnapshotCache(retire_after_s=0)
    cache.set(config(clusters={"model-a": 1, "model-b": 1}))
    assert cache.set(config(clusters={"model-a": 1})) == [CLUSTER]
    assert set(cache.get(CLUSTER).resources) == {"model-a"}


def test_a_removed_cluster_stays_until_the_routes_that_named_it_are_long_gone() -> None:
    now = [0.0]
    cache = SnapshotCache(retire_after_s=10, clock=lambda: now[0])
    cache.set(config(clusters={"pod-a": 1, "pod-b": 1}))
    # pod-b's lease is gone: its routes move in this version, its cluster stays in it
    cache.set(config(clusters={"pod-a": 1}))
    assert set(cache.get(CLUSTER).resources) == {"pod-a", "pod-b"}
    assert cache.next_retirement == 10
    now[0] = 9.9
    cache.set(config(clusters={"pod-a": 1, "pod-c": 1}))
    assert set(cache.get(CLUSTER).resources) == {"pod-a", "pod-b", "pod-c"}
    now[0] = 10.0
    assert cache.set(config(clusters={"pod-a": 1, "pod-c": 1})) == [CLUSTER]
    assert set(cache.get(CLUSTER).resources) == {"pod-a", "pod-c"}
    assert cache.next_retirement is None
    # back before it went: no longer retiring
    cache.set(config(clusters={"pod-a": 1}))
    cache.set(config(clusters={"pod-a": 1, "pod-c": 1}))
    assert cache.next_retirement is None


def test_a_removed_scope_stays_with_its_route_table_and_listeners_go_at_once() -> None:
    now = [0.0]
    cache = SnapshotCache(retire_after_s=10, clock=lambda: now[0])
    first = config()
    cache.set(first)
    # a new listener computes other scope keys: the old scope (and the table it names)
    # stays for the old listener's draining connections; the old listener goes at once
    renamed = config()
    renamed[LISTENER] = {"ingress-2": listener_pb2.Listener(name="ingress-2")}
    renamed[SCOPED_ROUTE] = {
        "scope-2": scoped_route_pb2.ScopedRouteConfiguration(
            name="scope-2", route_configuration_name="models-2"
        )
    }
    renamed[ROUTE] = {"models-2": route_pb2.RouteConfiguration(name="models-2")}
    cache.set(renamed)
    assert set(cache.get(LISTENER).resources) == {"ingress-2"}
    assert set(cache.get(SCOPED_ROUTE).resources) == {"scope", "scope-2"}
    assert set(cache.get(ROUTE).resources) == {"models", "models-2"}
    assert cache.next_retirement == 10
    now[0] = 10.0
    cache.set(renamed)
    assert set(cache.get(SCOPED_ROUTE).resources) == {"scope-2"}
    assert set(cache.get(ROUTE).resources) == {"models-2"}
    assert cache.next_retirement is None


def test_version_is_a_content_hash_shared_by_replicas() -> None:
    one, two = SnapshotCache(), SnapshotCache()
    one.set(config(clusters={"model-a": 1, "model-b": 2}))
    # Another replica (or a restart) builds the same config in another order.
    two.set(config(clusters={"model-b": 2, "model-a": 1}))
    for t in PUSH_ORDER:
        assert one.get(t).version == two.get(t).version

    two.set(config(clusters={"model-b": 2, "model-a": 3}))
    assert one.get(CLUSTER).version != two.get(CLUSTER).version


def test_a_type_missing_from_the_config_is_served_empty() -> None:
    cache = SnapshotCache(retire_after_s=0)  # nothing kept for make-before-break
    cache.set(config())
    assert cache.set({CLUSTER: config()[CLUSTER]}) == [ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE]
    snap = cache.get(ENDPOINT)
    assert snap.version and snap.resources == {}
    resp = parse(snap.response(None, "n"))
    assert resp.type_url == ENDPOINT
    assert list(resp.resources) == []


# ---------------------------------------------------------------- change notifications


async def test_subscribed_events_are_set_on_change_only() -> None:
    cache = SnapshotCache()
    a, b, gone = asyncio.Event(), asyncio.Event(), asyncio.Event()
    for ev in (a, b, gone):
        cache.subscribe(ev)
    cache.unsubscribe(gone)

    cache.set(config())
    assert a.is_set() and b.is_set()
    assert not gone.is_set()

    a.clear()
    b.clear()
    assert cache.set(config()) == []
    assert not a.is_set() and not b.is_set()

    cache.set(config(endpoints={"model-a": (9000,)}))
    assert a.is_set() and b.is_set()


# ------------------------------------------------------------------------ responses


def test_response_parses_into_the_configured_messages() -> None:
    cache = SnapshotCache()
    resources = config(clusters={"model-a": 1, "model-b": 7})
    cache.set(resources)
    factories: dict[str, Callable[[], Message]] = {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        SCOPED_ROUTE: scoped_route_pb2.ScopedRouteConfiguration,
        ROUTE: route_pb2.RouteConfiguration,
    }
    for type_url in PUSH_ORDER:
        snap = cache.get(type_url)
        resp = parse(snap.response(None, "nonce-42"))
        assert resp.version_info == snap.version
        assert resp.type_url == type_url
        assert resp.nonce == "nonce-42"
        got = [unpack(r, factories[type_url]) for r in resp.resources]
        want = [resources[type_url][n] for n in sorted(resources[type_url])]
        assert got == want
        assert all(r.type_url == type_url for r in resp.resources)


def test_all_resources_are_sorted_by_name() -> None:
    cache = SnapshotCache()
    cache.set(config(clusters={"m-c": 1, "m-a": 1, "m-b": 1}))
    resp = parse(cache.get(CLUSTER).response(None, "1"))
    assert [unpack(r, cluster_pb2.Cluster).name for r in resp.resources] == ["m-a", "m-b", "m-c"]


def test_named_response_holds_only_known_requested_names() -> None:
    cache = SnapshotCache()
    cache.set(config(endpoints={"a": (1,), "b": (2,), "c": (3,)}))
    snap = cache.get(ENDPOINT)

    resp = parse(snap.response(frozenset({"c", "a", "unknown"}), "1"))
    names = [unpack(r, endpoint_pb2.ClusterLoadAssignment).cluster_name for r in resp.resources]
    assert names == ["a", "c"]
    assert resp.version_info == snap.version

    empty = parse(snap.response(frozenset({"unknown"}), "2"))
    assert list(empty.resources) == []
    assert empty.version_info == snap.version
    assert empty.type_url == ENDPOINT


def test_body_is_built_once_and_only_the_nonce_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SnapshotCache()
    cache.set(config(clusters={"model-a": 1, "model-b": 2}))
    snap = cache.get(CLUSTER)
    first = snap.response(None, "1")

    encoded: list[int] = []
    real = cache_module.encode_field

    def counting(number: int, payload: bytes) -> bytes:
        encoded.append(number)
        return real(number, payload)

    monkeypatch.setattr(cache_module, "encode_field", counting)
    second = snap.response(None, "22")

    assert encoded == [5], "second response re-encoded more than its nonce"
    tail1, tail2 = encode_field(5, b"1"), encode_field(5, b"22")
    assert first.endswith(tail1) and second.endswith(tail2)
    assert first[: -len(tail1)] == second[: -len(tail2)]
    assert parse(first).nonce == "1" and parse(second).nonce == "22"

    # A different name set is a different body, itself cached.
    encoded.clear()
    only_b = frozenset({"model-b"})
    snap.response(only_b, "3")
    assert encoded.count(2) == 1  # one resource
    encoded.clear()
    snap.response(only_b, "4")
    assert encoded == [5]


def test_a_message_set_again_keeps_its_bytes_without_serializing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = SnapshotCache()
    resources = config(endpoints={"a": (1,), "b": (2,)})
    cache.set(resources)
    before = cache.get(ENDPOINT).resources

    # The same objects again, but "b" replaced: only "b" is serialized, "a" keeps its
    # very bytes (which lets a stream tell it apart from a change without comparing).
    serialized: list[str] = []
    real = cache_module.encode_field

    def counting(number: int, payload: bytes) -> bytes:
        if number == 1 and payload.endswith(b"ClusterLoadAssignment"):
            serialized.append("eds")
        return real(number, payload)

    monkeypatch.setattr(cache_module, "encode_field", counting)
    again = dict(resources)
    again[ENDPOINT] = {"a": resources[ENDPOINT]["a"], "b": assignment("b", 3)}
    assert cache.set(again) == [ENDPOINT]
    after = cache.get(ENDPOINT).resources
    assert after["a"] is before["a"]
    assert after["b"] != before["b"]
    assert serialized == ["eds"]


def test_unchanged_set_keeps_the_built_body() -> None:
    cache = SnapshotCache()
    cache.set(config())
    snap = cache.get(CLUSTER)
    snap.response(None, "1")
    cache.set(config())
    assert cache.get(CLUSTER) is snap


def test_snapshot_without_resources_still_has_version_and_type() -> None:
    snap = TypeSnapshot(CLUSTER, "v1", {})
    resp = parse(snap.response(None, "7"))
    assert (resp.version_info, resp.type_url, resp.nonce) == ("v1", CLUSTER, "7")
    assert list(resp.resources) == []


# ----------------------------------------------------------------------- wire format


@pytest.mark.parametrize("size", [1, 127, 128, 300, 16383, 16384, 200_000])
def test_encode_field_matches_protobuf(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert len(payload) == size
    # Any.value is field 2 (bytes); DiscoveryResponse.version_info is field 1 (string).
    assert encode_field(2, payload) == any_pb2.Any(value=payload).SerializeToString()
    text = "v" * size
    assert (
        encode_field(1, text.encode())
        == discovery_pb2.DiscoveryResponse(version_info=text).SerializeToString()
    )


def test_encode_field_of_an_empty_payload_parses_as_the_default() -> None:
    # proto3 omits empty fields, so bytes differ from SerializeToString; the parse agrees.
    assert encode_field(1, b"") == b"\x0a\x00"
    assert discovery_pb2.DiscoveryResponse.FromString(encode_field(1, b"")).version_info == ""


def test_encode_field_with_a_two_byte_tag() -> None:
    # Field numbers above 15 need a two-byte tag varint.
    field = cluster_pb2.Cluster.DESCRIPTOR.fields_by_name["alt_stat_name"]
    assert field.number > 15
    msg = cluster_pb2.Cluster(alt_stat_name="x" * 200)
    assert encode_field(field.number, b"x" * 200) == msg.SerializeToString()
