"""A gateway in the GIE shape (`modelxds bootstrap --epp`: ext_proc + override_host) asking
`modelxds epp`, in front of the local mesh on real MLServer runtimes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh import isvc, processes
from modelxds.localmesh.client import grpc_seed, rest_seed, triton_grpc
from modelxds.localmesh.stack import EppGateway, Stack, seed_policy, wait_until
from modelxds.localmesh.train import SEED_INPUT
from modelxds.modelmesh import ModelRecord
from modelxds.modelmesh.registrar import update_model
from tests.e2e.gwclient import http_json

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
FORWARDED = "modelmesh_forwarded_requests_total"  # a pod's requests sent on to another
MODELS = ROOT / ".run" / "models"
SEED_ISVC = "example-mnist-isvc"
SEED_ISVC_YAML = f"""
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {SEED_ISVC}
  namespace: modelmesh-serving
  annotations:
    serving.kserve.io/deploymentMode: ModelMesh
spec:
  predictor:
    model:
      modelFormat:
        name: sklearn
      storage:
        key: localMinIO
        path: sklearn/mnist-svm.joblib
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The mesh behind an EPP gateway for gRPC (the pods' 8033); `rest_gateway` adds one
    for REST (their REST proxy), as GIE users run one InferencePool per port."""
    if not (MODELS / "sklearn" / "mnist-svm.joblib").exists():
        pytest.fail(f"sample models missing in {MODELS}: run `make models`")
    stack = Stack(
        tmp_path_factory.mktemp("epp"),
        runtime="mlserver",
        storage_dir=MODELS,
        gateway_kind="epp",
    )
    await stack.start()
    try:
        (service,) = isvc.parse_isvcs(SEED_ISVC_YAML, "test")
        await isvc.apply(stack.etcd, stack.layout, service)

        async def up_to_date() -> bool:
            rows = await stack.isvc_status()
            return any(r["name"] == SEED_ISVC and r["state"] == "UpToDate" for r in rows)

        await wait_until(up_to_date, 60, f"{SEED_ISVC} UpToDate", interval=0.2)
        yield stack
    finally:
        await stack.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rest_gateway(mesh: Stack) -> EppGateway:
    return await mesh.add_epp_gateway(mesh.rest_port, app_protocol="http")


def _counters(stack: Stack, name: str) -> dict[str, float]:
    return {iid: stack.node_counters(iid).get(name, 0.0) for iid in stack.nodes}


async def _holder(stack: Stack) -> str:
    row = next(r for r in await stack.isvc_status() if r["name"] == SEED_ISVC)
    (holder,) = row["active_copies"]
    return str(holder)


async def _infer(address: str, model: str, headers: dict[str, str] | None = None) -> list[int]:
    """The seed's input with the model only in the body (``model_name``)."""
    response = await grpc_seed(address, model, headers)
    return list(response.outputs[0].contents.int64_contents)


async def test_grpc_by_header_and_by_body_and_rest_by_path_reach_the_holder_and_answer_8(
    mesh: Stack, rest_gateway: EppGateway
) -> None:
    holder = await _holder(mesh)
    forwarded = _counters(mesh, FORWARDED)
    local = _counters(mesh, "modelmesh_local_requests_total")[holder]

    for _ in range(3):
        # tritonclient: by mm-vmodel-id, and with no header at all (the model is only in
        # the body, which the picker reads)
        assert await triton_grpc(mesh.gateway, SEED_ISVC, {"mm-vmodel-id": SEED_ISVC}) == [[8]]
        assert await triton_grpc(mesh.gateway, SEED_ISVC) == [[8]]
        assert await rest_seed(rest_gateway.gateway, SEED_ISVC) == 8  # the REST path

    assert _counters(mesh, FORWARDED) == forwarded  # zero hops
    assert _counters(mesh, "modelmesh_local_requests_total")[holder] == local + 9
    # every pick found the copy (still counted loading in its first 3 s), none fell back
    for metrics in (mesh.metrics(), rest_gateway.metrics()):
        picks = [
            line for line in metrics.splitlines() if line.startswith("modelxds_epp_picks_total")
        ]
        assert picks and all('"holder"' in p or '"loading"' in p for p in picks), picks
    metrics = mesh.metrics()
    assert 'modelxds_epp_body_parses_total{result="found"}' in metrics


async def test_a_clients_own_pick_and_mm_balanced_give_way_to_the_pickers(mesh: Stack) -> None:
    """A client naming another pod in the picker's header (twice) and sending
    mm-balanced: false still reaches the holder, which serves it itself."""
    holder = await _holder(mesh)
    elsewhere = next(a for iid, a in mesh.pod_addresses().items() if iid != holder)
    forwarded = _counters(mesh, FORWARDED)
    local = _counters(mesh, "modelmesh_local_requests_total")[holder]
    forged = [
        ("x-gateway-destination-endpoint", elsewhere),
        ("x-gateway-destination-endpoint", elsewhere),
        ("mm-balanced", "false"),
    ]
    request = pb.ModelInferRequest(model_name=SEED_ISVC)
    request.inputs.add(name="predict", datatype="FP32", shape=[1, 64])
    request.inputs[0].contents.fp32_contents.extend(SEED_INPUT)
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            response = await stub.ModelInfer(request, metadata=forged, timeout=60)
            assert list(response.outputs[0].contents.int64_contents) == [8]
    assert _counters(mesh, FORWARDED) == forwarded  # zero hops
    assert _counters(mesh, "modelmesh_local_requests_total")[holder] == local + 3


async def test_an_unknown_model_falls_back_and_loads_once(mesh: Stack) -> None:
    record = ModelRecord(
        type="mt:sklearn",
        model_path="generated/model-0007.joblib",
        encryption_key=json.dumps({"storage_key": "localMinIO"}),
    )
    await update_model(mesh.etcd, mesh.layout, "generated-0007", lambda _: record)
    loads = sum(_counters(mesh, "modelmesh_loads_total").values())

    answer = await _infer(mesh.gateway, "generated-0007")

    assert len(answer) == 1
    assert sum(_counters(mesh, "modelmesh_loads_total").values()) == loads + 1
    assert 'modelxds_epp_picks_total{outcome="fallback"}' in mesh.metrics()


async def test_no_fallback_answers_404_over_rest_and_not_found_over_grpc(mesh: Stack) -> None:
    strict = seed_policy(mesh.gateway_port, mesh.pod_port).replace("ANY_ENDPOINT", "NO_FALLBACK")
    grpc_gw = await mesh.add_epp_gateway(mesh.pod_port, policy_text=strict)
    rest_gw = await mesh.add_epp_gateway(mesh.rest_port, app_protocol="http", policy_text=strict)

    async def rest_404() -> bool:
        status, doc = await http_json(rest_gw.gateway, "POST", "/v2/models/nowhere/infer", b"{}")
        return status == 404 and doc.get("code") == 5 and "NO_FALLBACK" in doc["message"]

    await wait_until(rest_404, 20, "the strict picker to answer 404")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _infer(grpc_gw.gateway, "nowhere")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "NO_FALLBACK" in (err.value.details() or "")
    assert await _infer(grpc_gw.gateway, SEED_ISVC) == [8]  # a loaded model still routes


async def _gateway_without_its_picker(mesh: Stack, failure_mode: str) -> EppGateway:
    gw = await mesh.add_epp_gateway(mesh.pod_port, failure_mode=failure_mode)
    await wait_until(lambda: _answers_8(gw.gateway), 20, "the picker's gateway to answer")
    assert gw.epp is not None
    gw.epp.kill()
    return gw


async def test_with_the_picker_down_fail_close_answers_503_and_unavailable(mesh: Stack) -> None:
    gw = await _gateway_without_its_picker(mesh, "FailClose")
    status, _ = await http_json(gw.gateway, "POST", f"/v2/models/{SEED_ISVC}/infer", b"{}")
    assert status == 503
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _infer(gw.gateway, SEED_ISVC)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_with_the_picker_down_fail_open_keeps_headers_only_requests_flowing(
    mesh: Stack,
) -> None:
    """Envoy fails open while no body chunk has gone to the picker: a request without a
    body (model metadata over REST) goes on by the pool's round robin, to every pod."""
    gw = await mesh.add_epp_gateway(mesh.rest_port, app_protocol="http", failure_mode="FailOpen")
    path = f"/v2/models/{SEED_ISVC}"

    async def metadata_ok() -> bool:
        status, doc = await http_json(gw.gateway, "GET", path)
        # the answer names the InferenceService's current model
        return status == 200 and str(doc.get("name")).startswith(f"{SEED_ISVC}__isvc-")

    await wait_until(metadata_ok, 20, "the picker's REST gateway to answer")
    assert gw.epp is not None
    gw.epp.kill()
    for _ in range(6):
        assert await metadata_ok()


async def test_with_the_picker_down_fail_open_keeps_serving_and_picks_again_once_it_is_back(
    mesh: Stack,
) -> None:
    """FailOpen with the picker killed: at most the one request that finds it dead fails.

    Envoy fails open in FULL_DUPLEX_STREAMED only until a body chunk has gone to the
    picker, and a connection refused by a dead picker comes after the first chunk. The
    gateway's first refused connection ejects the picker and its health checks keep it
    out, so later requests open no stream and go on by the pool's round robin (a pod
    without the model forwards inside the mesh). Started again, the picker passes its
    health check and picks again: requests land on the holder, no pod forwards.
    """
    gw = await mesh.add_epp_gateway(mesh.pod_port, failure_mode="FailOpen")
    await wait_until(lambda: _answers_8(gw.gateway), 20, "the picker's gateway to answer")
    assert gw.epp is not None
    command = [str(a) for a in gw.epp.popen.args]  # type: ignore[union-attr]
    forwarded = sum(_counters(mesh, FORWARDED).values())
    gw.epp.kill()
    answers: list[str] = []
    for _ in range(30):
        try:
            answers.append("8" if await _answers_8(gw.gateway) else "wrong")
        except grpc.aio.AioRpcError as e:
            answers.append(e.code().name)
    assert answers.count("8") >= len(answers) - 1 and answers[-25:] == ["8"] * 25, answers
    # round robin reached pods without the model, which forwarded inside the mesh
    assert sum(_counters(mesh, FORWARDED).values()) > forwarded

    mesh.processes.remove(gw.epp)
    gw.epp = processes.spawn(gw.epp.name, command, mesh.workdir)
    mesh.processes.append(gw.epp)
    await asyncio.to_thread(processes.wait_for_port, gw.epp, "127.0.0.1", gw.epp_port)

    async def picking_again() -> bool:
        before = _counters(mesh, FORWARDED)
        answered = [await _answers_8(gw.gateway) for _ in range(5)]
        return all(answered) and _counters(mesh, FORWARDED) == before

    await wait_until(picking_again, 20, "the gateway to ask the picker again", interval=0.5)


async def _answers_8(address: str) -> bool:
    return await _infer(address, SEED_ISVC) == [8]
