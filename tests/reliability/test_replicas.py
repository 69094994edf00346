"""Two `modelxds serve` replicas on the same etcd and policy give a gateway the same
config, byte for byte and version for version (translation is deterministic and the
versions are content hashes), before and after placement changes: a gateway moved to
the other replica has nothing to re-apply."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from modelxds.bench.adsclient import GatewayClient
from modelxds.localmesh import processes
from tests.e2e.test_strategy_equivalence import STRATEGIES, gateway, random_spec, write_spec
from tests.reliability.conftest import Recorder
from tests.reliability.test_gateway_faults import running, until_settled


def differences(a: GatewayClient, b: GatewayClient) -> list[str]:
    """Where two gateways' configs differ: type, and the resource name or "version"."""
    out = []
    for type_url in sorted({*a.resources, *b.resources, *a.versions, *b.versions}):
        if a.versions.get(type_url) != b.versions.get(type_url):
            out.append(f"{type_url}: version")
        ra, rb = a.resources.get(type_url, {}), b.resources.get(type_url, {})
        out.extend(f"{type_url}: {n}" for n in sorted({*ra, *rb}) if ra.get(n) != rb.get(n))
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_two_replicas_serve_identical_bytes(
    tmp_path: Path, strategy: str, fault_row: Recorder
) -> None:
    async with gateway(tmp_path, strategy) as (stack, _):
        # copies loaded, loading and failed, dead pods, InferenceServices
        await write_spec(stack, random_spec(11))
        second = processes.free_port()
        await stack.start_serve(second, processes.free_port())  # a replica on ports of its own
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{stack.xds_port}") as one,
            grpc.aio.insecure_channel(f"127.0.0.1:{second}") as two,
            running(GatewayClient(one, "on-replica-1")) as a,
            running(GatewayClient(two, "on-replica-2")) as b,
        ):
            await until_settled(a)
            await until_settled(b)
            before = differences(a, b)
            first_versions = dict(a.versions)
            await write_spec(stack, random_spec(12))  # new models and copies, moved ones
            await until_settled(a)
            await until_settled(b)
            after = differences(a, b)
        fault_row(
            fault="two serve replicas for the same gateways",
            injected=f"2nd serve on the same etcd and policy; a placement change; {strategy}",
            requests=0,
            failures=0,
            converge_s=None,
            lost="none" if not before + after else f"{len(before + after)} resources differ",
        )
        assert set(a.versions) == set(a.names), "a type was never sent"
        assert all(a.resources[t] for t in a.names), "a type came empty"
        assert a.versions != first_versions, "the change reached no gateway"
        assert before == [] and after == []
