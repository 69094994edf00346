"""Through a real Envoy programmed by modelxds, requests land on a pod holding their model."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from modelxds.localmesh import processes
from modelxds.localmesh.sample import SampleBackend
from modelxds.localmesh.stack import Stack, pod_instance_id, wait_until
from modelxds.modelmesh import Table
from modelxds.modelmesh.records import VModelRecord
from modelxds.modelmesh.registrar import PodRegistration, put_vmodel
from modelxds.xds.bootstrap import bootstrap
from modelxds.xds.scale import MODEL_HEADER, SHARD_HEADER
from modelxds.xds.subset import NO_PODS_HEADER
from tests.e2e.gwclient import Client, answers, gateway_status

pytestmark = pytest.mark.e2e

LOADED_LONG_AGO = 1  # epoch ms: a copy whose load started long ago counts as loaded
N = 20


async def _route_count(
    client: Client, model: str, *, n: int = N, how: str = "model"
) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        if how == "rest":
            seen[await client.rest(model)] += 1
        else:
            seen[await client.grpc("ignored-by-gateway", [(how, model)])] += 1
    return seen


async def _until_routed(client: Client, model: str, holders: set[str], how: str = "model") -> None:
    async def only_holders() -> bool:
        return set(await _route_count(client, model, n=6, how=how)) <= holders

    await wait_until(only_holders, 10, f"{model} routed only to {sorted(holders)}")


async def test_headers_a_client_forges_neither_move_its_request_nor_reach_the_pod(
    stack: Stack, client: Client
) -> None:
    """The gateway's own headers, sent by a client (twice): mm-balanced: false, the scale
    strategy's model and shard, the subset strategy's no-pods flag. The request still
    goes to the holder, and mm-balanced reads true there (the last value, as grpc-java's
    Metadata.get reads it in ModelMesh)."""
    holder = pod_instance_id(1)
    _, reg = stack.pod(holder)
    await reg.add_copy("forged-m", started_ms=LOADED_LONG_AGO)
    await _until_routed(client, "forged-m", {holder})
    forged = [
        ("mm-balanced", "false"),
        (MODEL_HEADER, "other-model"),
        (SHARD_HEADER, f"{stack.gateway_port}/none"),
        (NO_PODS_HEADER, "true"),
    ]
    headers = [("model", "forged-m"), *forged, *forged]
    seen = Counter([await client.grpc("ignored-by-gateway", headers) for _ in range(N)])
    assert seen == {holder: N}
    backend, _ = stack.pod(holder)
    assert backend.last_metadata == {"mm-balanced": "true"}


async def test_loaded_model_reaches_its_holder_by_header_vmodel_and_rest_path(
    stack: Stack, client: Client
) -> None:
    holder = pod_instance_id(1)
    _, reg = stack.pod(holder)
    await reg.add_copy("mnist-svm__isvc-6b2eb0b8bf", started_ms=LOADED_LONG_AGO)
    await put_vmodel(
        stack.etcd,
        stack.layout,
        "example-mnist-isvc",
        VModelRecord(
            owner="isvc",
            active_model="mnist-svm__isvc-6b2eb0b8bf",
            target_model="mnist-svm__isvc-6b2eb0b8bf",
        ),
    )
    await _until_routed(client, "example-mnist-isvc", {holder})

    by_header = await _route_count(client, "mnist-svm__isvc-6b2eb0b8bf", how="model")
    by_vmodel = await _route_count(client, "example-mnist-isvc", how="mm-vmodel-id")
    by_model_id = await _route_count(client, "mnist-svm__isvc-6b2eb0b8bf", how="mm-model-id")
    by_rest_path = await _route_count(client, "example-mnist-isvc", how="rest")

    for seen in (by_header, by_vmodel, by_model_id, by_rest_path):
        assert seen == {holder: N}
    backend, _ = stack.pod(holder)
    # the holder must serve its local copy, not forward again inside the mesh
    assert backend.last_metadata.get("mm-balanced") == "true"
    (row,) = await gateway_status(stack)
    assert row["gateway"] == "gateway-0"
    assert all(row[t].startswith("SYNCED") for t in ("CDS", "EDS", "LDS", "RDS")), row
    # the scale strategy's scoped routes are a type of their own, shown as one
    scoped = "--strategy" in stack.serve_args and "scale" in stack.serve_args
    assert row["SRDS"].startswith("SYNCED" if scoped else "NOT REQUESTED"), row


async def test_unknown_model_is_served_by_any_pod(stack: Stack, client: Client) -> None:
    await stack.pod(pod_instance_id(0))[1].add_copy("known", started_ms=LOADED_LONG_AGO)
    await _until_routed(client, "known", {pod_instance_id(0)})

    seen = await _route_count(client, "never-loaded", n=30)
    rest = await _route_count(client, "never-loaded", n=10, how="rest")

    assert sum(seen.values()) == 30 and sum(rest.values()) == 10
    # ANY_ENDPOINT fallback: spread over the pods, so ModelMesh can load it anywhere
    assert len(seen) >= 2


async def test_routing_follows_loads_unloads_and_a_pod_dying(stack: Stack, client: Client) -> None:
    a, b, c = (pod_instance_id(i) for i in range(3))
    reg_a, reg_b = stack.pod(a)[1], stack.pod(b)[1]
    await reg_a.add_copy("m", started_ms=LOADED_LONG_AGO)
    await _until_routed(client, "m", {a})

    # a second copy loads on b: traffic spreads over both holders
    await reg_b.add_copy("m", started_ms=LOADED_LONG_AGO)

    async def both() -> bool:
        return set(await _route_count(client, "m", n=12)) == {a, b}

    await wait_until(both, 10, "traffic on both holders")

    # a unloads its copy: only b holds it
    await reg_a.remove_copy("m")
    await _until_routed(client, "m", {b})

    # c crashes: it stops serving and its lease runs out; nothing is routed to it any more
    c_backend, c_reg = stack.pod(c)
    await c_reg.stop(revoke=True)
    await c_backend.stop(0)
    failures = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            await client.grpc("x", [("model", "other-model")])
        except Exception:
            failures += 1
    # retries leave a dead pod, so even before the update no request fails
    assert failures == 0
    seen = await _route_count(client, "other-model", n=20)
    assert c not in seen
    assert set(await _route_count(client, "m", n=10)) == {b}


async def test_failed_copy_is_not_routed_and_loading_copy_is_used_when_alone(
    stack: Stack, client: Client
) -> None:
    a, b = pod_instance_id(0), pod_instance_id(1)
    reg_a, reg_b = stack.pod(a)[1], stack.pod(b)[1]
    # only a loading copy exists: route to it rather than trigger a second load
    await reg_a.add_copy("fresh")
    await _until_routed(client, "fresh", {a})
    # the load failed on a; b has it loaded
    await reg_b.add_copy("fresh", started_ms=LOADED_LONG_AGO)
    await reg_a.fail_copy("fresh")
    await _until_routed(client, "fresh", {b})
    assert set(await _route_count(client, "fresh", n=N)) == {b}


async def test_malformed_record_is_skipped_and_routing_goes_on(
    stack: Stack, client: Client
) -> None:
    a, b = pod_instance_id(0), pod_instance_id(2)
    await stack.pod(a)[1].add_copy("good", started_ms=LOADED_LONG_AGO)
    await _until_routed(client, "good", {a})
    registry = stack.layout.table_prefix(Table.REGISTRY)
    await stack.etcd.put(f"{registry}garbage".encode(), b'{"instanceIds": "not a map"')
    await stack.etcd.put(f"{registry}also-garbage".encode(), b'{"instanceIds": {"x": "soon"}}')
    # the server keeps serving and keeps watching: a later change still routes
    await stack.pod(b)[1].add_copy("later", started_ms=LOADED_LONG_AGO)
    await _until_routed(client, "later", {b})
    assert set(await _route_count(client, "good")) == {a}
    metrics = stack.metrics()
    assert 'modelxds_etcd_invalid_records_total{table="registry"} 2.0' in metrics
    log = stack.processes[1].log_path.read_text()
    assert f"{registry}garbage" in log and f"{registry}also-garbage" in log


async def test_a_pod_registered_by_host_name_costs_the_others_nothing_and_ipv6_pods_route(
    stack: Stack, client: Client
) -> None:
    a = pod_instance_id(0)
    await stack.pod(a)[1].add_copy("good", started_ms=LOADED_LONG_AGO)
    await _until_routed(client, "good", {a})
    # a DNS name where ModelMesh registers the pod IP: one host name in EDS (or a STATIC
    # cluster) would get the whole resource rejected, freezing every pod's routing
    named = PodRegistration(stack.etcd, stack.layout, "7dd689-named0", "pod-9.mesh.svc")
    stack.registrations.append(named)
    await named.register()
    await named.add_copy("named-model", started_ms=LOADED_LONG_AGO)
    v6 = SampleBackend("::1", stack.pod_port, "7dd689-ipv6p0", stack.rest_port)
    await v6.start()
    stack.backends.append(v6)
    v6_reg = PodRegistration(stack.etcd, stack.layout, v6.instance_id, "::1")
    stack.registrations.append(v6_reg)
    await v6_reg.register()
    await v6_reg.add_copy("v6-model", started_ms=LOADED_LONG_AGO)

    await _until_routed(client, "v6-model", {v6.instance_id})
    assert await _route_count(client, "v6-model", how="rest") == {v6.instance_id: N}
    assert set(await _route_count(client, "good")) == {a}
    (row,) = await gateway_status(stack)
    assert all(row[t].startswith("SYNCED") for t in ("CDS", "EDS", "LDS", "RDS")), row
    assert 'modelxds_etcd_invalid_records_total{table="litelinks"} 1.0' in stack.metrics()
    assert "pod-9.mesh.svc' is not an IP address" in stack.processes[1].log_path.read_text()


async def test_two_gateways_get_the_same_config_and_both_route(
    stack: Stack, client: Client
) -> None:
    admin = f"127.0.0.1:{processes.free_port()}"
    second = processes.start_envoy(
        "envoy-2", bootstrap(f"127.0.0.1:{stack.xds_port}", "gateway-1", admin), stack.workdir
    )
    stack.processes.append(second)  # stopped with the stack
    holder = pod_instance_id(2)
    await stack.pod(holder)[1].add_copy("shared", started_ms=LOADED_LONG_AGO)

    async def both_synced() -> bool:
        rows = await gateway_status(stack)
        return sorted(r["gateway"] for r in rows) == ["gateway-0", "gateway-1"] and all(
            r[t].startswith("SYNCED") for r in rows for t in ("CDS", "EDS", "LDS", "RDS")
        )

    await wait_until(both_synced, 15, "both gateways in sync")
    dump = await asyncio.to_thread(processes.admin_get, admin, "/config_dump?include_eds")
    assert '"shared"' in dump  # the second gateway carries the placement too
    # the two Envoys share the listener port (SO_REUSEPORT): whichever answers, it routes
    await _until_routed(client, "shared", {holder})
    assert set(await _route_count(client, "shared", n=30)) == {holder}


async def test_sighup_reloads_a_valid_policy_and_keeps_the_last_good_one_otherwise(
    stack: Stack, client: Client
) -> None:
    holder = pod_instance_id(1)
    await stack.pod(holder)[1].add_copy("m", started_ms=LOADED_LONG_AGO)
    await _until_routed(client, "m", {holder})
    serve = stack.processes[1]
    policy = stack.workdir / "policy.yaml"
    good = policy.read_text()

    policy.write_text(good.replace("kind: VirtualService", "kind: VirtualSevice"))
    serve.popen.send_signal(signal.SIGHUP)
    await wait_until(
        lambda: _logged(serve, "the last good policy keeps serving"), 10, "the rejection"
    )
    assert set(await _route_count(client, "m")) == {holder}  # still served, still routed

    # a second listener port, as a reload adds one: served once the gateway has it
    extra = processes.free_port()
    policy.write_text(good.replace("    - port:", f"    - port: {extra}\n    - port:"))
    serve.popen.send_signal(signal.SIGHUP)
    extra_client = Client(stack, gateway=f"127.0.0.1:{extra}")
    try:
        await wait_until(
            lambda: answers(extra_client, "m", holder), 15, "the new listener port to route"
        )
    finally:
        await extra_client.close()
    assert set(await _route_count(client, "m")) == {holder}  # and the old port goes on
    metrics = stack.metrics()
    assert 'modelxds_policy_reloads_total{result="rejected"} 1.0' in metrics
    assert 'modelxds_policy_reloads_total{result="applied"} 1.0' in metrics


async def _logged(proc: processes.Process, text: str) -> bool:
    return text in proc.log_path.read_text()


async def test_an_edited_policy_file_is_applied_without_a_signal(tmp_path: Path) -> None:
    """As a ConfigMap mount changes: the file is replaced, nobody sends SIGHUP."""
    stack = Stack(tmp_path / "stack", policy_poll_ms=100)
    await stack.start()
    client = Client(stack)
    try:
        holder = pod_instance_id(1)
        await stack.pod(holder)[1].add_copy("m", started_ms=LOADED_LONG_AGO)
        await _until_routed(client, "m", {holder})
        policy = stack.workdir / "policy.yaml"
        extra = processes.free_port()
        edited = policy.read_text().replace("    - port:", f"    - port: {extra}\n    - port:")
        swapped = stack.workdir / "policy.yaml.new"
        swapped.write_text(edited)
        swapped.replace(policy)
        extra_client = Client(stack, gateway=f"127.0.0.1:{extra}")
        try:
            await wait_until(
                lambda: answers(extra_client, "m", holder), 15, "the new listener port to route"
            )
        finally:
            await extra_client.close()
        assert 'modelxds_policy_reloads_total{result="applied"} 1.0' in stack.metrics()
    finally:
        await client.close()
        await stack.stop()
