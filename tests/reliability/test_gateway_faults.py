"""Gateway faults, with real etcd, `modelxds serve` and Envoy beside lightweight gateways
(modelxds.bench.adsclient) that speak ADS as Envoy does: a gateway that rejects every
config is isolated (the others keep getting every update, and it is sent each new
version once: no resend loop), and one that comes back with the versions of an
earlier config, as Envoy does after the control plane restarts, gets the current one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from modelxds.bench.adsclient import GatewayClient
from modelxds.localmesh.stack import Stack, pod_instance_id, wait_until
from modelxds.modelmesh import ModelRecord
from modelxds.modelmesh.registrar import update_model
from modelxds.xds.resources import CLUSTER, LISTENER, PUSH_ORDER, SHORT_NAMES
from tests.e2e.gwclient import Client, gateway_status
from tests.e2e.load import Request, paced_load
from tests.e2e.test_strategy_equivalence import LOADED_LONG_AGO, PODS, STRATEGIES, gateway
from tests.reliability.conftest import Recorder

MOVES = 6
# after each move converged: above serve's 100 ms quiet period, so each is a push
GAP_S = 0.3
# longer than serve's debounce (at most 1 s) and a few ADS round trips: a resend loop
# would show many responses in it
SETTLE_S = 3.0
RATE = 50  # requests/s through the real Envoy meanwhile
MODEL = "moving"
ENVOY = "gateway-0"  # the Stack's Envoy node id


@asynccontextmanager
async def running_task(job: Coroutine[None, None, None]) -> AsyncIterator[None]:
    """``job`` runs until the block ends (or ends itself: a stream the server closed)."""
    task = asyncio.create_task(job)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


@asynccontextmanager
async def running(client: GatewayClient) -> AsyncIterator[GatewayClient]:
    async with running_task(client.run()):
        yield client


def fresh_channel(stack: Stack) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{stack.xds_port}")


async def current_config(stack: Stack) -> GatewayClient:
    """What a gateway connecting now is sent: a new client's config once it stops changing."""
    async with fresh_channel(stack) as channel, running(GatewayClient(channel, "fresh")) as fresh:
        await until_settled(fresh)
        return fresh


async def until_settled(client: GatewayClient, quiet: float = 1.5) -> None:
    """Until ``client`` has every type it subscribes to and no response came for ``quiet``
    seconds (serve's debounce, at most 1 s, has passed)."""

    async def settled() -> bool:
        before = client.responses.copy()
        await asyncio.sleep(quiet)
        return bool(before) and client.responses == before and set(client.names) <= set(before)

    await wait_until(settled, 30, f"{client.node_id} to settle", interval=0)


async def move(stack: Stack, model: str, to: str) -> None:
    """``model``'s only copy is now on pod ``to``: one registry write, as ModelMesh's."""

    def on(_: ModelRecord | None) -> ModelRecord:
        return ModelRecord(instance_ids={to: LOADED_LONG_AGO})

    await update_model(stack.etcd, stack.layout, model, on)


async def until_routed(client: Client, model: str, holder: str, tally: Counter[str]) -> float:
    """Seconds until 5 requests in a row for ``model`` reach ``holder``; ``tally`` counts
    the requests ("sent") and those that failed ("failed")."""
    started = time.monotonic()

    async def one() -> str:
        tally["sent"] += 1
        try:
            return await client.grpc("x", [("model", model)])
        except grpc.aio.AioRpcError:
            tally["failed"] += 1
            raise

    async def routed() -> bool:
        return {await one() for _ in range(5)} == {holder}

    await wait_until(routed, 15, f"{model} routed to {holder}")
    return time.monotonic() - started


def grpc_requests(client: Client, model: str) -> Request:
    async def request(_: int) -> str:
        await client.grpc("x", [("model", model)])
        return "gRPC"

    return request


def status_of(rows: list[dict[str, object]], node: str) -> dict[str, str]:
    """`modelxds status` of gateway ``node``: per type URL, e.g. "SYNCED 1f2e3d4c"."""
    (row,) = [r for r in rows if r["gateway"] == node]
    return {t: str(row[SHORT_NAMES[t].upper()]) for t in PUSH_ORDER}


