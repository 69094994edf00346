"""KServe V2 REST through a real Envoy: to the holder's REST proxy by the model in the path,
whatever form the path takes; errors a V2 client understands."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from modelxds.localmesh import processes
from modelxds.localmesh.stack import Stack, pod_host, pod_instance_id, seed_policy, wait_until
from tests.e2e.gwclient import Client, http_json, rest_bytes

pytestmark = pytest.mark.e2e

LOADED_LONG_AGO = 1  # epoch ms: a copy whose load started long ago counts as loaded
MODEL = "example-mnist-isvc"


async def _http(
    stack: Stack, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    return await http_json(stack.gateway, method, path, data)


def _infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}


def _stack(workdir: Path, fallback: str, *serve_args: str) -> Stack:
    # the policy names the gateway and pod ports: pick them before the stack does
    gateway_port, pod_port = processes.free_port(), processes.free_port(pod_host(0))
    return Stack(
        workdir,
        pod_port=pod_port,
        gateway_port=gateway_port,
        policy_text=seed_policy(gateway_port, pod_port).replace(
            "fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {fallback}"
        ),
        serve_args=serve_args,
    )


@pytest_asyncio.fixture(params=["subset", "scale"])
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """Three sample pods, each with a REST proxy; NO_FALLBACK so a miss shows as an error."""
    s = _stack(tmp_path / "stack", "NO_FALLBACK", "--strategy", request.param)
    await s.start()
    try:
        holder = pod_instance_id(1)
        await s.pod(holder)[1].add_copy(MODEL, started_ms=LOADED_LONG_AGO)
        client = Client(s)
        try:
            await _until_rest_reaches(client, holder)
        finally:
            await client.close()
        yield s
    finally:
        await s.stop()


async def _until_rest_reaches(client: Client, holder: str) -> None:
    for _ in range(100):
        try:
            if await client.rest(MODEL) == holder:
                return
        except urllib.error.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"REST for {MODEL} never reached {holder}")


async def test_rest_paths_as_clients_send_them_reach_the_holders_rest_proxy(
    stack: Stack,
) -> None:
    holder, _ = stack.pod(pod_instance_id(1))
    for path in (
        f"/v2/models/{MODEL}/infer",
        f"/v2/models/{MODEL}/infer?x=1",
        f"/v2/models/{MODEL}/versions/1/infer",
        # percent-encoded, decoded once: the same name
        "/v2/models/example%2Dmnist%2Disvc/infer",
    ):
        status, doc = await _http(stack, "POST", path, _infer_body())
        assert status == 200, (path, doc)
        instance = next(o for o in doc["outputs"] if o["name"] == "instance")
        assert rest_bytes(instance) == [holder.instance_id.encode()], path
    # the holder serves its own copy: the REST proxy passed grpc-metadata-mm-balanced on
    assert holder.last_metadata.get("mm-balanced") == "true"
    before = holder.inspected[MODEL]
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/ready?q"):
        status, doc = await _http(stack, "GET", path)
        assert status == 200, (path, doc)
    assert holder.inspected[MODEL] == before + 3  # metadata and readiness, from the holder


async def test_no_fallback_answers_404_over_rest_and_not_found_over_grpc(stack: Stack) -> None:
    status, doc = await _http(stack, "POST", "/v2/models/never-loaded/infer", _infer_body())
    assert status == 404
    assert "no pod holds" in doc["error"] and "NO_FALLBACK" in doc["error"]
    client = Client(stack)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.grpc("x", [("model", "never-loaded")])
    finally:
        await client.close()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no pod holds" in (err.value.details() or "")


async def test_rest_outside_the_v2_api_is_400_naming_the_paths_and_headers_expected(
    stack: Stack,
) -> None:
    for headers in ({}, {"model": MODEL}):  # a model header does not make it a V2 call
        status, doc = await http_json(
            stack.gateway, "POST", "/predict", json.dumps(_infer_body()).encode(), headers
        )
        assert status == 400, headers
        assert "/v2/models/{name}/infer" in doc["error"] and "mm-vmodel-id" in doc["error"]


async def test_no_fallback_with_no_pod_left_answers_503_not_404(stack: Stack) -> None:
    for reg in stack.registrations:
        await reg.stop(revoke=True)  # every pod's lease, and so its records, gone

    client = Client(stack)

    async def unavailable() -> bool:
        # REST's and gRPC's routes are separate tables (scale strategy): Envoy may apply
        # one a moment before the other, so wait for both to see no pod
        status, _ = await _http(stack, "POST", f"/v2/models/{MODEL}/infer", _infer_body())
        if status != 503:
            return False
        try:
            await client.grpc("x", [("model", MODEL)])
        except grpc.aio.AioRpcError:
            return True
        return False

    try:
        await wait_until(unavailable, 15, "the gateway to see no pod")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.grpc("x", [("model", MODEL)])
    finally:
        await client.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("strategy", ["subset", "scale"])
async def test_transcode_mode_serves_the_contents_form_and_refuses_the_data_form(
    tmp_path: Path, strategy: str
) -> None:
    s = _stack(tmp_path / "stack", "NO_FALLBACK", "--strategy", strategy, "--rest", "transcode")
    await s.start()
    client = Client(s)
    try:
        holder = pod_instance_id(2)
        await s.pod(holder)[1].add_copy(MODEL, started_ms=LOADED_LONG_AGO)
        await _until_rest_reaches(client, holder)  # Client.rest sends the contents form
        served = s.pod(holder)[0].served[MODEL]
        status, doc = await _http(s, "POST", f"/v2/models/{MODEL}/infer", _infer_body())
        assert status == 400
        assert "contents" in doc["error"] and "--rest proxy" in doc["error"]
        # never passed on as an empty tensor
        assert s.pod(holder)[0].served[MODEL] == served
        # a model no pod holds: 404 over transcoded REST too, not the 501 of UNIMPLEMENTED
        with pytest.raises(urllib.error.HTTPError) as err:
            await client.rest("never-loaded")
        assert err.value.code == 404
        status, doc = await _http(s, "POST", "/predict", _infer_body())
        assert status == 400 and "/v2/models/{name}/infer" in doc["error"]
    finally:
        await client.close()
        await s.stop()
