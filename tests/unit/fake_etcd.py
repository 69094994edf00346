"""An in-process gRPC server with just enough of etcd's KV, Auth and Watch services to
drive PlacementWatcher and EtcdSession into states a real single-node etcd cannot be
put in on demand: tokens refused with a chosen error, a watch cancelled right after it
is created, permission denied on one prefix, an Authenticate that never answers.

It answers as etcd 3.5 does (status codes and detail texts from etcd's rpctypes), and
records what clients sent (metadata, tokens, times) for tests to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aetcd import rpc
from aetcd.rpc import rpc_pb2_grpc

from modelxds.placement.etcd import prefix_range_end

# One Watch stream's behaviour: given the server, the client's requests and the call
# context, yield WatchResponses; returning ends the stream with OK.
WatchScript = Callable[
    ["FakeEtcd", AsyncIterator[rpc.WatchRequest], grpc.aio.ServicerContext],
    AsyncIterator[rpc.WatchResponse],
]


@dataclass
class RangeCall:
    key: bytes
    range_end: bytes
    token: str | None
    at: float  # loop time


@dataclass
class FakeEtcd:
    users: dict[str, str] = field(default_factory=dict)  # empty: auth disabled
    kvs: dict[bytes, bytes] = field(default_factory=dict)
    revision: int = 1
    # prefixes the authenticated user may not read (etcd checks the whole range)
    denied: set[bytes] = field(default_factory=set)
    auth_delay: float = 0.0  # seconds Authenticate takes (bcrypt, or a hung member)
    # token -> the error etcd answers a call carrying it (set by refuse_tokens)
    refused: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    # one script per Watch stream, in order; the last one repeats
    watch_scripts: list[WatchScript] = field(default_factory=list)
    ranges: list[RangeCall] = field(default_factory=list)
    authentications: int = 0
    watch_metadata: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    _counter: Any = field(default_factory=lambda: itertools.count(1))
    url: str = ""
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # the server is stopping

    def refuse_tokens(self, code: grpc.StatusCode, details: str) -> None:
        """Every token issued so far is now answered with this error (as after a user or
        role change refuses every earlier JWT); tokens issued later work."""
        for token in self.issued:
            self.refused[token] = (code, details)

    # ---- Auth

    async def Authenticate(
        self, request: rpc.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> rpc.AuthenticateResponse:
        self.authentications += 1
        if self.auth_delay:
            await asyncio.sleep(self.auth_delay)
        if not self.users:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: authentication is not enabled"
            )
        if self.users.get(request.name) != request.password:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "etcdserver: authentication failed, invalid user ID or password",
            )
        token = f"token-{next(self._counter)}"
        self.issued.append(token)
        return rpc.AuthenticateResponse(header=self._header(), token=token)

    # ---- KV

    async def Range(
        self, request: rpc.RangeRequest, context: grpc.aio.ServicerContext
    ) -> rpc.RangeResponse:
        token = _metadata(context).get("token")
        self.ranges.append(
            RangeCall(request.key, request.range_end, token, asyncio.get_running_loop().time())
        )
        await self._authorize(token, context)
        if any(_overlaps(request.key, request.range_end, p) for p in self.denied):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
        keys = sorted(k for k in self.kvs if _in_range(k, request.key, request.range_end))
        more = bool(request.limit) and len(keys) > request.limit
        if request.limit:
            keys = keys[: request.limit]
        kvs = [rpc.KeyValue(key=k, value=b"" if request.keys_only else self.kvs[k]) for k in keys]
        return rpc.RangeResponse(header=self._header(), kvs=kvs, more=more, count=len(keys))

    # ---- Watch

    async def Watch(
        self, requests: AsyncIterator[rpc.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpc.WatchResponse]:
        self.watch_metadata.append(tuple(_metadata(context).items()))
        index = len(self.watch_metadata) - 1
        script = self.watch_scripts[min(index, len(self.watch_scripts) - 1)]
        async for resp in script(self, requests, context):
            yield resp

    # ---- helpers for scripts

    def header(self) -> rpc.ResponseHeader:
        return self._header()

    async def _authorize(self, token: str | None, context: grpc.aio.ServicerContext) -> None:
        if not self.users:
            return
        if token is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty")
        if token in self.refused:
            code, details = self.refused[token]
            await context.abort(code, details)
        if token not in self.issued:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")

    def _header(self) -> rpc.ResponseHeader:
        return rpc.ResponseHeader(cluster_id=1, member_id=1, revision=self.revision, raft_term=2)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _in_range(key: bytes, start: bytes, end: bytes) -> bool:
    if not end:
        return key == start
    return start <= key and (end == b"\0" or key < end)


def _overlaps(start: bytes, end: bytes, prefix: bytes) -> bool:
    """Whether the range [start, end) can hold a key under ``prefix``."""
    if not end:
        return start.startswith(prefix)
    # [start, end) meets [prefix, prefix_end); an end of "\0" means "every key after"
    return start < prefix_range_end(prefix) and (end == b"\0" or prefix < end)


# ---- watch scripts --------------------------------------------------------------------


async def _created(requests: AsyncIterator[rpc.WatchRequest]) -> AsyncIterator[int]:
    """The watch ids of the client's create requests, as they arrive."""
    async for req in requests:
        if req.HasField("create_request"):
            yield req.create_request.watch_id


