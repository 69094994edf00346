"""State-of-the-world Aggregated Discovery Service over grpc.aio.

The server never computes config: it sends what the SnapshotCache holds. Per
stream and per type it remembers what it sent (version, nonce, names) and what
the gateway said about it. A NACK (a request carrying ``error_detail``) is
recorded and the rejected version is not sent again; the next new version is.

A stream is one node: a request that names another is refused. With client certificates
(serve --xds-client-ca) the node id must also be one the certificate allows
(modelxds.xds.identity), or the stream ends with PERMISSION_DENIED before anything is
sent.

Wildcard types (CDS, LDS, SRDS) go whole: a resource left out is removed. For the
named types (EDS, RDS) a gateway keeps what a response leaves out, so a new version
carries only the resources that changed since this stream last had them: one route
table of 257 when a model moves, under the scale strategy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from modelxds import metrics
from modelxds.xds.cache import SnapshotCache, TypeSnapshot
from modelxds.xds.convergence import Convergence
from modelxds.xds.identity import Identity
from modelxds.xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    SCOPED_ROUTE,
    SHORT_NAMES,
    WILDCARD_TYPES,
)

log = logging.getLogger(__name__)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


_DEPENDENT = {CLUSTER: (ENDPOINT,), LISTENER: (SCOPED_ROUTE, ROUTE), SCOPED_ROUTE: (ROUTE,)}


@dataclass
class TypeState:
    """One resource type on one stream."""

    names: frozenset[str] | None = None  # None: wildcard (every resource)
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    nonce: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    nack_message: str = ""
    responses: int = 0
    # wall clock: when the oldest version sent and not yet ACKed was published
    behind_since: float | None = None
    # named types (EDS, RDS): what the gateway was last sent of each name it asked for;
    # a gateway keeps what a response leaves out, so only changed resources go again
    have: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Stream:
    id: int
    peer: str
    node_id: str = ""
    cluster: str = ""
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=dict)
    # a turn to send large responses (see LARGE_RESPONSE): the types whose large response
    # the gateway has yet to answer, and what ends the turn; one turn a stream, so a
    # stream never waits for a second turn while holding one
    unanswered: set[str] = field(default_factory=set)
    end_turn: Callable[[], None] | None = None


# Defaults of the limits: far above a deployment's gateways and a gateway's subscription
# (the scale strategy's RDS is 514 names a listener), low enough that a misbehaving
# client cannot make the server hold unbounded state.
MAX_STREAMS = 1000
MAX_NAMES = 100_000
# Each stream's response is a copy of its own (the nonce differs), which gRPC queues
# whole however slowly the gateway reads: 100 gateways syncing a 20 MB config at once
# held 2.2 GB. Responses this large (a gateway's first config, a re-sync) take turns,
# a turn lasting until the gateway answers (ACK or NACK); a push's changes are small and
# never wait. A gateway slower than LARGE_SEND_WAIT_S loses its turn, so one that stopped
# reading holds the others back only so long (keepalive then ends its stream and frees
# what gRPC queued for it).
LARGE_RESPONSE = 1 << 20
MAX_LARGE_SENDS = 16
LARGE_SEND_WAIT_S = 10.0


Refusal = tuple[grpc.StatusCode, str]


class AdsServer:
    """Serves the cache to up to ``max_streams`` gateways at once; with
    ``require_identity``, each only under a node id its client certificate allows."""

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        max_streams: int = MAX_STREAMS,
        max_names: int = MAX_NAMES,
        require_identity: bool = False,
    ) -> None:
        self.cache = cache
        self.max_streams = max_streams
        self.max_names = max_names
        self.require_identity = require_identity
        self.streams: dict[int, Stream] = {}
        self.convergence = Convergence()
        # computed when scraped; the last server made in a process is the one reported
        metrics.XDS_BEHIND_STREAMS.set_function(lambda: len(self.behind_seconds()))
        metrics.XDS_MAX_BEHIND_SECONDS.set_function(lambda: max(self.behind_seconds(), default=0))
        self._large_sends = asyncio.Semaphore(MAX_LARGE_SENDS)
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_Response.take,  # the cache holds serialized responses
        )
        return grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            {"StreamAggregatedResources": method},
        )

    async def _stream(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[_Response]:
        if len(self.streams) >= self.max_streams:
            log.warning(
                "refused a gateway from %s: %d streams open", context.peer(), self.max_streams
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this modelxds serves at most {self.max_streams} gateways at once "
                "(serve --max-gateways); try another replica",
            )
        stream = Stream(next(self._ids), context.peer())
        identity = Identity.of_peer(context.auth_context()) if self.require_identity else None
        self.streams[stream.id] = stream
        wake = asyncio.Event()
        closed = False
        refusal: Refusal | None = None

        async def read() -> None:
            nonlocal closed, refusal
            try:
                async for req in requests:
                    refusal = self._refusal(stream, req, identity)
                    if refusal is not None:
                        break
                    self._on_request(stream, req)
                    wake.set()
            finally:
                closed = True
                wake.set()

        reader = asyncio.create_task(read())
        self.cache.subscribe(wake)
        metrics.CONNECTED_GATEWAYS.inc()
        try:
            while True:
                await wake.wait()
                wake.clear()
                if refusal is not None:
                    code, why = refusal
                    log.warning(
                        "refused gateway %s (%s): %s", stream.node_id or "-", stream.peer, why
                    )
                    await context.abort(code, why)
                if closed:
                    break
                # one version of every type per cycle: a push landing while this cycle
                # yields must not send RDS that names clusters its CDS did not have
                snapshot = self.cache.snapshot()
                if self.convergence.is_new(snapshot):
                    self.convergence.published(
                        snapshot, {i: s.types.keys() for i, s in self.streams.items()}
                    )
                for type_url in PUSH_ORDER:
                    snap = snapshot[type_url]
                    names = self._next_response(stream, type_url, snap)
                    if names is False:
                        continue
                    nonce = stream.types[type_url].nonce
                    if _size(snap, names) < LARGE_RESPONSE:
                        yield _send(snap, names, nonce)
                        continue
                    await self._take_turn(stream, type_url)
                    yield _send(snap, names, nonce)
        finally:
            _end_turn(stream)
            self.convergence.disconnected(stream.id)
            for type_url, state in stream.types.items():
                if state.nacked_version:
                    metrics.XDS_NACKED_STREAMS.labels(SHORT_NAMES[type_url]).dec()
            self.cache.unsubscribe(wake)
            reader.cancel()
            del self.streams[stream.id]
            metrics.CONNECTED_GATEWAYS.dec()
            log.info("gateway %s (%s) disconnected", stream.node_id, stream.peer)

    def behind_seconds(self) -> list[float]:
        """For each stream behind the current config, for how long it has been."""
        now, snapshot = time.time(), self.cache.snapshot()
        behind = []
        for stream in self.streams.values():
            since = [
                t
                for type_url, state in stream.types.items()
                if (t := behind_since(state, snapshot[type_url])) is not None
            ]
            if since:
                behind.append(max(0.0, now - min(since)))
        return behind

    def _refusal(
        self, stream: Stream, req: discovery_pb2.DiscoveryRequest, identity: Identity | None
    ) -> Refusal | None:
        """Why ``req`` ends its stream: more names than allowed, or a node the stream may
        not be (``identity``: the client certificate's, when identities are required)."""
        if len(req.resource_names) > self.max_names:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"{SHORT_NAMES.get(req.type_url, req.type_url)} request names "
                f"{len(req.resource_names)} resources, over the limit of "
                f"{self.max_names} (serve --max-names)"
            )
        node_id = req.node.id
        if stream.node_id:
            if node_id and node_id != stream.node_id:
                metrics.XDS_IDENTITY_REFUSALS.labels("node_id_changed").inc()
                return grpc.StatusCode.PERMISSION_DENIED, (
                    f"this stream is node {stream.node_id!r}; a request named node {node_id!r}"
                )
            return None
        if identity is None:
            return None
        if not node_id:
            metrics.XDS_IDENTITY_REFUSALS.labels("no_node_id").inc()
            return grpc.StatusCode.PERMISSION_DENIED, (
                "the first request names no node id; it must be one of the client "
                f"certificate's identities: {identity}"
            )
        if not identity.allows(node_id):
            metrics.XDS_IDENTITY_REFUSALS.labels("not_in_certificate").inc()
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"node id {node_id!r} is not one of the client certificate's identities: {identity}"
            )
        return None

    def _on_request(self, stream: Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        if req.node.id and not stream.node_id:
            stream.node_id, stream.cluster = req.node.id, req.node.cluster
            log.info("gateway %s connected from %s", stream.node_id, stream.peer)
        type_url = req.type_url
        if type_url not in PUSH_ORDER:
            log.warning("gateway %s asked for unsupported type %s", stream.node_id, type_url)
            return
        state = stream.types.setdefault(type_url, TypeState())
        short = SHORT_NAMES[type_url]
        if req.response_nonce and req.response_nonce != state.nonce:
            return  # answers a response we have since superseded; the newer one is pending
        if req.response_nonce:
            _answered(stream, type_url)
        if req.HasField("error_detail"):
            if state.nacked_version != state.sent_version:
                log.error(
                    "gateway %s rejected %s version %s: %s",
                    stream.node_id,
                    short,
                    state.sent_version,
                    req.error_detail.message,
                )
                metrics.XDS_NACKS.labels(short).inc()
                self.convergence.nacked(stream.id, type_url, state.sent_version or "")
            if not state.nacked_version and state.sent_version:
                metrics.XDS_NACKED_STREAMS.labels(short).inc()
            state.nacked_version = state.sent_version or ""
            state.nack_message = req.error_detail.message
            state.have = {}  # part of it may not have been taken: next time, send everything
        elif req.response_nonce:
            state.acked_version = req.version_info
            if state.nacked_version:
                metrics.XDS_NACKED_STREAMS.labels(short).dec()
            state.nacked_version = ""  # a later rejection, even of the same version, is news
            if state.acked_version == state.sent_version:
                state.behind_since = None
            metrics.XDS_ACKS.labels(short).inc()
            self.convergence.acked(stream.id, type_url, req.version_info)
        names = list(req.resource_names)
        state.names = None if SnapshotCache.is_wildcard(type_url, names) else frozenset(names)

    async def _take_turn(self, stream: Stream, type_url: str) -> None:
        """Wait for a turn to send large responses, unless the stream holds one; it ends
        when the gateway has answered them all, or LARGE_SEND_WAIT_S after it began."""
        if stream.end_turn is None:
            await self._large_sends.acquire()
            timer = asyncio.get_running_loop().call_later(LARGE_SEND_WAIT_S, _end_turn, stream)

            def end() -> None:
                timer.cancel()
                self._large_sends.release()

            stream.end_turn = end
        stream.unanswered.add(type_url)

    def _next_response(
        self, stream: Stream, type_url: str, snap: TypeSnapshot
    ) -> frozenset[str] | Literal[False] | None:
        """The names the next response for ``type_url`` carries (None: every resource),
        with the stream's state advanced to it and its nonce set; False: nothing to send."""
        state = stream.types.get(type_url)
        if state is None:
            return False  # the gateway has not asked for this type (yet)
        if not snap.version:
            return False  # nothing translated yet: a gateway must not see an empty config
        if snap.version == state.sent_version and state.names == state.sent_names:
            return False  # up to date, or this exact version was rejected
        if state.behind_since is None:
            # a version it already runs, sent again for new names, is behind from now
            fresh = snap.version != state.acked_version
            state.behind_since = snap.published_at if fresh else time.time()
        state.sent_version, state.sent_names = snap.version, state.names
        # A replaced cluster (listener) warms until it gets endpoints (routes), and a
        # gateway re-asking for unchanged names would get no answer: send them again.
        for dependent in _DEPENDENT.get(type_url, ()):
            if dependent in stream.types:
                stream.types[dependent].sent_version = None
                stream.types[dependent].have = {}
        names = state.names
        if names is not None and type_url not in WILDCARD_TYPES:
            # may be none at all: the response still carries the version to ACK
            names = frozenset(n for n in names if _changed(state.have.get(n), snap, n))
            state.have = {n: snap.resources[n] for n in state.names or () if n in snap.resources}
        _answered(stream, type_url)  # the response this one supersedes needs no answer now
        state.nonce = str(next(self._nonces))
        state.responses += 1
        return names


class _Response:
    """A response on its way to gRPC, which keeps the last message a stream sent until the
    stream sends the next: handing over the bytes, and keeping none, stops an idle
    stream from pinning a whole config (100 gateways synced at 20,000 models held 2 GB)."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    def take(self) -> bytes:
        body, self.body = self.body, b""
        return body


def behind_since(state: TypeState, current: TypeSnapshot) -> float | None:
    """When (wall clock) a stream fell behind the current config of a type: the
    publication of the oldest version it has not ACKed; None: in sync."""
    if not current.version or state.acked_version == current.version:
        return None
    return state.behind_since or current.published_at


def _send(snap: TypeSnapshot, names: frozenset[str] | None, nonce: str) -> _Response:
    body = snap.response(names, nonce)
    short = SHORT_NAMES[snap.type_url]
    metrics.XDS_RESPONSES.labels(short).inc()
    metrics.XDS_SENT_BYTES.labels(short).inc(len(body))
    return _Response(body)


def _answered(stream: Stream, type_url: str) -> None:
    stream.unanswered.discard(type_url)
    if not stream.unanswered:
        _end_turn(stream)


def _end_turn(stream: Stream) -> None:
    end, stream.end_turn = stream.end_turn, None
    stream.unanswered.clear()
    if end is not None:
        end()


def _size(snap: TypeSnapshot, names: frozenset[str] | None) -> int:
    if names is None:
        return snap.size
    return sum(len(snap.resources[n]) for n in names if n in snap.resources)


def _changed(had: bytes | None, snap: TypeSnapshot, name: str) -> bool:
    now = snap.resources.get(name)
    # the cache hands out the same bytes object for an unchanged resource
    return now is not None and had is not now and had != now
