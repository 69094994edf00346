"""Pod faults with real processes: a mesh pod (a process of its own that keeps its own
etcd lease) SIGKILLed while serving, and one SIGSTOPped (up, not answering), under a
paced gRPC and REST load through a real Envoy programmed by `modelxds serve`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from modelxds.epp.exchange import DESTINATION_HEADER
from modelxds.localmesh import processes
from modelxds.localmesh.sample import DELAY_HEADER
from modelxds.localmesh.stack import (
    EppGateway,
    Stack,
    pod_host,
    pod_instance_id,
    seed_policy,
    wait_until,
)
from modelxds.modelmesh.registrar import PodRegistration
from tests.e2e.gwclient import Client, serving
from tests.e2e.load import Request, paced_load
from tests.e2e.test_churn import MODELS, REST_EVERY, add_copies, mixed_requests
from tests.e2e.test_strategy_equivalence import LOADING_FOR_MS, PODS, STRATEGIES
from tests.reliability import harness
from tests.reliability.conftest import Recorder

pytestmark = pytest.mark.e2e

RATE = 100  # requests/s through the gateway, on schedule (open loop)
WORKERS = 8
LEASE_TTL = 5  # s: the pods' etcd leases, short so a dead pod leaves soon
VICTIM = 0  # pod 0 holds m0 alone and m3, m5 with another pod (test_churn.HOLDERS)
SLOW_MS = 1500  # how late the pods answer the requests a fault should find in flight
IN_FLIGHT = 4


@asynccontextmanager
async def pod_stack(
    tmp_path: Path,
    strategy: str,
    policy: Callable[[str], str] = lambda seed: seed,
    lease_ttl: int = LEASE_TTL,
) -> AsyncIterator[tuple[Stack, Client]]:
    """The stack with each pod a process of its own, holding test_churn's models;
    ``policy`` makes the policy from the seed's."""
    gateway_port, pod_port = processes.free_port(), processes.free_port(pod_host(0))
    stack = Stack(
        tmp_path / strategy,
        pods=PODS,
        runtime="sample-process",
        lease_ttl=lease_ttl,
        pod_port=pod_port,
        gateway_port=gateway_port,
        policy_text=policy(seed_policy(gateway_port, pod_port)),
        serve_args=("--strategy", strategy, "--loaded-after-ms", str(LOADING_FOR_MS)),
    )
    async with serving(stack) as client:
        for i in range(PODS):
            # the copies are registry records, not leased: written for the pod from here
            await add_copies(PodRegistration(stack.etcd, stack.layout, pod_instance_id(i), ""), i)
        diff = await harness.until_exact(stack, 30, loaded_after_ms=LOADING_FOR_MS)
        assert not diff, diff.describe()
        yield stack, client


async def until_gone(stack: Stack, instance_id: str, timeout: float) -> None:
    """Until the gateway names ``instance_id`` nowhere (no model, not a fallback pod)."""
    deadline = time.monotonic() + timeout
    while any(e[3] == instance_id for e in await asyncio.to_thread(_endpoints, stack)):
        assert time.monotonic() < deadline, f"{instance_id} still at the gateway"
        await asyncio.sleep(0.05)


def _endpoints(stack: Stack) -> set[harness.Endpoint]:
    return harness.gateway_endpoints(stack.admin)


def in_flight(
    client: Client, model: str, count: int, rest_client: Client | None = None
) -> list[asyncio.Task[str]]:
    """``count`` requests for ``model``, half gRPC and half REST (to ``rest_client``'s
    gateway, if given), that its pod answers only SLOW_MS late: still in flight at the
    pod when the test breaks it."""
    delay = str(SLOW_MS)
    rest = rest_client or client
    return [
        asyncio.create_task(
            rest.rest(model, {f"grpc-metadata-{DELAY_HEADER}": delay})
            if k % 2
            else client.grpc("x", [("model", model), (DELAY_HEADER, delay)])
        )
        for k in range(count)
    ]


