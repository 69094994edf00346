"""The ADS conversation as Envoy holds it, against a real grpc.aio server on 127.0.0.1.

Each test drives one or more fake gateways: requests are queued like Envoy sends them
(initial request with the node, ACK = version_info + nonce of the response, NACK = the
same plus error_detail), and a background task reads every response into a queue so a
test can wait for the next one or check that nothing comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import grpc
import pytest
import pytest_asyncio
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from prometheus_client import REGISTRY

from modelxds.xds import cache as cache_module
from modelxds.xds import server as server_module
from modelxds.xds.cache import SnapshotCache, TypeSnapshot
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from modelxds.xds.server import AdsServer, Stream
from tests.unit.xds_messages import assignment, cluster, route_table

Request: TypeAlias = discovery_pb2.DiscoveryRequest
Response: TypeAlias = discovery_pb2.DiscoveryResponse

# The types these tests' configs have, in push order (no scoped routes)
ORDER = [CLUSTER, ENDPOINT, LISTENER, ROUTE]
WAIT = 1.0  # a response that should come
QUIET = 0.2  # how long "nothing is sent" is watched for

FACTORIES: dict[str, Callable[[], Message]] = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
}

# ---------------------------------------------------------------------------- config


def make_config(
    clusters: dict[str, int] | None = None,
    endpoints: dict[str, int] | None = None,
    routes: dict[str, str] | None = None,
    listener_port: int = 8080,
) -> dict[str, dict[str, Message]]:
    """clusters: name -> connect timeout (s); endpoints: cluster -> port; routes: prefix -> cluster.

    The default is one model cluster with one endpoint, one listener and one route table.
    """
    clusters = {"model-a": 1} if clusters is None else clusters
    endpoints = {"model-a": 8033} if endpoints is None else endpoints
    routes = {"/": "model-a"} if routes is None else routes
    return {
        CLUSTER: {name: cluster(name, timeout) for name, timeout in clusters.items()},
        ENDPOINT: {
            name: assignment(name, port, host="10.1.0.7") for name, port in endpoints.items()
        },
        LISTENER: {
            "ingress": listener_pb2.Listener(
                name="ingress",
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(
                        address="0.0.0.0", port_value=listener_port
                    )
                ),
            )
        },
        ROUTE: {"models": route_table("models", routes)},
    }


def names_in(resp: Response) -> list[str]:
    """Resource names of a response, in the order sent."""
    out = []
    for any_msg in resp.resources:
        msg = FACTORIES[resp.type_url]()
        assert any_msg.Unpack(msg)
        out.append(getattr(msg, "cluster_name", "") or getattr(msg, "name", ""))
    return out


def unpacked(resp: Response) -> list[Message]:
    out = []
    for any_msg in resp.resources:
        msg = FACTORIES[resp.type_url]()
        assert any_msg.Unpack(msg)
        out.append(msg)
    return out


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def eventually(check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------ gateway


class Gateway:
    """One Envoy's side of an ADS stream."""

    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, node_id: str) -> None:
        self.node_id = node_id
        self._requests: asyncio.Queue[Request | None] = asyncio.Queue()
        self.responses: asyncio.Queue[Response] = asyncio.Queue()
        self._first = True
        self.call = stub.StreamAggregatedResources(self._request_iterator())
        self._reader = asyncio.create_task(self._read())

    async def _request_iterator(self) -> AsyncIterator[Request]:
        while (req := await self._requests.get()) is not None:
            yield req

    async def _read(self) -> None:
        async for resp in self.call:
            await self.responses.put(resp)

    def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        req = Request(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        if self._first:  # Envoy sends its node on the first request of a stream
            req.node.CopyFrom(base_pb2.Node(id=self.node_id, cluster="gateways"))
            self._first = False
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put_nowait(req)

    def ack(self, resp: Response, names: Iterable[str] = ()) -> None:
        self.request(resp.type_url, names, resp.version_info, resp.nonce)

    def nack(
        self, resp: Response, message: str, names: Iterable[str] = (), version: str | None = None
    ) -> None:
        """version: what Envoy still runs (its last accepted version); default the rejected."""
        v = resp.version_info if version is None else version
        self.request(resp.type_url, names, v, resp.nonce, error=message)

    async def recv(self, timeout: float = WAIT) -> Response:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.responses.get(), timeout)
        pytest.fail(f"{self.node_id}: no response within {timeout} s")

    async def recv_types(self, n: int) -> list[str]:
        return [(await self.recv()).type_url for _ in range(n)]

    async def expect_nothing(self, timeout: float = QUIET) -> None:
        with contextlib.suppress(TimeoutError):
            resp = await asyncio.wait_for(self.responses.get(), timeout)
            pytest.fail(f"unexpected {resp.type_url} version {resp.version_info!r}")

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await asyncio.wait_for(self._reader, WAIT)


