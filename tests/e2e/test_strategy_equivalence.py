"""Both gateway strategies route alike, through a real Envoy: for random placements written
to a real etcd, every model id and InferenceService name lands only on the pods that
``MeshPlacement.routable`` names (all of them, given enough requests), and a name no pod
has spreads over every pod (ANY_ENDPOINT). What NO_FALLBACK answers for it is in
test_gateway_rest.py."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from modelxds.localmesh import processes
from modelxds.localmesh.stack import Stack, pod_host, pod_instance_id, seed_policy, wait_until
from modelxds.modelmesh.records import ModelRecord, VModelRecord
from modelxds.modelmesh.registrar import put_vmodel, update_model, with_copy
from modelxds.placement.watch import PlacementWatcher
from tests.e2e.gwclient import Client, serving

pytestmark = pytest.mark.e2e

STRATEGIES = ["subset", "scale"]
PODS = 3
LOADED_LONG_AGO = 1  # epoch ms: a copy whose load started long ago counts as loaded
# Copies whose load starts during the test stay "loading" for its whole run.
LOADING_FOR_MS = 600_000
GONE = "7dd689-gone00"  # listed in instanceIds, but no such pod is live
N = 30  # requests per name: 3 equally likely holders all show up but for ~1e-5


@dataclass
class Spec:
    """A random placement and, computed from it independently, where each name may go."""

    copies: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> pod -> state
    vmodels: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (active, target)

    def expected(self, name: str) -> set[str]:
        if name in self.vmodels:
            name = self.vmodels[name][0]
        states = self.copies.get(name, {})
        loaded = {pod for pod, state in states.items() if state == "loaded"}
        loading = {pod for pod, state in states.items() if state == "loading"}
        return loaded or loading  # a loading copy only when none has loaded

    def names(self) -> list[str]:
        return [*self.copies, *self.vmodels]


def random_spec(seed: int) -> Spec:
    rnd = random.Random(seed)
    pods = [pod_instance_id(i) for i in range(PODS)]
    spec = Spec()
    for m in range(12):
        holders = rnd.sample(pods, rnd.randint(0, 3))
        states = rnd.choices(["loaded", "loading", "failed"], weights=[6, 2, 2], k=len(holders))
        spec.copies[f"model-{seed}-{m}"] = dict(zip(holders, states, strict=True))
        if rnd.random() < 0.2:
            spec.copies[f"model-{seed}-{m}"][GONE] = "dead"
    models = list(spec.copies)
    for v in range(4):
        active = rnd.choice([*models, f"missing-{seed}"])
        spec.vmodels[f"isvc-{seed}-{v}"] = (active, rnd.choice([active, *models]))
    return spec


async def write_spec(stack: Stack, spec: Spec) -> None:
    """Into etcd as ModelMesh pods write it."""
    for model, states in spec.copies.items():
        await update_model(stack.etcd, stack.layout, model, lambda rec: rec or ModelRecord())
        for pod, state in states.items():
            if pod == GONE:
                await update_model(stack.etcd, stack.layout, model, with_copy(GONE, 1))
                continue
            reg = stack.pod(pod)[1]
            if state == "loaded":
                await reg.add_copy(model, started_ms=LOADED_LONG_AGO)
            elif state == "loading":
                await reg.add_copy(model)
            else:
                await reg.add_copy(model)
                await reg.fail_copy(model)
    for name, (active, target) in spec.vmodels.items():
        await put_vmodel(
            stack.etcd,
            stack.layout,
            name,
            VModelRecord(owner="isvc", active_model=active, target_model=target),
        )


async def routable_in_etcd(stack: Stack) -> dict[str, set[str]]:
    """``MeshPlacement.routable`` of every name, as modelxds reads etcd."""
    watcher = PlacementWatcher(
        stack.etcd_url, [("mesh", stack.layout)], loaded_after_ms=LOADING_FOR_MS
    )
    await watcher.list_once()
    mesh = watcher.snapshot().meshes["mesh"]
    return {name: set(mesh.routable(name)) for name in [*mesh.models, *mesh.vmodels]}


async def until_config_has(client: Client, stack: Stack, seed: int) -> None:
    """Written last, a model on one pod routes there once the gateway has everything
    written before it: etcd's watch is ordered and a snapshot is all-or-nothing."""
    sentinel, pod = f"sentinel-{seed}", pod_instance_id(seed % PODS)
    await stack.pod(pod)[1].add_copy(sentinel, started_ms=LOADED_LONG_AGO)

    async def routed() -> bool:
        return {await client.grpc("x", [("model", sentinel)]) for _ in range(10)} == {pod}

    await wait_until(routed, 15, f"{sentinel} routed to {pod}")


