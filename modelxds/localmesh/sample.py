"""A stand-in for one ModelMesh pod: a KServe V2 gRPC server that serves every model.

It does no real inference. Each ModelInfer answer names the pod instance and the
model that were hit, so `make run` and end-to-end tests can check which pod the
gateway routed a request to, and the pod remembers the ModelMesh routing headers
it last received so tests can check what the gateway sent. With a REST port it runs
the same REST proxy in front of its gRPC port as a local mesh pod does.

Run on its own with ``--etcd``, it registers in etcd as a ModelMesh pod does (litelinks
and instance records under a lease it renews): a pod of its own process, which a test
can SIGKILL (its lease then runs out) or SIGSTOP (up, but not answering).

    python -m modelxds.localmesh.sample --host 127.0.0.11 --port 8033 --instance-id 7dd689-4zwqs
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import sys
from collections.abc import Sequence

import grpc

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.kserve.health import AlwaysServing
from modelxds.localmesh.restproxy import RestProxy
from modelxds.modelmesh import Layout
from modelxds.modelmesh.registrar import PodRegistration, etcd_client
from modelxds.xds.bootstrap import join_address

log = logging.getLogger(__name__)

# Request metadata that ModelMesh uses for routing; the gateway is expected to
# set these, so they are what tests want to observe on the pod side.
ROUTING_METADATA_KEYS = ("mm-balanced", "mm-vmodel-id", "mm-model-id")
# A request carrying this is answered that many milliseconds late: a test can have a
# request in flight at a pod when it breaks the pod
DELAY_HEADER = "x-sample-delay-ms"


class SampleBackend:
    """One fake pod listening on exactly ``host:port``.

    Pass ``port=0`` to let the OS choose; ``address`` reports the real port after start().
    """

    def __init__(self, host: str, port: int, instance_id: str, rest_port: int = 0) -> None:
        self.host = host
        self.port = port
        self.rest_port = rest_port  # 0: no REST proxy
        self.instance_id = instance_id
        self.served: collections.Counter[str] = collections.Counter()
        # ModelMetadata / ModelReady calls by model name: which pod a REST GET reached
        self.inspected: collections.Counter[str] = collections.Counter()
        self.last_metadata: dict[str, str] = {}
        self._server: grpc.aio.Server | None = None
        self._rest: RestProxy | None = None

    @property
    def address(self) -> str:
        return join_address(self.host, self.port)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"backend {self.instance_id} already started")
        # gRPC sets SO_REUSEPORT by default, which would let a second backend
        # (or a leftover one) silently share this address and split the traffic
        # that tests attribute to a single pod. Fail to bind instead.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), server)
        bound: int = server.add_insecure_port(self.address)
        if bound == 0:
            # Some grpcio versions report a failed bind as port 0 instead of raising.
            raise RuntimeError(f"backend {self.instance_id} could not bind {self.address}")
        self.port = bound
        await server.start()
        self._server = server
        if self.rest_port:
            self._rest = RestProxy(self.host, self.rest_port, self.address)
            await self._rest.start()
        log.info("sample backend %s listening on %s", self.instance_id, self.address)

    async def stop(self, grace: float = 0.5) -> None:
        if self._rest is not None:
            rest, self._rest = self._rest, None
            await rest.stop()
        if self._server is None:
            return
        server, self._server = self._server, None
        await server.stop(grace)


class _Servicer(AlwaysServing):
    """The RPC handlers; registered by method name, so no generated base class is needed."""

    def __init__(self, backend: SampleBackend) -> None:
        self._backend = backend

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        self._backend.inspected[request.name] += 1
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        # The instance id as "version" lets a REST `GET /v2` through the gateway show the pod too.
        return pb.ServerMetadataResponse(name="modelxds-sample", version=self._backend.instance_id)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        self._backend.inspected[request.name] += 1
        return pb.ModelMetadataResponse(name=request.name, platform="sample")

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        backend = self._backend
        model_name = request.model_name
        metadata = dict(context.invocation_metadata() or ())
        delay_ms = metadata.get(DELAY_HEADER)
        if isinstance(delay_ms, str) and delay_ms.isdigit():
            await asyncio.sleep(int(delay_ms) / 1000)
        backend.served[model_name] += 1
        backend.last_metadata = {
            key: value
            for key, value in metadata.items()
            if key in ROUTING_METADATA_KEYS and isinstance(value, str)
        }
        return pb.ModelInferResponse(
            model_name=model_name,
            model_version=request.model_version,
            id=request.id,
            outputs=[
                _bytes_output("instance", backend.instance_id),
                _bytes_output("model", model_name),
            ],
        )


def _bytes_output(name: str, value: str) -> pb.ModelInferResponse.InferOutputTensor:
    return pb.ModelInferResponse.InferOutputTensor(
        name=name,
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[value.encode()]),
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modelxds.localmesh.sample",
        description="Run one fake ModelMesh pod (KServe V2 gRPC) until SIGINT/SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8033)
    parser.add_argument("--rest-port", type=int, default=8008, help="REST proxy port (0: none)")
    parser.add_argument("--instance-id", required=True, help="pod name suffix, e.g. 7dd689-4zwqs")
    parser.add_argument("--etcd", help="register in this etcd (http://host:port) as a pod")
    parser.add_argument("--root-prefix", default="modelmesh-serving")
    parser.add_argument("--service-name", default="modelmesh-serving")
    parser.add_argument("--lease-ttl", type=int, default=10, help="seconds")
    return parser.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    backend = SampleBackend(args.host, args.port, args.instance_id, args.rest_port)
    await backend.start()
    registration = None
    if args.etcd:
        client = etcd_client(args.etcd)
        await client.connect()
        layout = Layout(args.root_prefix, args.service_name)
        registration = PodRegistration(
            client, layout, args.instance_id, args.host, ttl=args.lease_ttl
        )
        await registration.register()  # after start: listed only once it listens

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        if registration is not None:
            await registration.stop(revoke=True)  # a clean shutdown leaves at once
            await registration.client.close()
        await backend.stop()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(asyncio.run(main(sys.argv[1:])))
