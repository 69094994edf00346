"""Each local mesh pod's REST proxy (ModelMesh Serving's port 8008) on real MLServer:
a real tritonclient.http, raw JSON in both forms, and ModelMesh routing through REST."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from modelxds.localmesh import isvc
from modelxds.localmesh.client import SEED_BODY, triton_http
from modelxds.localmesh.stack import Stack, wait_until
from modelxds.localmesh.train import SEED_INPUT
from tests.e2e.gwclient import http_json

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / ".run" / "models"
SEED_ISVC = "example-mnist-isvc"
LOCAL = "modelmesh_local_requests_total"
FORWARDED = "modelmesh_forwarded_requests_total"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    if not (MODELS / "sklearn" / "mnist-svm.joblib").exists():
        pytest.fail(f"sample models missing in {MODELS}: run `make models`")
    # two pods: one holds the seed's model, the other must forward to it
    stack = Stack(tmp_path_factory.mktemp("rest"), pods=2, runtime="mlserver", storage_dir=MODELS)
    await stack.start()
    try:
        (service,) = isvc.read_files([str(ROOT / "manifests/examples/example-mnist-isvc.yaml")])
        await isvc.apply(stack.etcd, stack.layout, service)

        async def up_to_date() -> bool:
            return any(
                r["name"] == SEED_ISVC and r["state"] == "UpToDate"
                for r in await stack.isvc_status()
            )

        await wait_until(up_to_date, 90, f"{SEED_ISVC} to load", interval=0.2)
        yield stack
    finally:
        await stack.stop()


async def _holder(mesh: Stack) -> tuple[str, str]:
    """(the pod holding the seed's model, the other pod)."""
    row = next(r for r in await mesh.isvc_status() if r["name"] == SEED_ISVC)
    (holder,) = row["active_copies"]
    return holder, next(i for i in mesh.nodes if i != holder)


def _counters(mesh: Stack, name: str) -> dict[str, float]:
    return {iid: mesh.node_counters(iid).get(name, 0.0) for iid in mesh.nodes}


async def _post(
    address: str, name: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """curl -X POST http://<address>/v2/models/<name>/infer: (status, JSON body)."""
    return await http_json(address, "POST", f"/v2/models/{name}/infer", body, headers)


def _data_form(nested: bool) -> bytes:
    data: list[Any] = [SEED_INPUT] if nested else SEED_INPUT
    tensor = {"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def _digit(doc: dict[str, Any]) -> int:
    (output,) = doc["outputs"]
    return int(output["data"][0])


async def test_tritonclient_http_infers_reads_readiness_and_metadata(mesh: Stack) -> None:
    holder, _ = await _holder(mesh)
    doc = await triton_http(mesh.rest_address(holder), SEED_ISVC)
    assert doc["predict"] == [[8]]
    assert doc["ready"] is True
    # MLServer's own metadata of the model the InferenceService resolves to
    assert doc["metadata"]["name"].startswith(f"{SEED_ISVC}__isvc-")
    assert {"platform", "inputs", "outputs"} <= set(doc["metadata"])


async def test_raw_json_in_the_data_and_the_contents_form_answers_8(mesh: Stack) -> None:
    holder, other = await _holder(mesh)
    for address in (mesh.rest_address(holder), mesh.rest_address(other)):
        for body in (_data_form(nested=False), _data_form(nested=True), SEED_BODY):
            status, doc = await _post(address, SEED_ISVC, body)
            assert (status, _digit(doc)) == (200, 8), doc
            assert doc["outputs"][0]["datatype"] == "INT64"

    status, doc = await _post(mesh.rest_address(holder), "no-such-model", SEED_BODY)
    assert (status, doc["code"]) == (404, 5) and doc["error"] == doc["message"]
    status, doc = await _post(mesh.rest_address(holder), SEED_ISVC, b'{"inputs": [], "x": 1}')
    assert (status, doc["code"]) == (400, 3) and "x: unknown field" in doc["error"]


async def test_modelmesh_routing_through_the_rest_port(mesh: Stack) -> None:
    holder, other = await _holder(mesh)

    # mm-balanced (as Grpc-Metadata-) at the holder: served there, no hop anywhere
    local, forwarded = _counters(mesh, LOCAL), _counters(mesh, FORWARDED)
    status, doc = await _post(
        mesh.rest_address(holder),
        SEED_ISVC,
        _data_form(nested=False),
        {"grpc-metadata-mm-balanced": "true"},
    )
    assert (status, _digit(doc)) == (200, 8)
    assert _counters(mesh, LOCAL) == {**local, holder: local[holder] + 1}
    assert _counters(mesh, FORWARDED) == forwarded

    # no header, at the pod without the model: forwarded once to the holder
    local, forwarded = _counters(mesh, LOCAL), _counters(mesh, FORWARDED)
    status, doc = await _post(mesh.rest_address(other), SEED_ISVC, _data_form(nested=False))
    assert (status, _digit(doc)) == (200, 8)
    assert _counters(mesh, FORWARDED) == {**forwarded, other: forwarded[other] + 1}
    assert _counters(mesh, LOCAL) == {**local, holder: local[holder] + 1}
