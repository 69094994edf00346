"""A lightweight gateway: one ADS stream that subscribes and answers as Envoy does.

It asks for CDS and LDS whole, then for EDS by the clusters' names, for SRDS when a
listener routes by scopes, and for RDS by the names the listeners and scopes give; it
ACKs each response (its version and nonce), or NACKs it (the nonce, the version it
had before and an error) while ``nack`` is set. It keeps what an Envoy would hold
(the accepted resources of each type, serialized, by name) and how many responses
of each type came, but does not apply any of it: the benchmarks use it to load the
server with many gateways, the fault tests to see exactly what one was sent.

As Envoy does on a new stream (``GrpcMuxImpl::onStreamEstablished``), ``resumed``
starts one with the versions and subscriptions of a previous stream and its nonces
cleared.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import code_pb2, status_pb2

from modelxds.xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    WILDCARD_TYPES,
)

_NAME: dict[str, Callable[[bytes], str]] = {
    CLUSTER: lambda b: str(cluster_pb2.Cluster.FromString(b).name),
    ENDPOINT: lambda b: str(endpoint_pb2.ClusterLoadAssignment.FromString(b).cluster_name),
    LISTENER: lambda b: str(listener_pb2.Listener.FromString(b).name),
    SCOPED_ROUTE: lambda b: str(scoped_route_pb2.ScopedRouteConfiguration.FromString(b).name),
    ROUTE: lambda b: str(route_pb2.RouteConfiguration.FromString(b).name),
}
NACK_MESSAGE = "rejected by a test gateway"


class GatewayClient:
    """One gateway's ADS stream on ``channel``; ``run()`` holds it until cancelled or the
    server ends it. ``nack`` may be changed at any time: it applies to the next response."""

    def __init__(
        self, channel: grpc.aio.Channel, node_id: str, *, nack: bool = False, keep: bool = True
    ) -> None:
        """``keep``: hold the resources (False: only subscribe and answer, as the
        benchmarks' many gateways do, so that their process stays small)."""
        self.channel = channel
        self.node_id = node_id
        self.nack = nack
        self.keep = keep
        # what the gateway holds: per type, the accepted resources (serialized) by name
        self.resources: dict[str, dict[str, bytes]] = {}
        self.versions: dict[str, str] = {}  # per type, the version last accepted
        self.nonces: dict[str, str] = {}  # per type, of the last response
        self.responses: Counter[str] = Counter()  # per type, responses received
        self.names: dict[str, list[str]] = {}  # per type, the names subscribed to
        # RDS names by what named them (listeners, scopes): Envoy watches all of them
        self._route_names: dict[str, list[str]] = {}
        self._queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

    @classmethod
    def resumed(
        cls, old: GatewayClient, channel: grpc.aio.Channel, *, keep_nonces: bool = False
    ) -> GatewayClient:
        """A new stream of the gateway ``old`` was: its config, versions and
        subscriptions, its nonces cleared as Envoy's are (``keep_nonces``: sent again)."""
        new = cls(channel, old.node_id, nack=old.nack, keep=old.keep)
        new.resources = copy.deepcopy(old.resources)
        new.versions = dict(old.versions)
        new.names = {t: list(n) for t, n in old.names.items()}
        new._route_names = {k: list(v) for k, v in old._route_names.items()}
        if keep_nonces:
            new.nonces = dict(old.nonces)
        return new

    def _request(self, type_url: str, error: str = "") -> discovery_pb2.DiscoveryRequest:
        """What Envoy sends for a type: the version it holds, the nonce of the response it
        answers, its names; ``error``: a NACK."""
        return discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=self.versions.get(type_url, ""),
            response_nonce=self.nonces.get(type_url, ""),
            resource_names=self.names.get(type_url, []),
            error_detail=status_pb2.Status(code=code_pb2.INTERNAL, message=error)
            if error
            else None,
        )

    async def run(self) -> None:
        """Subscribe and answer every response until the stream ends."""
        for type_url in list(self.names) or [CLUSTER, LISTENER]:
            self.names.setdefault(type_url, [])
            first = self._request(type_url)
            first.node.CopyFrom(base_pb2.Node(id=self.node_id))
            self._queue.put_nowait(first)

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await self._queue.get()

        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        async for resp in stub.StreamAggregatedResources(requests()):
            self._on_response(resp)

    def _on_response(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        type_url = resp.type_url
        self.responses[type_url] += 1
        self.nonces[type_url] = resp.nonce
        if self.nack:
            self._queue.put_nowait(self._request(type_url, error=NACK_MESSAGE))
            return
        blobs = [r.value for r in resp.resources]
        if self.keep:
            got = {_NAME[type_url](b): b for b in blobs}
            if type_url in WILDCARD_TYPES:
                self.resources[type_url] = got
            else:  # a response names only what changed: the gateway keeps the rest
                held = self.resources.setdefault(type_url, {})
                watched = self.names.get(type_url, ())
                held.update((n, b) for n, b in got.items() if n in watched)
        self.versions[type_url] = resp.version_info
        self._queue.put_nowait(self._request(type_url))
        for wanted_type, wanted in self._wants(type_url, blobs).items():
            self._subscribe(wanted_type, wanted)

    def _subscribe(self, type_url: str, wanted: list[str]) -> None:
        first = type_url not in self.names
        if not first and self.names[type_url] == wanted:
            return
        self.names[type_url] = wanted
        held = self.resources.get(type_url)
        if held is not None and type_url not in WILDCARD_TYPES:
            # no longer watched: Envoy drops what it held of them
            for name in set(held) - set(wanted):
                del held[name]
        if first or wanted:  # a new subscription, or new names for it
            self._queue.put_nowait(self._request(type_url))

    def _wants(self, type_url: str, held: list[bytes]) -> dict[str, list[str]]:
        """What an accepted response makes Envoy subscribe to: EDS names from clusters,
        RDS names from listeners' RDS and from scopes, and SRDS (whole) for listeners
        with scoped routes. Only wildcard types name others, and they come whole."""
        if type_url == CLUSTER:
            clusters = [cluster_pb2.Cluster.FromString(b) for b in held]
            return {
                ENDPOINT: sorted(
                    c.eds_cluster_config.service_name or c.name
                    for c in clusters
                    if c.type == cluster_pb2.Cluster.EDS
                )
            }
        if type_url == SCOPED_ROUTE:
            scopes = [scoped_route_pb2.ScopedRouteConfiguration.FromString(b) for b in held]
            return self._routes_named("scopes", (s.route_configuration_name for s in scopes))
        if type_url != LISTENER:
            return {}
        routes, scoped = set(), False
        for blob in held:
            for chain in listener_pb2.Listener.FromString(blob).filter_chains:
                for f in chain.filters:
                    hcm = hcm_pb2.HttpConnectionManager()
                    if not f.typed_config.Unpack(hcm):
                        continue
                    if hcm.HasField("scoped_routes"):
                        scoped = True
                    elif hcm.HasField("rds"):
                        routes.add(hcm.rds.route_config_name)
        out: dict[str, list[str]] = {SCOPED_ROUTE: []} if scoped else {}
        return out | self._routes_named("listeners", routes)

    def _routes_named(self, by: str, names: Iterable[str]) -> dict[str, list[str]]:
        self._route_names[by] = sorted(set(names))
        every = sorted({n for named in self._route_names.values() for n in named})
        return {ROUTE: every} if every or ROUTE in self.names else {}

    def report(self) -> dict[str, Any]:
        """Plain data, for a test in another process: versions, responses, resources."""
        return {
            "node_id": self.node_id,
            "versions": dict(self.versions),
            "responses": dict(self.responses),
            "resources": {t: dict(r) for t, r in self.resources.items()},
        }
