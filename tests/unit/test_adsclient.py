"""The lightweight gateway (modelxds.bench.adsclient) against the real ADS server on
127.0.0.1, serving a real translated config of both strategies: it ends up holding
exactly what the server has, NACKs as Envoy does, and a resumed stream catches up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
import pytest
from google.protobuf import any_pb2

from modelxds.bench.adsclient import NACK_MESSAGE, GatewayClient
from modelxds.bench.common import ads_server
from modelxds.bench.scale import World
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.resources import PUSH_ORDER, SCOPED_ROUTE
from modelxds.xds.server import AdsServer

STRATEGIES = ["subset", "scale"]


def served(cache: SnapshotCache) -> dict[str, dict[str, bytes]]:
    """Every type the config has, as a gateway holds it: message bytes by name (a type
    without resources, SRDS under subset, is one no gateway asks for)."""
    return {
        t: {n: any_pb2.Any.FromString(blob).value for n, blob in cache.get(t).resources.items()}
        for t in PUSH_ORDER
        if cache.get(t).resources
    }


async def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def in_sync(client: GatewayClient, cache: SnapshotCache) -> bool:
    return client.versions == {t: cache.get(t).version for t in served(cache)}


@asynccontextmanager
async def serving(strategy: str) -> AsyncIterator[tuple[World, SnapshotCache, AdsServer, str]]:
    world = World(40, 4, strategy, 8008)
    cache, ads, server, port = await ads_server()
    cache.set(world.resources())
    try:
        yield world, cache, ads, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@asynccontextmanager
async def running(client: GatewayClient) -> AsyncIterator[GatewayClient]:
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_holds_what_the_server_serves_after_each_push(strategy: str) -> None:
    async with (
        serving(strategy) as (world, cache, _, address),
        grpc.aio.insecure_channel(address) as channel,
        running(GatewayClient(channel, "gw")) as client,
    ):
        assert (SCOPED_ROUTE in served(cache)) == (strategy == "scale")
        for _ in range(3):
            await eventually(lambda: in_sync(client, cache))
            assert client.resources == served(cache)
            world.move_one()
            assert cache.set(world.resources())


async def test_a_nacking_gateway_keeps_its_version_and_gets_each_new_one_once() -> None:
    async with (
        serving("subset") as (world, cache, ads, address),
        grpc.aio.insecure_channel(address) as channel,
        running(GatewayClient(channel, "gw")) as client,
    ):
        await eventually(lambda: in_sync(client, cache))
        had, versions, before = served(cache), dict(client.versions), client.responses.copy()
        client.nack = True
        world.move_one()
        changed = cache.set(world.resources())
        assert changed
        (stream,) = ads.streams.values()
        await eventually(
            lambda: all(stream.types[t].nacked_version == cache.get(t).version for t in changed)
        )
        await asyncio.sleep(0.3)  # nothing more comes: the rejected version is not resent
        assert client.responses - before == dict.fromkeys(changed, 1)
        assert client.versions == versions and client.resources == had
        assert stream.types[changed[0]].nack_message == NACK_MESSAGE


@pytest.mark.parametrize("keep_nonces", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_resumed_stream_gets_the_current_config(strategy: str, keep_nonces: bool) -> None:
    async with (
        serving(strategy) as (world, cache, _, address),
        grpc.aio.insecure_channel(address) as channel,
    ):
        async with running(GatewayClient(channel, "gw")) as old:
            await eventually(lambda: in_sync(old, cache))
        for _ in range(3):
            world.move_one()
            cache.set(world.resources())
        assert not in_sync(old, cache)
        async with running(GatewayClient.resumed(old, channel, keep_nonces=keep_nonces)) as new:
            assert new.versions == old.versions and bool(new.nonces) == keep_nonces
            await eventually(lambda: in_sync(new, cache))
            assert new.resources == served(cache)
