"""Under a steady paced load through a real Envoy, gRPC and KServe V2 REST, for both
strategies: pods leaving (lease revoked) and joining (registering again, or a new pod
taking over the copies), and policy reloads (SIGHUP with a changed valid policy), fail
no request."""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path

import pytest

from modelxds.localmesh import processes
from modelxds.localmesh.sample import SampleBackend
from modelxds.localmesh.stack import Stack, pod_instance_id, wait_until
from modelxds.modelmesh.registrar import PodRegistration
from tests.e2e.gwclient import Client, answers
from tests.e2e.load import Request, paced_load
from tests.e2e.test_strategy_equivalence import (
    LOADED_LONG_AGO,
    PODS,
    STRATEGIES,
    gateway,
    until_config_has,
)

pytestmark = pytest.mark.e2e

RATE = 200  # requests/s, sent on schedule however long each takes (open loop)
WORKERS = 8  # requests in flight at most
REST_EVERY = 4  # one request in four is REST, the others gRPC
CHURN = 20  # pods leaving, and as many joining
RELOADS = 5
QUIET = 0.25  # s without a request to a pod: the gateway has let it go
# model j is held by the pods in slots HOLDERS[j]: three have one holder (none left while
# it is away: ANY_ENDPOINT), three have two (one left)
HOLDERS = [{0}, {1}, {2}, {0, 1}, {1, 2}, {2, 0}]
MODELS = [f"m{j}" for j in range(len(HOLDERS))]


def mixed_requests(client: Client) -> Request:
    """One request in REST_EVERY is REST, the others gRPC, over the models in turn."""

    async def request(i: int) -> str:
        model, rest = MODELS[i // REST_EVERY % len(MODELS)], i % REST_EVERY == 0
        if rest:
            await client.rest(model)
            return "REST"
        await client.grpc("x", [("model", model)])
        return "gRPC"

    return request


async def add_copies(reg: PodRegistration, slot: int) -> None:
    for model, holders in zip(MODELS, HOLDERS, strict=True):
        if slot in holders:
            await reg.add_copy(model, started_ms=LOADED_LONG_AGO)


async def hold_models(stack: Stack, client: Client) -> list[PodRegistration]:
    """Pod i in slot i with the slot's copies, routed by the gateway: the slots."""
    slots = [stack.pod(pod_instance_id(i))[1] for i in range(PODS)]
    for slot, reg in enumerate(slots):
        await add_copies(reg, slot)
    await until_config_has(client, stack, 0)
    return slots


async def until_unused(backend: SampleBackend) -> None:
    async def quiet() -> bool:
        before = backend.served.total()
        await asyncio.sleep(QUIET)
        return backend.served.total() == before

    await wait_until(quiet, 10, f"no request to {backend.instance_id}", interval=0)


async def until_used(backend: SampleBackend) -> None:
    before = backend.served.total()

    async def used() -> bool:
        return backend.served.total() > before

    await wait_until(used, 10, f"requests to {backend.instance_id}")


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_pods_leaving_and_joining_under_load_fail_no_request(
    tmp_path: Path, strategy: str
) -> None:
    """A rolling update, pod after pod: each deregisters while it still serves; once the
    gateway sends it nothing, it registers again (a restart) or terminates and a new pod
    on a new address takes over its copies (scale: a new cluster)."""
    async with gateway(tmp_path, strategy) as (stack, client):
        slots = await hold_models(stack, client)
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            for k in range(CHURN):
                slot = k % PODS
                leaving = slots[slot]
                backend = stack.pod(leaving.instance_id)[0]
                await leaving.stop(revoke=True)
                await until_unused(backend)
                if k % 2 == 0:
                    await leaving.register()
                    slots[slot] = leaving
                else:
                    await backend.stop(0)
                    slots[slot] = await stack.add_pod(PODS + k // 2)
                await add_copies(slots[slot], slot)
                await until_used(stack.pod(slots[slot].instance_id)[0])
        load.check(f"{strategy}: {CHURN} pods left and {CHURN} joined")


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_policy_reloads_under_load_fail_no_request(tmp_path: Path, strategy: str) -> None:
    """Each reload adds a listener port (dropping the last one's) and flips the fallback
    between NO_FALLBACK and ANY_ENDPOINT: every loaded model still routes."""
    async with gateway(tmp_path, strategy) as (stack, client):
        await hold_models(stack, client)
        serve, policy = stack.processes[1], stack.workdir / "policy.yaml"
        good = policy.read_text()
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            for k in range(RELOADS):
                extra = processes.free_port()
                changed = good.replace("    - port:", f"    - port: {extra}\n    - port:")
                if k % 2 == 0:
                    changed = changed.replace("ANY_ENDPOINT", "NO_FALLBACK")
                assert changed.count(str(extra)) == 1 and changed.count("NO_FALLBACK") == 1 - k % 2
                policy.write_text(changed)
                serve.popen.send_signal(signal.SIGHUP)
                extra_client = Client(stack, gateway=f"127.0.0.1:{extra}")
                try:  # the gateway has this reload once its new port routes
                    routes = functools.partial(answers, extra_client, "m0", pod_instance_id(0))
                    await wait_until(routes, 15, f"reload {k}: port {extra} to route")
                finally:
                    await extra_client.close()
                await asyncio.sleep(QUIET)
        load.check(f"{strategy}: {RELOADS} policy reloads")
        assert f'modelxds_policy_reloads_total{{result="applied"}} {RELOADS}.0' in stack.metrics()
