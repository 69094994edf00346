"""A KServe V2 client that reports which pod answered a request sent through the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh.stack import Stack


class Client:
    """Sends KServe V2 inference through the gateway and reports which pod answered."""

    def __init__(self, stack: Stack, gateway: str | None = None) -> None:
        self.stack = stack
        self.gateway = gateway or stack.gateway  # host:port of one of its listeners
        self.channel = grpc.aio.insecure_channel(self.gateway)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def grpc(self, model: str, headers: Sequence[tuple[str, str]] = ()) -> str:
        resp = await self.stub.ModelInfer(
            pb.ModelInferRequest(model_name=model), metadata=tuple(headers), timeout=10
        )
        return _instance(resp.outputs[0].contents.bytes_contents[0])

    async def rest(self, model: str, headers: dict[str, str] | None = None) -> str:
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 2],
                        "datatype": "FP32",
                        "contents": {"fp32_contents": [1, 2]},
                    }
                ]
            }
        ).encode()
        req = urllib.request.Request(
            f"http://{self.gateway}/v2/models/{model}/infer",
            data=body,
            headers={"content-type": "application/json", **(headers or {})},
        )

        def send() -> bytes:
            with urllib.request.urlopen(req, timeout=10) as r:
                return bytes(r.read())

        # the pods run in this event loop: block a thread, not the loop
        doc = json.loads(await asyncio.to_thread(send))
        out = next(o for o in doc["outputs"] if o["name"] == "instance")
        return rest_bytes(out)[0].decode()

    async def close(self) -> None:
        await self.channel.close()


async def answers(client: Client, model: str, holder: str) -> bool:
    """Whether a gRPC request for ``model`` (by header) reaches ``holder``; False on error."""
    try:
        return await client.grpc("x", [("model", model)]) == holder
    except grpc.aio.AioRpcError:
        return False


async def http_json(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTP request, as curl sends it: (status, JSON body), errors too; an empty body
    is {}, one that is not JSON {"text": ...}."""
    req = urllib.request.Request(
        f"http://{address}{path}",
        method=method,
        data=body,
        headers={"content-type": "application/json", **(headers or {})},
    )

    def send() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, bytes(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, raw = await asyncio.to_thread(send)  # the pods may run in this event loop
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:  # Envoy's own plain-text answers ("no healthy upstream")
        return status, {"text": raw.decode(errors="replace")}


def _instance(raw: bytes) -> str:
    return raw.decode()


def rest_bytes(output: dict[str, Any]) -> list[bytes]:
    """A BYTES output of a V2 REST response, in either JSON form."""
    if "data" in output:  # a pod's REST proxy: base64 when it says so, as rest-proxy does
        if output.get("parameters", {}).get("content_type") == "base64":
            return [base64.b64decode(v) for v in output["data"]]
        return [str(v).encode() for v in output["data"]]
    # transcoded by the gateway: protobuf JSON, bytes in base64
    return [base64.b64decode(v) for v in output["contents"]["bytes_contents"]]


def xds_status(address: str) -> list[dict[str, Any]]:
    """`modelxds status --json` of the control plane at ``address``: per gateway, the
    config status of each xDS type."""
    out = subprocess.run(
        [sys.executable, "-m", "modelxds.cli", "status", "--xds", address, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


async def gateway_status(stack: Stack) -> list[dict[str, Any]]:
    """`modelxds status --json` of the stack's `modelxds serve`."""
    return await asyncio.to_thread(xds_status, f"127.0.0.1:{stack.xds_port}")


@asynccontextmanager
async def serving(stack: Stack) -> AsyncIterator[Client]:
    """``stack`` started, with a client of its gateway; both closed when the block ends."""
    await stack.start()
    try:
        client = Client(stack)
        try:
            yield client
        finally:
            await client.close()
    finally:
        await stack.stop()