def envoy_total(stack: Stack, stat: str) -> int:
    """``cluster.<any>.<stat>`` summed over the gateway's clusters."""
    text = processes.admin_get(stack.admin, f"/stats?filter={stat}")
    pairs = (line.partition(": ") for line in text.splitlines())
    return sum(
        int(value)
        for name, _, value in pairs
        if name.startswith("cluster.") and name.endswith(f".{stat}")
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_pod_killed_while_serving_fails_no_request(
    tmp_path: Path, strategy: str, fault_row: Recorder
) -> None:
    """A pod SIGKILLed under load, with requests in flight at it: those lose their
    connection (retried on ``reset``), and the ones routed to it until it leaves find its
    address refusing (``connect-failure``); each is retried on another holder, or for m0,
    which it held alone, on another pod as ANY_ENDPOINT does. Its lease is not renewed,
    so it leaves the gateway within the lease TTL of the kill, + 1 s for etcd's expiry
    sweep (every 0.5 s), serve and Envoy."""
    async with pod_stack(tmp_path, strategy) as (stack, client):
        victim = pod_instance_id(VICTIM)
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            await asyncio.sleep(1)
            cut = in_flight(client, "m0", IN_FLIGHT)
            await asyncio.sleep(SLOW_MS / 3000)  # at the pod, a while from being answered
            stack.nodes[victim].kill()
            killed = time.monotonic()
            await until_gone(stack, victim, LEASE_TTL + 10)
            left = time.monotonic() - killed
            diff = await harness.until_exact(stack, 30, loaded_after_ms=LOADING_FOR_MS)
            converge = time.monotonic() - killed
            await asyncio.sleep(1)  # and requests after it left
        answers = await asyncio.gather(*cut, return_exceptions=True)
        failed = [a for a in answers if isinstance(a, BaseException)]
        fault_row(
            fault=f"mesh pod SIGKILLed while serving ({strategy})",
            injected=f"SIGKILL the pod process, {IN_FLIGHT} requests in flight at it; "
            f"its {LEASE_TTL} s lease runs out ({left:.1f} s to leave the gateway)",
            requests=load.sent + len(cut),
            failures=load.failures.total() + len(failed),
            converge_s=round(converge, 2),
            lost=diff.describe(),
        )
        print(f"{strategy}: {victim} left the gateway {left:.2f}s after the kill")
        load.check(f"{strategy}: a pod killed")
        assert not failed, failed
        assert victim not in answers  # each answered by another pod, after the kill
        # the kill did cut requests in flight (Envoy saw their connection close)
        assert envoy_total(stack, "upstream_cx_destroy_remote_with_active_rq") >= 1
        assert not diff, diff.describe()
        assert left <= LEASE_TTL + 1, left


# outlier detection that ejects a pod on its first timed-out try, and tries that time out
PER_TRY_MS = 500
BASE_EJECTION_S = 5
INTERVAL_S = 1
STOPPED_S = 3  # shorter than the ejection: the pod is back once its ejection is over
STOP_LEASE_TTL = 10  # the stopped pod renews its lease again in time: it stays placed


def ejecting(seed: str) -> str:
    """The seed's policy with outlier detection and retries with a per-try timeout."""
    return seed.replace(
        "  trafficPolicy:\n",
        "  trafficPolicy:\n"
        "    outlierDetection:\n"
        "      consecutiveGatewayErrors: 1\n"
        f"      interval: {INTERVAL_S}s\n"
        f"      baseEjectionTime: {BASE_EJECTION_S}s\n"
        "      maxEjectionPercent: 100\n",
    ).replace(
        "    name: default\n",
        "    name: default\n"
        "    retries:\n"
        "      attempts: 3\n"
        f"      perTryTimeout: {PER_TRY_MS}ms\n"
        "      retryOn: gateway-error,connect-failure,refused-stream,reset\n",
    )


def answered_by(client: Client, last: dict[str, float]) -> Request:
    """test_churn's mixed requests, noting when each pod last answered one."""

    async def request(i: int) -> str:
        model, rest = MODELS[i // REST_EVERY % len(MODELS)], i % REST_EVERY == 0
        pod = await (client.rest(model) if rest else client.grpc("x", [("model", model)]))
        last[pod] = time.monotonic()
        return "REST" if rest else "gRPC"

    return request


async def ejected(stack: Stack) -> bool:
    """Whether the gateway has a pod ejected (Envoy's outlier detection), in any cluster."""
    gauge = "outlier_detection.ejections_active"
    return await asyncio.to_thread(envoy_total, stack, gauge) >= 1


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_pod_up_but_not_answering_is_ejected_and_fails_no_request(
    tmp_path: Path, strategy: str, fault_row: Recorder
) -> None:
    """A pod SIGSTOPped under load: its sockets still accept, nothing answers. Each try
    sent to it times out after perTryTimeout, a gateway error, which ejects it at once
    (consecutiveGatewayErrors 1), and is retried elsewhere: another holder, or for m0,
    which it holds alone, any pod (subset: the route's failover list, its one pod
    ejected; scale: its cluster's other pods). Stopped for less than its lease TTL it
    stays placed; after SIGCONT it serves again once its ejection is over."""
    async with pod_stack(tmp_path, strategy, ejecting, STOP_LEASE_TTL) as (stack, client):
        victim = pod_instance_id(VICTIM)
        last: dict[str, float] = {}
        async with paced_load(answered_by(client, last), RATE, WORKERS) as load:
            await asyncio.sleep(1)
            with harness.stopped(stack.nodes[victim]):
                stopped = time.monotonic()
                await wait_until(
                    lambda: ejected(stack), STOPPED_S, "the stopped pod to be ejected", 0.02
                )
                ejected_s = time.monotonic() - stopped
                await asyncio.sleep(stopped + STOPPED_S - time.monotonic())
            resumed = time.monotonic()

            async def serving() -> bool:
                return last.get(victim, 0) > resumed

            await wait_until(serving, BASE_EJECTION_S + 10, "the pod to serve again", 0.02)
            back_s = time.monotonic() - resumed
            await asyncio.sleep(1)
        diff = await harness.compare(stack, loaded_after_ms=LOADING_FOR_MS)
        fault_row(
            fault=f"mesh pod up but not answering ({strategy})",
            injected=f"SIGSTOP the pod process {STOPPED_S} s; outlierDetection "
            f"consecutiveGatewayErrors 1, baseEjectionTime {BASE_EJECTION_S}s, retries with "
            f"perTryTimeout {PER_TRY_MS}ms: ejected {ejected_s:.2f} s after the stop, "
            f"served again {back_s:.2f} s after SIGCONT",
            requests=load.sent,
            failures=load.failures.total(),
            converge_s=None,
            lost=diff.describe(),
        )
        print(
            f"{strategy}: ejected {ejected_s:.2f}s after SIGSTOP, back {back_s:.2f}s after SIGCONT"
        )
        load.check(f"{strategy}: a pod stopped")
        assert not diff, diff.describe()  # it stayed placed, and the gateway says so


async def picks(epp_port: int, model: str) -> list[str]:
    """The ``ip:port`` list the picker at ``epp_port`` answers a REST request for
    ``model`` with, asked over ext_proc as a gateway asks it."""
    headers = {":method": "POST", ":path": f"/v2/models/{model}/infer", ":scheme": "http"}
    request = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()
                ]
            )
        )
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp_port}") as channel:
        call = ep_grpc.ExternalProcessorStub(channel).Process(iter([request]), timeout=5)
        async for response in call:
            mutation = response.request_headers.response.header_mutation
            for h in mutation.set_headers:
                if h.header.key == DESTINATION_HEADER:
                    value: bytes = h.header.raw_value
                    return value.decode().split(",")
            return []
    return []


