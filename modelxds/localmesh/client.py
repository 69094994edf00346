"""The seed's inference requests, as the demo, tests and benchmarks send them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from typing import Any

import grpc

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh.train import SEED_INPUT

# the seed's REST request; KServe V2 protobuf JSON, so also a ModelInferRequest
SEED_REQUEST = {
    "inputs": [
        {
            "name": "predict",
            "shape": [1, 64],
            "datatype": "FP32",
            "contents": {"fp32_contents": SEED_INPUT},
        }
    ]
}
SEED_BODY = json.dumps(SEED_REQUEST).encode()
# the same request in the V2 REST protocol's own form, as tritonclient.http and KServe's
# docs send it; ModelMesh Serving's REST proxy takes both
SEED_DATA_REQUEST = {
    "inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": SEED_INPUT}]
}


def predicted_digit(doc: dict[str, Any]) -> int:
    """The digit in a V2 REST infer response, in either JSON form of its tensor."""
    out = doc["outputs"][0]
    if "data" in out:
        return int(out["data"][0])
    return int(out["contents"]["int64_contents"][0])


async def rest_seed(
    address: str, name: str, request: dict[str, Any] = SEED_REQUEST, path: str = "/infer"
) -> int:
    """POST the seed's REST payload (``request``) to ``/v2/models/<name><path>``; the
    predicted digit."""
    req = urllib.request.Request(
        f"http://{address}/v2/models/{name}{path}",
        data=json.dumps(request).encode(),
        headers={"content-type": "application/json"},
    )

    def send() -> dict[str, Any]:
        with urllib.request.urlopen(req, timeout=120) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    doc = await asyncio.to_thread(send)  # pods may run in this event loop: block a thread
    return predicted_digit(doc)


async def grpc_seed(
    address: str, name: str, headers: dict[str, str] | None = None
) -> pb.ModelInferResponse:
    """The seed's ModelInfer to ``address``, the model in the body (``model_name``) and in
    no header unless ``headers`` has it."""
    request = pb.ModelInferRequest(
        model_name=name,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="predict",
                datatype="FP32",
                shape=[1, 64],
                contents=pb.InferTensorContents(fp32_contents=SEED_INPUT),
            )
        ],
    )
    async with grpc.aio.insecure_channel(address) as channel:
        response: pb.ModelInferResponse = await pb_grpc.GRPCInferenceServiceStub(
            channel
        ).ModelInfer(request, metadata=tuple((headers or {}).items()), timeout=120)
        return response


async def triton_grpc(address: str, name: str, headers: dict[str, str] | None = None) -> Any:
    """The seed's input over gRPC with tritonclient; its ``predict`` output as a list."""
    return (await _tritonclient("triton_infer", address, name, headers))["predict"]


async def triton_http(
    address: str, name: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The seed's input with tritonclient.http in the V2 REST ``data`` form: ``predict``,
    ``ready`` (is_model_ready) and ``metadata`` (get_model_metadata)."""
    return await _tritonclient("triton_http", address, name, headers)


async def _tritonclient(
    module: str, address: str, name: str, headers: dict[str, str] | None
) -> dict[str, Any]:
    """Run ``modelxds.localmesh.<module>``, in a process of its own: tritonclient's protos
    share the ``inference`` package with ours, and one descriptor pool cannot hold both."""
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", f"modelxds.localmesh.{module}", address, name]
        + [f"{k}={v}" for k, v in (headers or {}).items()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if out.returncode != 0:
        raise RuntimeError(f"tritonclient failed: {out.stderr.strip()[-500:]}")
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc
