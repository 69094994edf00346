"""The local mesh's REST proxy (restproxy.py): routes, headers, errors, and the HTTP
plumbing against an in-process gRPC server (no processes)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.kserve.health import AlwaysServing
from modelxds.localmesh.restproxy import (
    RestProxy,
    Route,
    error_body,
    grpc_metadata,
    http_status,
    match_route,
)
from modelxds.localmesh.v2json import RestError


def _body(*inputs: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **top}).encode()


# ---------------------------------------------------------------------- errors


def test_error_bodies_carry_grpc_gateways_and_the_v2_protocols_keys() -> None:
    assert error_body(grpc.StatusCode.NOT_FOUND, "no such model") == {
        "code": 5,
        "message": "no such model",
        "error": "no such model",
    }
    statuses = {
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.CANCELLED: 499,
    }
    assert {c: http_status(c) for c in statuses} == statuses


# ---------------------------------------------------------------------- routes and headers


def test_routes() -> None:
    assert match_route("POST", "/v2/models/mnist/infer") == Route("infer", "mnist")
    assert match_route("POST", "/v2/models/mnist/versions/2/infer?x=1") == Route(
        "infer", "mnist", "2"
    )
    assert match_route("GET", "/v2/models/a%2Fb%2520c") == Route("model_metadata", "a/b%20c")
    assert match_route("GET", "/v2/models/m/versions/3") == Route("model_metadata", "m", "3")
    assert match_route("GET", "/v2/models/m/ready") == Route("model_ready", "m")
    assert match_route("GET", "/v2/models/m/versions/3/ready") == Route("model_ready", "m", "3")
    assert match_route("GET", "/v2/health/live") == Route("live")
    assert match_route("GET", "/v2/health/ready?verbose") == Route("ready")
    assert match_route("GET", "/v2") == Route("server_metadata")
    for path in ("/v2/models", "/v1/models/m:predict", "/v2/models/m/explain", "/v2/"):
        with pytest.raises(RestError) as err:
            match_route("GET", path)
        assert (http_status(err.value.code), err.value.message) == (404, "Not Found")
    with pytest.raises(RestError) as err:
        match_route("GET", "/v2/models/m/infer")
    assert (http_status(err.value.code), err.value.message) == (501, "Method Not Allowed")


def test_only_grpc_metadata_headers_and_grpc_gateways_defaults_are_forwarded() -> None:
    bin_value = base64.b64encode(b"\x00\x01").decode().rstrip("=")
    metadata, timeout = grpc_metadata(
        [
            ("Grpc-Metadata-Mm-Balanced", "true"),
            ("grpc-metadata-mm-vmodel-id", "mnist"),
            ("Grpc-Metadata-Trace-Bin", bin_value),
            ("Grpc-Metadata-Grpc-Encoding", "gzip"),  # gRPC's own: dropped
            ("model", "mnist"),  # the gateway's routing header: not forwarded
            ("mm-balanced", "true"),  # only with the prefix
            ("X-Custom", "1"),
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer t"),
            ("Grpc-Timeout", "1500m"),
        ],
        remote="10.0.0.9",
        host="127.0.0.11:8008",
    )
    assert metadata == [
        ("mm-balanced", "true"),
        ("mm-vmodel-id", "mnist"),
        ("trace-bin", b"\x00\x01"),
        ("grpcgateway-content-type", "application/json"),
        ("authorization", "Bearer t"),
        ("grpcgateway-authorization", "Bearer t"),
        ("x-forwarded-host", "127.0.0.11:8008"),
        ("x-forwarded-for", "10.0.0.9"),
    ]
    assert timeout == 1.5
    more, _ = grpc_metadata([("X-Forwarded-For", "1.2.3.4")], remote="10.0.0.9")
    assert more == [("x-forwarded-for", "1.2.3.4, 10.0.0.9")]
    for bad in ([("Grpc-Timeout", "soon")], [("Grpc-Metadata-Bad Key", "x")]):
        with pytest.raises(RestError):
            grpc_metadata(bad)


# ---------------------------------------------------------------------- HTTP plumbing


class _Pod(AlwaysServing):
    """A pod's gRPC port: answers 8 for ``mnist``, NOT_FOUND otherwise; keeps metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def _seen(self, context: grpc.aio.ServicerContext) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        self._seen(context)
        if request.model_name != "mnist":
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} is not registered"
            )
        response = pb.ModelInferResponse(model_name="mnist__isvc-1", id=request.id)
        response.outputs.add(
            name="predict", datatype="INT64", shape=[1, 1]
        ).contents.int64_contents.append(8)
        return response

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == "mnist")

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return pb.ModelMetadataResponse(name="mnist__isvc-1", platform="mlserver")

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="pod", version="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[_Pod, str]]:
    pod = _Pod()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(pod, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = RestProxy("127.0.0.1", _free_port(), f"127.0.0.1:{grpc_port}")
    await proxy.start()
    try:
        yield pod, f"http://127.0.0.1:{proxy.port}"
    finally:
        await proxy.stop()
        await server.stop(0)


async def test_rest_calls_the_pods_grpc_port(proxied: tuple[_Pod, str]) -> None:
    pod, url = proxied
    body = _body({"name": "predict", "datatype": "FP32", "shape": [1, 2], "data": [[1, 2]]}, id="r")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}/v2/models/mnist/infer", data=body, headers={"grpc-metadata-mm-balanced": "true"}
        ) as r:
            assert (r.status, r.content_type) == (200, "application/json")
            assert await r.json() == {
                "model_name": "mnist__isvc-1",
                "id": "r",
                "outputs": [{"name": "predict", "datatype": "INT64", "shape": [1, 1], "data": [8]}],
            }
        assert pod.metadata[-1]["mm-balanced"] == "true"

        async with http.post(f"{url}/v2/models/nope/infer", data=body) as r:
            assert r.status == 404
            assert await r.json() == {
                "code": 5,
                "message": "model 'nope' is not registered",
                "error": "model 'nope' is not registered",
            }
        async with http.post(f"{url}/v2/models/mnist/infer", data=b"{") as r:
            doc = await r.json()
            assert (r.status, doc["code"]) == (400, 3) and "not JSON" in doc["error"]
        async with http.get(f"{url}/v2/models/mnist/infer") as r:
            assert (r.status, (await r.json())["code"]) == (501, 12)

        async with http.get(f"{url}/v2/models/mnist/ready") as r:
            assert (r.status, await r.json()) == (200, {"name": "mnist", "ready": True})
        async with http.get(f"{url}/v2/models/other/ready") as r:
            assert r.status == 400
        async with http.get(f"{url}/v2/models/mnist") as r:
            assert (await r.json())["platform"] == "mlserver"
        async with http.get(f"{url}/v2/health/live") as r:
            assert r.status == 200
        async with http.get(f"{url}/v2/health/ready") as r:
            assert r.status == 200
        async with http.get(f"{url}/v2") as r:
            assert await r.json() == {"name": "pod", "version": "1", "extensions": []}


async def test_an_unreachable_grpc_port_is_a_503() -> None:
    proxy = RestProxy("127.0.0.1", _free_port(), f"127.0.0.1:{_free_port()}")
    await proxy.start()
    try:
        url = f"http://127.0.0.1:{proxy.port}/v2/health/live"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            doc = await r.json()
            assert (r.status, doc["code"]) == (503, 14) and doc["error"] == doc["message"]
    finally:
        await proxy.stop()