async def picks_against_etcd(stack: Stack, gw: EppGateway, port: int) -> str:
    """What the picker at ``gw`` picks for each model against a fresh read of etcd: its
    holders first, then every other live pod (ANY_ENDPOINT), on ``port``. "none", or
    what differs."""
    report = await harness.fresh_read(stack, loaded_after_ms=LOADING_FOR_MS)
    (mesh,) = report["namespaces"].values()
    address = {iid: f"{inst['address']}:{port}" for iid, inst in mesh["instances"].items()}
    wrong = []
    for model in MODELS:
        holders = {address[i] for i in mesh["models"][model]["loaded"]}
        got = await picks(gw.epp_port, model)
        if set(got[: len(holders)]) != holders or set(got) != set(address.values()):
            wrong.append(f"{model}: {','.join(got)} (holders {sorted(holders)})")
    return "; ".join(wrong) or "none"


def picker_requests(grpc_client: Client, rest_client: Client) -> Request:
    """test_churn's mixed requests, gRPC to one picker's gateway and REST to the other's."""

    async def request(i: int) -> str:
        model, rest = MODELS[i // REST_EVERY % len(MODELS)], i % REST_EVERY == 0
        if rest:
            await rest_client.rest(model)
            return "REST"
        await grpc_client.grpc("x", [("model", model)])
        return "gRPC"

    return request


async def test_the_picker_drops_a_killed_pod_and_fails_no_request(
    tmp_path: Path, fault_row: Recorder
) -> None:
    """Issue 11: gateways asking `modelxds epp` (ext_proc + override_host), one for gRPC
    and one for REST, under load; a pod is SIGKILLed with requests in flight at it. The
    picker lists a model's holders first, then the fallback pods, and the gateway's
    retries walk that list: the cut requests and those picked for the dead pod until it
    leaves go on to the next address. It leaves the picks within the lease TTL (+ 1 s)."""
    stack = Stack(
        tmp_path / "epp",
        pods=PODS,
        runtime="sample-process",
        lease_ttl=LEASE_TTL,
        gateway_kind="epp",
    )
    await stack.start()
    try:
        rest_gw = await stack.add_epp_gateway(stack.rest_port, app_protocol="http")
        gws = stack.epp_gateways  # gRPC's, then REST's
        pickers = [gw.epp_port for gw in gws]
        grpc_client, rest_client = Client(stack), Client(stack, gateway=rest_gw.gateway)
        victim = pod_instance_id(VICTIM)
        dead = {f"{pod_host(VICTIM)}:{port}" for port in (stack.pod_port, stack.rest_port)}
        try:
            for i in range(PODS):
                await add_copies(
                    PodRegistration(stack.etcd, stack.layout, pod_instance_id(i), ""), i
                )

            async def placed() -> bool:
                return all([(await picks(p, "m0"))[0] in dead for p in pickers])

            await wait_until(placed, 30, "the pickers to pick m0's holder")
            request = picker_requests(grpc_client, rest_client)
            async with paced_load(request, RATE, WORKERS) as load:
                await asyncio.sleep(1)
                cut = in_flight(grpc_client, "m0", IN_FLIGHT, rest_client)
                await asyncio.sleep(SLOW_MS / 3000)
                stack.nodes[victim].kill()
                killed = time.monotonic()

                async def gone() -> bool:
                    named = {a for p in pickers for m in MODELS for a in await picks(p, m)}
                    return not named & dead

                await wait_until(gone, LEASE_TTL + 10, f"{victim} to leave the picks")
                left = time.monotonic() - killed
                await asyncio.sleep(1)  # and requests after it left
            answers = await asyncio.gather(*cut, return_exceptions=True)
            ports = (stack.pod_port, stack.rest_port)
            lost = [
                await picks_against_etcd(stack, gw, port)
                for gw, port in zip(gws, ports, strict=True)
            ]
        finally:
            await grpc_client.close()
            await rest_client.close()
        failed = [a for a in answers if isinstance(a, BaseException)]
        fault_row(
            fault="mesh pod SIGKILLed while serving (endpoint picker)",
            injected=f"SIGKILL the pod process, {IN_FLIGHT} requests in flight at it; its "
            f"{LEASE_TTL} s lease runs out ({left:.1f} s to leave the picks)",
            requests=load.sent + len(cut),
            failures=load.failures.total() + len(failed),
            converge_s=round(left, 2),
            lost="none" if lost == ["none", "none"] else "; ".join(lost),
        )
        print(f"epp: {victim} left the picks {left:.2f}s after the kill")
        load.check("epp: a pod killed")
        assert not failed, failed
        assert victim not in answers
        assert lost == ["none", "none"], lost
        assert left <= LEASE_TTL + 1, left
    finally:
        await stack.stop()