@dataclass
class Env:
    cache: SnapshotCache
    ads: AdsServer
    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub
    gateways: list[Gateway] = field(default_factory=list)

    def gateway(self, node_id: str = "gw-1") -> Gateway:
        gw = Gateway(self.stub, node_id)
        self.gateways.append(gw)
        return gw

    def stream_of(self, node_id: str) -> Stream:
        matches = [s for s in self.ads.streams.values() if s.node_id == node_id]
        assert len(matches) == 1, f"streams for {node_id}: {self.ads.streams}"
        return matches[0]


@pytest_asyncio.fixture
async def env() -> AsyncIterator[Env]:
    cache = SnapshotCache()
    ads = AdsServer(cache)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([ads.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    e = Env(cache, ads, ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel))
    try:
        yield e
    finally:
        for gw in e.gateways:
            await gw.close()
        await channel.close()
        await server.stop(None)


async def connect_all(env: Env, node_id: str = "gw-1") -> tuple[Gateway, dict[str, Response]]:
    """A gateway subscribed to all four types, every response ACKed (cache already set)."""
    gw = env.gateway(node_id)
    got: dict[str, Response] = {}
    gw.request(CLUSTER)
    got[CLUSTER] = await gw.recv()
    gw.ack(got[CLUSTER])
    gw.request(ENDPOINT, ["model-a"])
    got[ENDPOINT] = await gw.recv()
    gw.ack(got[ENDPOINT], ["model-a"])
    gw.request(LISTENER)
    got[LISTENER] = await gw.recv()
    gw.ack(got[LISTENER])
    gw.request(ROUTE, ["models"])
    got[ROUTE] = await gw.recv()
    gw.ack(got[ROUTE], ["models"])
    assert [r.type_url for r in got.values()] == ORDER
    await gw.expect_nothing()
    return gw, got


# -------------------------------------------------------------------------- tests


async def test_nothing_is_sent_before_the_first_config(env: Env) -> None:
    gw = env.gateway()
    gw.request(CLUSTER)
    await gw.expect_nothing()
    # The stream is known (and named) even while it waits.
    assert env.stream_of("gw-1").cluster == "gateways"

    env.cache.set(make_config())
    resp = await gw.recv()
    assert resp.type_url == CLUSTER
    assert resp.version_info == env.cache.get(CLUSTER).version
    assert resp.nonce
    assert names_in(resp) == ["model-a"]
    assert unpacked(resp) == [make_config()[CLUSTER]["model-a"]]
    await gw.expect_nothing()


async def test_first_push_follows_push_order_whatever_the_request_order(env: Env) -> None:
    gw = env.gateway()
    # Dependents asked for first: the server must still send clusters before endpoints
    # and listeners before routes.
    gw.request(ROUTE, ["models"])
    gw.request(ENDPOINT, ["model-a"])
    gw.request(LISTENER)
    gw.request(CLUSTER)
    await gw.expect_nothing()

    env.cache.set(make_config())
    assert await gw.recv_types(4) == ORDER
    await gw.expect_nothing()


async def test_cds_before_eds_and_lds_before_rds_when_both_change(env: Env) -> None:
    env.cache.set(make_config())
    gw, _ = await connect_all(env)

    env.cache.set(make_config(clusters={"model-a": 2}, endpoints={"model-a": 9000}))
    cds, eds = await gw.recv(), await gw.recv()
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    assert cds.version_info == env.cache.get(CLUSTER).version
    assert eds.version_info == env.cache.get(ENDPOINT).version
    gw.ack(cds)
    gw.ack(eds, ["model-a"])
    await gw.expect_nothing()

    env.cache.set(
        make_config(
            clusters={"model-a": 2},
            endpoints={"model-a": 9000},
            routes={"/v2": "model-a"},
            listener_port=9090,
        )
    )
    lds, rds = await gw.recv(), await gw.recv()
    assert (lds.type_url, rds.type_url) == (LISTENER, ROUTE)
    assert rds.version_info == env.cache.get(ROUTE).version


async def test_ack_settles_the_stream_and_a_change_sends_a_new_version(env: Env) -> None:
    env.cache.set(make_config())
    gw = env.gateway("gw-ack")
    gw.request(CLUSTER)
    v1 = await gw.recv()
    acks = sample("modelxds_xds_acks_total", {"type": "cds"})
    gw.ack(v1)
    await gw.expect_nothing()

    stream = env.stream_of("gw-ack")
    state = stream.types[CLUSTER]
    assert state.acked_version == v1.version_info
    assert state.nacked_version == ""
    assert sample("modelxds_xds_acks_total", {"type": "cds"}) == acks + 1

    # Same content again: still nothing.
    env.cache.set(make_config())
    await gw.expect_nothing()

    env.cache.set(make_config(clusters={"model-a": 1, "model-b": 1}))
    v2 = await gw.recv()
    assert v2.type_url == CLUSTER
    assert v2.version_info not in ("", v1.version_info)
    assert v2.nonce != v1.nonce
    assert names_in(v2) == ["model-a", "model-b"]
    assert state.acked_version == v1.version_info  # not acked yet
    gw.ack(v2)
    await eventually(lambda: state.acked_version == v2.version_info)


async def test_nack_is_recorded_and_the_rejected_version_is_not_resent(env: Env) -> None:
    env.cache.set(make_config())
    gw = env.gateway("gw-nack")
    gw.request(CLUSTER)
    v1 = await gw.recv()
    gw.ack(v1)
    gw.request(LISTENER)
    lds1 = await gw.recv()
    gw.ack(lds1)
    await gw.expect_nothing()

    env.cache.set(make_config(clusters={"model-a": 3}))
    v2 = await gw.recv()
    nacks = sample("modelxds_xds_nacks_total", {"type": "cds"})
    # Envoy NACKs with the version it still runs (v1) and the nonce of the rejected response.
    gw.nack(v2, "cluster model-a: bad connect_timeout", version=v1.version_info)
    await gw.expect_nothing()

    state = env.stream_of("gw-nack").types[CLUSTER]
    assert state.nacked_version == v2.version_info
    assert state.nack_message == "cluster model-a: bad connect_timeout"
    assert state.acked_version == v1.version_info
    assert sample("modelxds_xds_nacks_total", {"type": "cds"}) == nacks + 1

    # Another type's change wakes the stream: only that type goes out, not the rejected CDS.
    env.cache.set(make_config(clusters={"model-a": 3}, listener_port=9999))
    lds2 = await gw.recv()
    assert lds2.type_url == LISTENER
    gw.ack(lds2)
    await gw.expect_nothing()

    # A fixed config is a new version: it is sent.
    env.cache.set(make_config(clusters={"model-a": 4}, listener_port=9999))
    v3 = await gw.recv()
    assert v3.type_url == CLUSTER
    assert v3.version_info not in (v1.version_info, v2.version_info)
    gw.ack(v3)
    await eventually(lambda: state.acked_version == v3.version_info)
    assert sample("modelxds_xds_nacks_total", {"type": "cds"}) == nacks + 1


async def test_nack_of_the_first_response(env: Env) -> None:
    env.cache.set(make_config())
    gw = env.gateway("gw-first-nack")
    gw.request(CLUSTER)
    v1 = await gw.recv()
    nacks = sample("modelxds_xds_nacks_total", {"type": "cds"})
    gw.nack(v1, "rejected", version="")
    await gw.expect_nothing()
    state = env.stream_of("gw-first-nack").types[CLUSTER]
    assert (state.nacked_version, state.acked_version) == (v1.version_info, "")
    assert sample("modelxds_xds_nacks_total", {"type": "cds"}) == nacks + 1


async def test_requests_with_a_stale_nonce_are_ignored(env: Env) -> None:
    env.cache.set(make_config())
    gw = env.gateway("gw-stale")
    gw.request(CLUSTER)
    v1 = await gw.recv()
    # A change before the gateway answered v1: v2 supersedes it.
    env.cache.set(make_config(clusters={"model-a": 2}))
    v2 = await gw.recv()
    state = env.stream_of("gw-stale").types[CLUSTER]
    nacks = sample("modelxds_xds_nacks_total", {"type": "cds"})

    gw.ack(v1)  # answers the superseded response
    gw.nack(v1, "too late")
    await gw.expect_nothing()
    assert state.acked_version == ""
    assert state.nacked_version == ""
    assert sample("modelxds_xds_nacks_total", {"type": "cds"}) == nacks

    gw.ack(v2)
    await eventually(lambda: state.acked_version == v2.version_info)
    await gw.expect_nothing()


async def test_stale_nonce_does_not_change_the_subscription(env: Env) -> None:
    env.cache.set(make_config(clusters={"a": 1, "b": 1}, endpoints={"a": 1, "b": 2}))
    gw = env.gateway()
    gw.request(ENDPOINT, ["a"])
    eds = await gw.recv()
    gw.request(ENDPOINT, ["b"], eds.version_info, "not-a-nonce-we-sent")
    await gw.expect_nothing()
    assert env.stream_of("gw-1").types[ENDPOINT].names == frozenset({"a"})
    gw.ack(eds, ["a"])
    await gw.expect_nothing()


async def test_eds_sends_only_the_named_resources(env: Env) -> None:
    env.cache.set(
        make_config(
            clusters={"model-a": 1, "model-b": 1, "model-c": 1},
            endpoints={"model-a": 1, "model-b": 2, "model-c": 3},
        )
    )
    gw = env.gateway()
    gw.request(ENDPOINT, ["model-a", "model-x"])
    first = await gw.recv()
    assert first.type_url == ENDPOINT
    assert names_in(first) == ["model-a"]  # model-x does not exist: silently absent

    # New names, same cache: the gateway still gets an answer, with the same version.
    gw.ack(first, ["model-c", "model-b"])
    second = await gw.recv()
    assert names_in(second) == ["model-b", "model-c"]
    assert second.version_info == first.version_info
    assert second.nonce != first.nonce
    gw.ack(second, ["model-c", "model-b"])
    await gw.expect_nothing()

    # A change to an endpoint the gateway did not ask for is still a new version, to
    # ACK; what it holds did not change, so it comes without resources (a gateway keeps
    # the EDS and RDS resources a response leaves out).
    env.cache.set(
        make_config(
            clusters={"model-a": 1, "model-b": 1, "model-c": 1},
            endpoints={"model-a": 7, "model-b": 2, "model-c": 3},
        )
    )
    third = await gw.recv()
    assert names_in(third) == []
    assert third.version_info != second.version_info
    gw.ack(third, ["model-c", "model-b"])

    # Only what changed of what it asked for is sent.
    env.cache.set(
        make_config(
            clusters={"model-a": 1, "model-b": 1, "model-c": 1},
            endpoints={"model-a": 7, "model-b": 2, "model-c": 4},
        )
    )
    fourth = await gw.recv()
    assert names_in(fourth) == ["model-c"]
    (cla,) = unpacked(fourth)
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    assert cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 4


async def test_after_a_nack_the_next_version_sends_every_named_resource(env: Env) -> None:
    """Envoy may have taken part of a rejected response: what it holds is unknown."""
    endpoints = {"model-a": 1, "model-b": 2}
    env.cache.set(make_config(clusters={"model-a": 1, "model-b": 1}, endpoints=endpoints))
    gw = env.gateway()
    gw.request(ENDPOINT, ["model-a", "model-b"])
    gw.ack(await gw.recv(), ["model-a", "model-b"])
    env.cache.set(
        make_config(clusters={"model-a": 1, "model-b": 1}, endpoints={**endpoints, "model-b": 3})
    )
    rejected = await gw.recv()
    assert names_in(rejected) == ["model-b"]
    gw.nack(rejected, "bad endpoint", names=["model-a", "model-b"])
    await gw.expect_nothing()

    env.cache.set(
        make_config(clusters={"model-a": 1, "model-b": 1}, endpoints={**endpoints, "model-b": 4})
    )
    assert names_in(await gw.recv()) == ["model-a", "model-b"]


async def test_cds_response_resends_unchanged_eds(env: Env) -> None:
    env.cache.set(make_config())
    gw, got = await connect_all(env)

    # Only the cluster changes: Envoy warms the replaced cluster until it gets its
    # endpoints, so EDS (same version) must follow.
    env.cache.set(make_config(clusters={"model-a": 9}))
    cds = await gw.recv()
    eds = await gw.recv()
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    assert eds.version_info == got[ENDPOINT].version_info
    assert eds.nonce != got[ENDPOINT].nonce
    assert names_in(eds) == ["model-a"]
    gw.ack(cds)
    gw.ack(eds, ["model-a"])
    await gw.expect_nothing()


async def test_lds_response_resends_unchanged_rds(env: Env) -> None:
    env.cache.set(make_config())
    gw, got = await connect_all(env)

    env.cache.set(make_config(listener_port=9000))
    lds = await gw.recv()
    rds = await gw.recv()
    assert (lds.type_url, rds.type_url) == (LISTENER, ROUTE)
    assert rds.version_info == got[ROUTE].version_info
    assert names_in(rds) == ["models"]
    await gw.expect_nothing()


async def test_eds_only_change_does_not_resend_cds(env: Env) -> None:
    env.cache.set(make_config())
    gw, _ = await connect_all(env)
    env.cache.set(make_config(endpoints={"model-a": 9}))
    eds = await gw.recv()
    assert eds.type_url == ENDPOINT
    await gw.expect_nothing()


async def test_reconnect_cleans_up_and_gets_the_full_config_again(env: Env) -> None:
    connected = sample("modelxds_xds_connected_streams")
    env.cache.set(make_config())
    gw, got = await connect_all(env, "gw-r")
    assert len(env.ads.streams) == 1
    assert sample("modelxds_xds_connected_streams") == connected + 1

    await gw.close()
    await eventually(lambda: not env.ads.streams)
    assert sample("modelxds_xds_connected_streams") == connected

    # Envoy reconnects telling what it runs (version_info) but with no nonce: it still
    # needs every response, even though nothing changed.
    again = env.gateway("gw-r")
    again.request(CLUSTER, version=got[CLUSTER].version_info)
    again.request(ENDPOINT, ["model-a"], version=got[ENDPOINT].version_info)
    again.request(LISTENER, version=got[LISTENER].version_info)
    again.request(ROUTE, ["models"], version=got[ROUTE].version_info)
    responses = [await again.recv() for _ in range(4)]
    assert [r.type_url for r in responses] == ORDER
    for r in responses:
        assert r.version_info == got[r.type_url].version_info
        assert unpacked(r) == unpacked(got[r.type_url])
    assert env.stream_of("gw-r").types[CLUSTER].acked_version == ""
    assert sample("modelxds_xds_connected_streams") == connected + 1


async def test_two_gateways_get_every_update_from_one_shared_body(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = env.gateway("gw-1"), env.gateway("gw-2")
    one.request(CLUSTER)
    two.request(CLUSTER)
    await one.expect_nothing(0.05)
    await eventually(lambda: len(env.ads.streams) == 2)

    encoded: list[int] = []
    real = cache_module.encode_field

    def counting(number: int, payload: bytes) -> bytes:
        encoded.append(number)
        return real(number, payload)

    for step, clusters in enumerate(({"a": 1, "b": 1}, {"a": 1, "b": 1, "c": 1})):
        env.cache.set(make_config(clusters=clusters))
        # Count only what the streams encode (set() above encoded the resources).
        monkeypatch.setattr(cache_module, "encode_field", counting)
        encoded.clear()
        r1, r2 = await one.recv(), await two.recv()
        monkeypatch.undo()

        assert r1.version_info == r2.version_info == env.cache.get(CLUSTER).version
        assert names_in(r1) == names_in(r2) == sorted(clusters)
        assert unpacked(r1) == unpacked(r2)
        assert r1.nonce != r2.nonce
        stripped1, stripped2 = Response(), Response()
        stripped1.CopyFrom(r1)
        stripped2.CopyFrom(r2)
        stripped1.nonce = stripped2.nonce = ""
        assert stripped1 == stripped2
        # One body with len(clusters) resources, two nonces: not one body per stream.
        assert encoded.count(2) == len(clusters), f"step {step}: {encoded}"
        assert encoded.count(5) == 2
        one.ack(r1)
        two.ack(r2)
        await one.expect_nothing(0.1)
        await two.expect_nothing(0.05)


async def test_unsupported_type_is_ignored_and_the_stream_keeps_working(env: Env) -> None:
    env.cache.set(make_config())
    gw = env.gateway()
    gw.request("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")
    await gw.expect_nothing()
    gw.request(CLUSTER)
    resp = await gw.recv()
    assert resp.type_url == CLUSTER
    assert env.stream_of("gw-1").node_id == "gw-1"


async def test_a_version_rejected_again_after_an_accepted_one_is_counted_again(
    env: Env,
) -> None:
    """A bad config, a fix, then the bad config again (e.g. the fix rolled back).

    The second rejection is a new push refused by the gateway: the operator must see it
    in modelxds_xds_nacks_total like the first one.
    """
    bad, good = make_config(clusters={"model-a": 3}), make_config()
    env.cache.set(bad)
    gw = env.gateway("gw-rollback")
    gw.request(CLUSTER)
    first = await gw.recv()
    nacks = sample("modelxds_xds_nacks_total", {"type": "cds"})
    gw.nack(first, "bad cluster", version="")
    await gw.expect_nothing(0.1)
    assert sample("modelxds_xds_nacks_total", {"type": "cds"}) == nacks + 1

    env.cache.set(good)
    fixed = await gw.recv()
    gw.ack(fixed)
    await gw.expect_nothing(0.1)

    env.cache.set(bad)
    again = await gw.recv()
    assert again.version_info == first.version_info
    gw.nack(again, "bad cluster", version=fixed.version_info)
    await gw.expect_nothing(0.1)
    state = env.stream_of("gw-rollback").types[CLUSTER]
    assert state.nacked_version == again.version_info
    assert state.acked_version == fixed.version_info
    assert sample("modelxds_xds_nacks_total", {"type": "cds"}) == nacks + 2


async def test_an_explicit_wildcard_subscription_gets_every_cluster_and_listener(
    env: Env,
) -> None:
    env.cache.set(make_config(clusters={"model-a": 1, "model-b": 2}))
    gw = env.gateway()
    gw.request(CLUSTER, ["*"])  # the protocol's explicit wildcard, not a cluster named "*"
    resp = await gw.recv()
    assert sorted(names_in(resp)) == ["model-a", "model-b"]
    gw.ack(resp, ["*"])
    gw.request(LISTENER, ["*", "ingress"])
    assert names_in(await gw.recv()) == ["ingress"]


def test_response_bodies_kept_per_version_are_bounded() -> None:
    cache = SnapshotCache()
    cache.set(make_config(endpoints={f"m-{i}": 8033 for i in range(200)}))
    snap = cache.get(ENDPOINT)
    for i in range(1000):  # 1,000 gateways, each with an odd set of names
        body = snap.response(frozenset({f"m-{i % 200}", f"m-{(i * 7) % 200}"}), str(i))
        assert Response.FromString(body).nonce == str(i)
    assert len(snap._bodies) <= cache_module.MAX_BODIES


async def test_one_response_cycle_sends_every_type_from_one_version(env: Env) -> None:
    env.cache.set(make_config())
    gw, _ = await connect_all(env)
    newer = make_config(clusters={"model-c": 1}, routes={"/": "model-c"})
    respond = env.ads._next_response

    def a_push_lands_mid_cycle(
        stream: Stream, type_url: str, snap: TypeSnapshot
    ) -> frozenset[str] | Literal[False] | None:
        out = respond(stream, type_url, snap)
        if type_url == CLUSTER and out is not False and "model-b" in snap.resources:
            env.cache.set(newer)  # while this cycle is still to send LDS and RDS
        return out

    env.ads._next_response = a_push_lands_mid_cycle  # type: ignore[method-assign]
    env.cache.set(make_config(clusters={"model-b": 1}, routes={"/": "model-b"}))
    cds = await gw.recv()
    assert cds.type_url == CLUSTER and "model-b" in names_in(cds)
    rds = await gw.recv()
    while rds.type_url != ROUTE:  # EDS of the replaced cluster comes in between
        assert rds.type_url != CLUSTER, "a newer CDS before this cycle's RDS"
        rds = await gw.recv()
    (table,) = unpacked(rds)
    assert isinstance(table, route_pb2.RouteConfiguration)
    # the routes of the clusters just sent, not of the push that landed meanwhile
    assert table.virtual_hosts[0].routes[0].route.cluster == "model-b"
    assert "model-c" in names_in(await gw.recv())  # and then the newer version, whole


async def test_gateways_beyond_the_limit_and_oversized_subscriptions_are_refused_clearly(
    env: Env,
) -> None:
    env.cache.set(make_config())
    env.ads.max_streams, env.ads.max_names = 1, 3
    first, _ = await connect_all(env)
    second = env.gateway("gw-2")
    second.request(CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(second._reader, WAIT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 1 gateways" in (refused.value.details() or "")
    first.request(ENDPOINT, ["a", "b", "c", "d"])  # one name over the limit
    with pytest.raises(grpc.aio.AioRpcError) as oversized:
        await asyncio.wait_for(first._reader, WAIT)
    assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "eds request names 4 resources" in (oversized.value.details() or "")


class _CountingSemaphore(asyncio.Semaphore):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.held = self.most = 0

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self.held += 1
        self.most = max(self.most, self.held)
        return True

    def release(self) -> None:
        self.held -= 1
        super().release()


async def test_large_first_configs_go_out_a_few_streams_at_a_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "LARGE_RESPONSE", 1)  # every response counts as large
    env.ads._large_sends = turns = _CountingSemaphore(2)
    env.cache.set(make_config(clusters={f"model-{i}": 1 for i in range(50)}))
    gateways = [env.gateway(f"gw-{i}") for i in range(12)]

    async def sync(gw: Gateway) -> int:
        gw.request(CLUSTER)
        resp = await gw.recv()
        gw.ack(resp)
        return len(names_in(resp))

    assert await asyncio.gather(*map(sync, gateways)) == [50] * 12
    await eventually(lambda: turns.held == 0)
    assert turns.most == 2


async def test_a_large_response_holds_its_turn_until_the_gateway_answers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "LARGE_RESPONSE", 1)
    env.ads._large_sends = asyncio.Semaphore(1)
    env.cache.set(make_config())
    first, second = env.gateway("gw-1"), env.gateway("gw-2")
    first.request(CLUSTER)
    cds = await first.recv()
    second.request(CLUSTER)
    await second.expect_nothing()  # gw-1 is still applying its config
    first.ack(cds)
    assert names_in(await second.recv()) == ["model-a"]


async def test_a_gateway_that_never_answers_delays_the_others_only_so_long(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "LARGE_RESPONSE", 1)
    monkeypatch.setattr(server_module, "LARGE_SEND_WAIT_S", 0.3)
    env.ads._large_sends = asyncio.Semaphore(1)
    env.cache.set(make_config())
    silent, other = env.gateway("gw-1"), env.gateway("gw-2")
    silent.request(CLUSTER)
    await silent.recv()  # and never ACKs
    started = time.monotonic()
    other.request(CLUSTER)
    assert names_in(await other.recv()) == ["model-a"]
    assert time.monotonic() - started >= 0.25
