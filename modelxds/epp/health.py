"""gRPC health checking (``grpc.health.v1.Health``), as Kubernetes probes and the GIE
chart ask the endpoint picker: ``Check`` and ``Watch`` by service name.

``grpcio-health-checking`` is not a dependency; its two messages are declared here, in
a descriptor pool of their own so that they never clash with that package if it is
installed beside us.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "grpc.health.v1.Health"
SERVING = 1
NOT_SERVING = 2
SERVICE_UNKNOWN = 3


def _messages() -> tuple[type[Any], type[Any]]:
    f = descriptor_pb2.FileDescriptorProto(
        name="modelxds/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = f.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = f.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for i, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=i)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{f.package}.{request.name}")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{f.package}.{response.name}")),
    )


HealthCheckRequest, HealthCheckResponse = _messages()


class Health:
    """Answers for each service name with ``checks[name]()``: True is SERVING; a name
    not in ``checks`` is SERVICE_UNKNOWN (``Check``: NOT_FOUND, as the gRPC spec says)."""

    def __init__(self, checks: Mapping[str, Callable[[], bool]], *, poll: float = 1.0) -> None:
        self.checks = checks
        self.poll = poll

    def status(self, service: str) -> int:
        check = self.checks.get(service)
        if check is None:
            return SERVICE_UNKNOWN
        return SERVING if check() else NOT_SERVING

    async def check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self.status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return HealthCheckResponse(status=status)

    async def watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self.poll)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=HealthCheckRequest.FromString,
                    response_serializer=HealthCheckResponse.SerializeToString,
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch,
                    request_deserializer=HealthCheckRequest.FromString,
                    response_serializer=HealthCheckResponse.SerializeToString,
                ),
            },
        )