@asynccontextmanager
async def gateway(
    tmp_path: Path, strategy: str, fallback: str = "ANY_ENDPOINT"
) -> AsyncIterator[tuple[Stack, Client]]:
    # the policy names the gateway and pod ports: pick them before the stack does
    gateway_port, pod_port = processes.free_port(), processes.free_port(pod_host(0))
    stack = Stack(
        tmp_path / strategy,
        pods=PODS,
        pod_port=pod_port,
        gateway_port=gateway_port,
        policy_text=seed_policy(gateway_port, pod_port).replace(
            "fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {fallback}"
        ),
        serve_args=("--strategy", strategy, "--loaded-after-ms", str(LOADING_FOR_MS)),
    )
    async with serving(stack) as client:
        yield stack, client


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_requests_land_on_routable_pods(tmp_path: Path, strategy: str, seed: int) -> None:
    spec = random_spec(seed)
    async with gateway(tmp_path, strategy) as (stack, client):
        await write_spec(stack, spec)
        await until_config_has(client, stack, seed)
        in_etcd = await routable_in_etcd(stack)
        unknown = f"never-loaded-{seed}"
        # the spec's own reading of the placement agrees with modelxds'
        assert {n: spec.expected(n) for n in spec.names()} == {n: in_etcd[n] for n in spec.names()}

        everyone = {pod_instance_id(i) for i in range(PODS)}
        for name in [*spec.names(), unknown]:
            holders = in_etcd.get(name, set())
            how = "mm-vmodel-id" if name in spec.vmodels else "model"
            seen = Counter([await client.grpc("x", [(how, name)]) for _ in range(N)])
            rest = {await client.rest(name) for _ in range(3)}
            if holders:
                assert set(seen) == holders, (name, spec.copies.get(name), seen)
                assert rest <= holders, (name, rest)
            else:  # ANY_ENDPOINT: spread, so ModelMesh can load it anywhere
                assert set(seen) <= everyone and len(seen) >= 2, (name, seen)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_dead_holder_fails_no_request(tmp_path: Path, strategy: str) -> None:
    async with gateway(tmp_path, strategy) as (stack, client):
        a, b = pod_instance_id(0), pod_instance_id(1)
        for pod in (a, b):
            await stack.pod(pod)[1].add_copy("shared", started_ms=LOADED_LONG_AGO)
        await until_config_has(client, stack, 2)
        # a crashes; its lease has not run out, so placement still lists it
        await stack.pod(a)[0].stop(0)
        # every request succeeds: a retry leaves the dead pod (subset: for the other
        # holder; scale: for another pod, since a retry cannot change weighted cluster)
        seen = Counter([await client.grpc("x", [("model", "shared")]) for _ in range(N)])
        assert a not in seen and sum(seen.values()) == N


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_pod_leaving_and_coming_back_under_load_fails_no_request(
    tmp_path: Path, strategy: str
) -> None:
    """A rolling update: the pod deregisters (its lease revoked) while it still serves,
    then registers again. Routes move off a pod before its cluster goes (scale: a cluster
    per pod), so the gateway never answers 503 "no cluster found"."""
    async with gateway(tmp_path, strategy) as (stack, client):
        for i in range(PODS):
            await stack.pod(pod_instance_id(i))[1].add_copy(f"m{i}", started_ms=LOADED_LONG_AGO)
        await until_config_has(client, stack, 0)
        failures: Counter[str] = Counter()
        served = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal served
            while not stop.is_set():
                for i in range(PODS):
                    try:
                        await client.grpc("x", [("model", f"m{i}")])
                        served += 1
                    except grpc.aio.AioRpcError as e:
                        failures[f"{e.code().name}: {e.details()}"] += 1

        task = asyncio.create_task(load())
        leaving = stack.pod(pod_instance_id(2))[1]
        for _ in range(5):
            await leaving.stop(revoke=True)
            await asyncio.sleep(0.4)
            await leaving.register()
            await leaving.add_copy("m2", started_ms=LOADED_LONG_AGO)
            await asyncio.sleep(0.4)
        stop.set()
        await task
        assert not failures, failures
        assert served > 100