def nacked(status: dict[str, str]) -> set[str]:
    return {t for t, cell in status.items() if cell.startswith("NACKED")}


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_nacking_gateway_is_isolated_and_not_resent_to(
    tmp_path: Path, strategy: str, fault_row: Recorder
) -> None:
    async with gateway(tmp_path, strategy) as (stack, client):
        probes = Counter[str]()
        await move(stack, MODEL, pod_instance_id(0))
        await until_routed(client, MODEL, pod_instance_id(0), probes)
        async with (
            fresh_channel(stack) as channel,
            # rejects everything, from its first config on
            running(GatewayClient(channel, "nacks-all", nack=True)) as nacks_all,
            # takes its first config, then rejects every update
            running(GatewayClient(channel, "nacks-updates")) as nacks_updates,
        ):
            await until_settled(nacks_updates)
            await until_settled(nacks_all)
            nacks_updates.nack = True
            before = {c.node_id: c.responses.copy() for c in (nacks_all, nacks_updates)}
            converge = []
            async with paced_load(grpc_requests(client, MODEL), RATE) as load:
                for k in range(1, MOVES + 1):
                    holder = pod_instance_id(k % PODS)
                    await move(stack, MODEL, holder)
                    converge.append(await until_routed(client, MODEL, holder, probes))
                    await asyncio.sleep(GAP_S)
                await asyncio.sleep(SETTLE_S)
                after = {c.node_id: c.responses.copy() for c in (nacks_all, nacks_updates)}
                await asyncio.sleep(SETTLE_S)
            sent = {c.node_id: c.responses - before[c.node_id] for c in (nacks_all, nacks_updates)}
            later = {c.node_id: c.responses - after[c.node_id] for c in (nacks_all, nacks_updates)}
            rows = await gateway_status(stack)
            fresh = await current_config(stack)
        fault_row(
            fault="a gateway NACKs every config",
            injected=f"2 ADS clients NACKing (all / updates), {MOVES} moves, {strategy}",
            requests=load.sent + probes["sent"],
            failures=load.failures.total() + probes["failed"],
            converge_s=round(max(converge), 2),
            lost="none",  # each move was routed by Envoy, or the test failed above
        )
        load.check(f"{strategy}: requests while two gateways NACK")
        assert not probes["failed"], probes
        print("responses per type during the moves:", sent, "after them:", later)
        # Envoy took every move (routed above) and is in sync with the current config
        for type_url, cell in status_of(rows, ENVOY).items():
            version = fresh.versions.get(type_url)
            if version is None:  # a type this strategy does not use
                assert cell == "NOT REQUESTED", (type_url, cell)
            else:
                assert cell == f"SYNCED {version[:8]}", (type_url, cell)
        # the NACKing gateways are reported as such ...
        assert nacked(status_of(rows, "nacks-all")) == {CLUSTER, LISTENER}
        assert sent["nacks-updates"], "the gateway NACKing updates was sent none"
        assert nacked(status_of(rows, "nacks-updates")) == set(sent["nacks-updates"])
        # ... were sent each new version at most once, the rejected ones never again
        assert all(n <= MOVES for n in sent["nacks-updates"].values()), sent
        assert not sent["nacks-all"], sent  # a move changes neither CDS nor LDS
        assert not later["nacks-updates"] and not later["nacks-all"], later


@pytest.mark.parametrize("keep_nonces", [False, True], ids=["nonces-cleared", "old-nonces"])
async def test_a_gateway_back_with_old_versions_gets_the_current_config(
    tmp_path: Path, keep_nonces: bool, fault_row: Recorder
) -> None:
    """serve restarts while placement changes: the gateway's stream breaks, and its new
    stream starts from the versions it had (Envoy clears the nonces; an old client may
    not)."""
    async with gateway(tmp_path, "scale") as (stack, client):
        probes = Counter[str]()
        await move(stack, MODEL, pod_instance_id(0))
        await until_routed(client, MODEL, pod_instance_id(0), probes)
        async with fresh_channel(stack) as channel:
            async with running(GatewayClient(channel, "returning")) as old:
                await until_settled(old)
                stack.stop_serve()
            for k in range(1, PODS):  # while serve is down
                await move(stack, f"{MODEL}-{k}", pod_instance_id(k))
            await move(stack, MODEL, pod_instance_id(1))
            await stack.start_serve()
            started = time.monotonic()  # serve is back
            resumed = GatewayClient.resumed(old, channel, keep_nonces=keep_nonces)
            assert resumed.versions == old.versions and bool(resumed.nonces) == keep_nonces
            held: list[tuple[float, dict[str, str]]] = []  # (when, versions) on each change

            async def follow() -> None:
                while True:
                    if not held or held[-1][1] != resumed.versions:
                        held.append((time.monotonic(), dict(resumed.versions)))
                    await asyncio.sleep(0.01)

            async with running(resumed), running_task(follow()):
                fresh = await current_config(stack)

                async def current() -> bool:
                    return resumed.versions == fresh.versions

                await wait_until(current, 15, "the returning gateway to get the current versions")
                converge = next(t for t, v in held if v == fresh.versions) - started
                # the real Envoy came back the same way
                for k in range(1, PODS):
                    await until_routed(client, f"{MODEL}-{k}", pod_instance_id(k), probes)
                await until_routed(client, MODEL, pod_instance_id(1), probes)
        same = resumed.resources == fresh.resources
        fault_row(
            fault="a gateway reconnects with an old version",
            injected="serve restarted, 3 moves meanwhile; stream resumed with old versions"
            + (", old nonces" if keep_nonces else ""),
            requests=probes["sent"],
            failures=probes["failed"],
            converge_s=round(converge, 2),
            lost="none" if same else "resources differ from a fresh gateway's",
        )
        assert old.versions != fresh.versions  # it did come back with an earlier config
        assert same
        assert not probes["failed"], probes
