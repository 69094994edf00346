"""The local ModelMesh-compatible mesh on real MLServer runtimes, behind the gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh import isvc, processes
from modelxds.localmesh.client import (
    SEED_DATA_REQUEST,
    grpc_seed,
    predicted_digit,
    rest_seed,
    triton_grpc,
    triton_http,
)
from modelxds.localmesh.stack import Stack, pod_instance_id, wait_until
from modelxds.modelmesh import ModelRecord, Table, parse_model, parse_vmodel
from modelxds.modelmesh.registrar import update_model

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / ".run" / "models"
SEED_ISVC = "example-mnist-isvc"


def _isvc_yaml(name: str, path: str, model_format: str = "sklearn") -> str:
    return f"""
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {name}
  namespace: modelmesh-serving
  annotations:
    serving.kserve.io/deploymentMode: ModelMesh
spec:
  predictor:
    model:
      modelFormat:
        name: {model_format}
      storage:
        key: localMinIO
        path: {path}
"""


async def _apply(stack: Stack, name: str, path: str) -> str:
    (service,) = isvc.parse_isvcs(_isvc_yaml(name, path), "test")
    await isvc.apply(stack.etcd, stack.layout, service)
    return service.model_id


async def _register(stack: Stack, model_id: str, path: str) -> None:
    """A model in the registry with no copy anywhere: its first request is a miss."""
    record = ModelRecord(
        type="mt:sklearn",
        model_path=path,
        encryption_key=json.dumps({"storage_key": "localMinIO"}),
    )
    await update_model(stack.etcd, stack.layout, model_id, lambda _: record)


async def _state(stack: Stack, name: str) -> dict[str, Any]:
    return next(r for r in await stack.isvc_status() if r["name"] == name)


async def _until_state(stack: Stack, name: str, state: str, timeout: float = 60) -> None:
    async def reached() -> bool:
        return bool((await _state(stack, name))["state"] == state)

    await wait_until(reached, timeout, f"{name} to be {state}", interval=0.2)


def _counters(stack: Stack, name: str) -> dict[str, float]:
    return {iid: stack.node_counters(iid).get(name, 0.0) for iid in stack.nodes}


def _needs_models() -> None:
    if not (MODELS / "sklearn" / "mnist-svm.joblib").exists():
        pytest.fail(f"sample models missing in {MODELS}: run `make models`")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    _needs_models()
    stack = Stack(tmp_path_factory.mktemp("mesh"), runtime="mlserver", storage_dir=MODELS)
    await stack.start()
    try:
        await _apply(stack, SEED_ISVC, "sklearn/mnist-svm.joblib")
        await _until_state(stack, SEED_ISVC, "UpToDate")
        yield stack
    finally:
        await stack.stop()


async def test_seed_request_returns_8_over_rest_and_grpc(mesh: Stack) -> None:
    assert await rest_seed(mesh.gateway, SEED_ISVC) == 8
    # tritonclient, a real KServe V2 client: routed by the `model` header, and with no
    # header at all (the gateway falls back to any pod, which forwards inside the mesh)
    assert await triton_grpc(mesh.gateway, SEED_ISVC, {"model": SEED_ISVC}) == [[8]]
    assert await triton_grpc(mesh.gateway, SEED_ISVC) == [[8]]


def _curl_data_form(address: str, path: str) -> int:
    """The V2 REST ``data`` form, as KServe's docs send it with curl."""
    body = json.dumps(SEED_DATA_REQUEST)
    out = subprocess.run(
        [
            *("curl", "-sS", "--fail-with-body", "-H", "content-type: application/json"),
            *("-d", body, f"http://{address}{path}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return predicted_digit(json.loads(out.stdout))


async def test_real_clients_through_the_gateway_reach_the_holder_with_no_forward(
    mesh: Stack,
) -> None:
    (holder,) = (await _state(mesh, SEED_ISVC))["active_copies"]
    forwarded = _counters(mesh, "modelmesh_forwarded_requests_total")
    local = _counters(mesh, "modelmesh_local_requests_total")[holder]

    http = await triton_http(mesh.gateway, SEED_ISVC)  # the data form, binary_data=False
    assert http["predict"] == [[8]] and http["ready"] is True
    # MLServer's own metadata of the model the InferenceService resolves to
    assert http["metadata"]["name"].startswith(f"{SEED_ISVC}__isvc-")
    for path in (f"/v2/models/{SEED_ISVC}/infer", f"/v2/models/{SEED_ISVC}/infer?trace=1"):
        assert await asyncio.to_thread(_curl_data_form, mesh.gateway, path) == 8
    assert await rest_seed(mesh.gateway, SEED_ISVC) == 8  # the seed's (fortio's) contents form
    assert await triton_grpc(mesh.gateway, SEED_ISVC, {"model": SEED_ISVC}) == [[8]]

    assert _counters(mesh, "modelmesh_forwarded_requests_total") == forwarded  # zero hops
    # each inference served by the holder itself: 1 tritonclient.http, 2 curl, 1 seed, 1 gRPC
    assert _counters(mesh, "modelmesh_local_requests_total")[holder] == local + 5


async def test_a_grpc_request_naming_no_model_is_invalid_argument(mesh: Stack) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(pb.ModelInferRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mm-vmodel-id" in (err.value.details() or "")


async def test_a_second_framework_serves_side_by_side(mesh: Stack) -> None:
    (service,) = isvc.read_files([str(ROOT / "manifests/examples/example-digits-lgb-isvc.yaml")])
    await isvc.apply(mesh.etcd, mesh.layout, service)
    await _until_state(mesh, service.name, "UpToDate")
    (probabilities,) = await triton_grpc(mesh.gateway, service.name, {"model": service.name})
    assert len(probabilities) == 10  # LightGBM's class probabilities for the digit
    assert max(range(10), key=lambda d: probabilities[d]) == 8
    assert await rest_seed(mesh.gateway, SEED_ISVC) == 8  # and the sklearn model alongside


async def test_forwarded_once_when_sent_to_a_pod_directly_never_through_the_gateway(
    mesh: Stack,
) -> None:
    (holder,) = (await _state(mesh, SEED_ISVC))["active_copies"]
    other = next(i for i in mesh.nodes if i != holder)
    forwarded = _counters(mesh, "modelmesh_forwarded_requests_total")
    local = _counters(mesh, "modelmesh_local_requests_total")

    response = await grpc_seed(mesh.pod_addresses()[other], SEED_ISVC)
    assert response.outputs[0].contents.int64_contents == [8]
    after = _counters(mesh, "modelmesh_forwarded_requests_total")
    assert after[other] == forwarded[other] + 1  # exactly one internal hop
    assert _counters(mesh, "modelmesh_local_requests_total")[holder] == local[holder] + 1

    for _ in range(20):
        assert await rest_seed(mesh.gateway, SEED_ISVC) == 8
    assert _counters(mesh, "modelmesh_forwarded_requests_total") == after  # zero hops
    assert _counters(mesh, "modelmesh_local_requests_total")[holder] == local[holder] + 21


async def test_a_miss_loads_exactly_once_under_20_concurrent_requests(mesh: Stack) -> None:
    await _register(mesh, "generated-0007", "generated/model-0007.joblib")
    loads = sum(_counters(mesh, "modelmesh_loads_total").values())

    answers = await asyncio.gather(
        *(grpc_seed(mesh.gateway, "generated-0007", {"model": "generated-0007"}) for _ in range(20))
    )

    assert all(len(a.outputs[0].contents.int64_contents) == 1 for a in answers)
    assert sum(_counters(mesh, "modelmesh_loads_total").values()) == loads + 1
    got = await mesh.etcd.get(mesh.layout.key(Table.REGISTRY, "generated-0007").encode())
    assert got is not None and len(parse_model(got.value).instance_ids) == 1


async def test_model_change_goes_in_progress_then_up_to_date_and_keeps_serving(
    mesh: Stack,
) -> None:
    old = (await _state(mesh, SEED_ISVC))["active_model"]
    new = await _apply(mesh, SEED_ISVC, "sklearn/mnist-svm-v2.joblib")
    # straight after the change the old model still serves and the new one is the target
    state = await _state(mesh, SEED_ISVC)
    assert (state["state"], state["active_model"], state["target_model"]) == (
        "InProgress",
        old,
        new,
    )
    answers = []
    deadline = time.monotonic() + 60
    while (await _state(mesh, SEED_ISVC))["state"] != "UpToDate":
        assert time.monotonic() < deadline, "the new model never became active"
        answers.append(await rest_seed(mesh.gateway, SEED_ISVC))
    answers.append(await rest_seed(mesh.gateway, SEED_ISVC))
    assert set(answers) == {8}
    assert (await _state(mesh, SEED_ISVC))["active_model"] == new

    # a change to a model that cannot load is blocked, and the service keeps answering
    broken = await _apply(mesh, SEED_ISVC, "sklearn/does-not-exist.joblib")
    await _until_state(mesh, SEED_ISVC, "BlockedByFailedLoad")
    state = await _state(mesh, SEED_ISVC)
    assert (state["active_model"], state["target_model"]) == (new, broken)
    assert await rest_seed(mesh.gateway, SEED_ISVC) == 8
    assert await triton_grpc(mesh.gateway, SEED_ISVC, {"model": SEED_ISVC}) == [[8]]


async def test_lru_eviction_unloads_the_least_recently_used_and_updates_etcd(
    tmp_path: Path,
) -> None:
    _needs_models()
    stack = Stack(tmp_path / "lru", pods=1, node_capacity=2, runtime="mlserver", storage_dir=MODELS)
    await stack.start()
    try:
        node = pod_instance_id(0)
        for i in (1, 2, 3):
            await _register(stack, f"m{i}", f"generated/model-000{i}.joblib")
        for model in ("m1", "m2", "m1", "m3"):  # m1 used again: m2 is least recently used
            await grpc_seed(stack.gateway, model, {"model": model})

        async def listed() -> dict[str, list[str]]:
            out = {}
            for m in ("m1", "m2", "m3"):
                got = await stack.etcd.get(stack.layout.key(Table.REGISTRY, m).encode())
                assert got is not None
                out[m] = sorted(parse_model(got.value).instance_ids)
            return out

        assert await listed() == {"m1": [node], "m2": [], "m3": [node]}
        assert stack.node_counters(node)["modelmesh_evictions_total"] == 1
        assert stack.node_counters(node)["modelmesh_loaded_models"] == 2
    finally:
        await stack.stop()


async def test_a_killed_pod_leaves_through_its_lease_and_its_models_load_elsewhere(
    tmp_path: Path,
) -> None:
    _needs_models()
    stack = Stack(tmp_path / "kill", runtime="mlserver", storage_dir=MODELS, lease_ttl=2)
    await stack.start()
    try:
        await _apply(stack, SEED_ISVC, "sklearn/mnist-svm.joblib")
        await _until_state(stack, SEED_ISVC, "UpToDate")
        (victim,) = (await _state(stack, SEED_ISVC))["active_copies"]
        assert victim in await _gateway_endpoints(stack)
        stack.nodes[victim].kill()  # SIGKILL: no unregistering, the lease just runs out

        async def gone() -> bool:
            status = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "modelxds.cli",
                    "placement",
                    "--etcd",
                    stack.etcd_url,
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            instances = json.loads(status.stdout)["namespaces"]["modelmesh-serving"]["instances"]
            return victim not in instances

        await wait_until(gone, 30, f"{victim}'s lease to expire", interval=0.5)

        async def left_the_gateway() -> bool:
            return victim not in await _gateway_endpoints(stack)

        await wait_until(left_the_gateway, 10, f"{victim} to leave the gateway's endpoints")
        loads = {i: c for i, c in _counters_alive(stack, victim).items()}
        assert await rest_seed(stack.gateway, SEED_ISVC) == 8
        after = _counters_alive(stack, victim)
        assert sum(after.values()) == sum(loads.values()) + 1  # reloaded on a live pod
        got = await stack.etcd.get(stack.layout.key(Table.VMODELS, SEED_ISVC).encode())
        assert got is not None
        active = parse_vmodel(got.value).active_model
        copies = await stack.etcd.get(stack.layout.key(Table.REGISTRY, active).encode())
        assert copies is not None
        live_copies = set(parse_model(copies.value).instance_ids) - {victim}
        assert live_copies and live_copies <= set(stack.nodes) - {victim}
    finally:
        await stack.stop()


async def _gateway_endpoints(stack: Stack) -> set[str]:
    """Pods (instance ids) in the gateway's EDS, from Envoy's admin config_dump."""
    dump = json.loads(
        await asyncio.to_thread(processes.admin_get, stack.admin, "/config_dump?include_eds")
    )
    return {
        lb["endpoint"]["hostname"]
        for section in dump["configs"]
        for cfg in section.get("dynamic_endpoint_configs", [])
        for group in cfg["endpoint_config"].get("endpoints", [])
        for lb in group.get("lb_endpoints", [])
    }


def _counters_alive(stack: Stack, dead: str) -> dict[str, float]:
    return {
        iid: stack.node_counters(iid).get("modelmesh_loads_total", 0.0)
        for iid in stack.nodes
        if iid != dead
    }