def cancel_after_create(reason: str = "etcdserver: permission denied") -> WatchScript:
    """etcd accepts each watch, then cancels the first at once (a refused range)."""

    async def script(
        fake: FakeEtcd, requests: AsyncIterator[rpc.WatchRequest], _: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpc.WatchResponse]:
        async for watch_id in _created(requests):
            yield rpc.WatchResponse(header=fake.header(), watch_id=watch_id, created=True)
            yield rpc.WatchResponse(
                header=fake.header(), watch_id=watch_id, canceled=True, cancel_reason=reason
            )

    return script


def progress_then_cancel(after: float = 0.0, progress: bool = True) -> WatchScript:
    """Create every watch, then (after ``after`` seconds) send a progress notification
    if ``progress``, then cancel: a watch that worked for a while."""

    async def script(
        fake: FakeEtcd, requests: AsyncIterator[rpc.WatchRequest], _: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpc.WatchResponse]:
        async for watch_id in _created(requests):
            yield rpc.WatchResponse(header=fake.header(), watch_id=watch_id, created=True)
            break
        await asyncio.sleep(after)
        if progress:
            yield rpc.WatchResponse(header=fake.header(), watch_id=1)
        yield rpc.WatchResponse(
            header=fake.header(), watch_id=1, canceled=True, cancel_reason="test: cancelled"
        )

    return script


def quiet() -> WatchScript:
    """Create every watch and then say nothing until the client leaves."""

    async def script(
        fake: FakeEtcd, requests: AsyncIterator[rpc.WatchRequest], _: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpc.WatchResponse]:
        async for watch_id in _created(requests):
            yield rpc.WatchResponse(header=fake.header(), watch_id=watch_id, created=True)
            if watch_id == 1:
                break
        # end with the server rather than be cancelled by it (which gRPC logs as an error)
        await fake.closing.wait()

    return script


@contextlib.asynccontextmanager
async def serving(fake: FakeEtcd) -> AsyncIterator[FakeEtcd]:
    """Serve ``fake`` on a free loopback port; ``fake.url`` is its http:// URL."""
    if not fake.watch_scripts:
        fake.watch_scripts.append(quiet())
    server = grpc.aio.server()
    # the generated servicers answer UNIMPLEMENTED; only the three calls used are faked
    kv, watch, auth = (
        rpc_pb2_grpc.KVServicer(),
        rpc_pb2_grpc.WatchServicer(),
        rpc_pb2_grpc.AuthServicer(),
    )
    kv.Range, watch.Watch, auth.Authenticate = fake.Range, fake.Watch, fake.Authenticate
    rpc_pb2_grpc.add_KVServicer_to_server(kv, server)
    rpc_pb2_grpc.add_WatchServicer_to_server(watch, server)
    rpc_pb2_grpc.add_AuthServicer_to_server(auth, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        fake.closing.set()
        await server.stop(grace=1.0)


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"never saw {what}")
        await asyncio.sleep(0.01)
