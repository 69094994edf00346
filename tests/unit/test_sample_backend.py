import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh.sample import SampleBackend


def _free_port() -> int:
    # Every fake pod listens on the same port on its own loopback address, so
    # probe one of those addresses rather than 127.0.0.1.
    with socket.socket() as probe:
        probe.bind(("127.0.0.11", 0))
        port: int = probe.getsockname()[1]
        return port


async def _infer(
    address: str, model: str, metadata: tuple[tuple[str, str], ...] = ()
) -> pb.ModelInferResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response: pb.ModelInferResponse = await stub.ModelInfer(
            pb.ModelInferRequest(model_name=model, id="req-1"), metadata=metadata, timeout=5
        )
        return response


def _outputs(response: pb.ModelInferResponse) -> dict[str, bytes]:
    return {out.name: out.contents.bytes_contents[0] for out in response.outputs}


@pytest.fixture
async def pods() -> AsyncIterator[list[SampleBackend]]:
    port = _free_port()
    backends = [
        SampleBackend("127.0.0.11", port, "7dd689-4zwqs"),
        SampleBackend("127.0.0.12", port, "7dd689-9xk2p"),
    ]
    for backend in backends:
        await backend.start()
    yield backends
    for backend in backends:
        await backend.stop()


async def test_each_pod_names_itself_and_the_model(pods: list[SampleBackend]) -> None:
    first, second = pods
    assert first.address.rsplit(":", 1)[1] == second.address.rsplit(":", 1)[1]

    routing = (("mm-balanced", "true"), ("mm-vmodel-id", "mnist"))
    a = await _infer(first.address, "mnist__isvc-6b1c", routing)
    b = await _infer(second.address, "iris__isvc-0f2e", (("mm-balanced", "true"),))

    assert (a.model_name, a.id) == ("mnist__isvc-6b1c", "req-1")
    assert _outputs(a) == {"instance": b"7dd689-4zwqs", "model": b"mnist__isvc-6b1c"}
    assert _outputs(b) == {"instance": b"7dd689-9xk2p", "model": b"iris__isvc-0f2e"}
    assert a.outputs[0].datatype == "BYTES"
    assert list(a.outputs[0].shape) == [1]

    assert first.last_metadata == {"mm-balanced": "true", "mm-vmodel-id": "mnist"}
    assert second.last_metadata == {"mm-balanced": "true"}
    assert first.served == {"mnist__isvc-6b1c": 1}
    assert second.served == {"iris__isvc-0f2e": 1}


async def test_last_metadata_is_replaced_per_request(pods: list[SampleBackend]) -> None:
    pod = pods[0]
    await _infer(pod.address, "m", (("mm-balanced", "true"), ("mm-model-id", "m-v1")))
    await _infer(pod.address, "m")
    assert pod.last_metadata == {}
    assert pod.served["m"] == 2


async def test_health_and_metadata(pods: list[SampleBackend]) -> None:
    async with grpc.aio.insecure_channel(pods[0].address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="anything"))).ready
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
        assert (meta.name, meta.platform) == ("mnist", "sample")


async def test_address_already_served_is_refused(pods: list[SampleBackend]) -> None:
    host, port = pods[0].address.rsplit(":", 1)
    duplicate = SampleBackend(host, int(port), "impostor")
    with pytest.raises(RuntimeError):
        await duplicate.start()
    await duplicate.stop()


async def test_port_zero_reports_the_bound_port() -> None:
    backend = SampleBackend("127.0.0.13", 0, "solo")
    await backend.start()
    try:
        assert not backend.address.endswith(":0")
        assert _outputs(await _infer(backend.address, "m"))["instance"] == b"solo"
    finally:
        await backend.stop()


async def test_module_entry_point_stops_cleanly_on_sigterm() -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelxds.localmesh.sample",
        "--host",
        "127.0.0.11",
        "--port",
        str(port),
        "--instance-id",
        "cli-pod",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = f"127.0.0.11:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=20)
        assert _outputs(await _infer(address, "m"))["instance"] == b"cli-pod"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
