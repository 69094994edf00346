"""Health of a long-running command (`serve`, `label`, `epp`): Kubernetes probes and load
balancers ask it over gRPC (``grpc.health.v1.Health``, on the command's own gRPC port)
and over HTTP (``/healthz``, ``/readyz``, beside ``/metrics`` on the metrics address).

A check answers None when healthy, else why not in one line: the same reason goes into
the ``/readyz`` body, so an operator reading a failed probe sees what the process waits
for.

``grpcio-health-checking`` is not a dependency; its two messages are declared here, in
a descriptor pool of their own so that they never clash with that package if it is
installed beside us.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc
from aiohttp import web
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from modelxds.xds.bootstrap import split_address

SERVICE = "grpc.health.v1.Health"
SERVING = 1
NOT_SERVING = 2
SERVICE_UNKNOWN = 3
DEFAULT_READY_ETCD_GRACE_S = 60.0

# None: healthy; else the reason it is not, one line
Check = Callable[[], str | None]


def alive() -> str | None:
    """Liveness: answering at all means the event loop runs, which is all it claims."""
    return None


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
    """``grpc.health.v1.Health``: answers for each service name with ``checks[name]()``;
    a name not in ``checks`` is SERVICE_UNKNOWN (``Check``: NOT_FOUND, as the gRPC spec
    says)."""

    def __init__(self, checks: Mapping[str, Check], *, poll: float = 1.0) -> None:
        self.checks = checks
        self.poll = poll

    @classmethod
    def probes(cls, ready: Check, **more: Check) -> Health:
        """The names every command answers: "" (the server as a whole) and ``readiness``
        by ``ready``, ``liveness`` by the loop, and ``more`` by service name."""
        return cls({"": ready, "liveness": alive, "readiness": ready, **more})

    def status(self, service: str) -> int:
        check = self.checks.get(service)
        if check is None:
            return SERVICE_UNKNOWN
        return SERVING if check() is None else NOT_SERVING

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


class EtcdContact(Protocol):
    """What readiness reads of a PlacementWatcher."""

    def unreachable_for(self, now: float | None = None) -> float: ...


def readiness(
    etcd: EtcdContact,
    grace_s: float,
    waits: Sequence[tuple[Callable[[], bool], str]],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Check:
    """Ready once every ``waits`` condition holds (else its reason, the first unmet),
    and not while etcd has been unreachable for longer than ``grace_s``: a replica
    whose placement may be that old should leave the Service to one that can see etcd,
    while a short etcd blip (a leader election, a rolling restart) moves nobody."""

    def check() -> str | None:
        for done, reason in waits:
            if not done():
                return reason
        out = etcd.unreachable_for(clock())
        if out > grace_s:
            return f"etcd unreachable for {out:.0f}s (more than --ready-etcd-grace-s {grace_s:g})"
        return None

    return check


def _answer(check: Check) -> web.Response:
    why = check()
    if why is None:
        return web.Response(text="ok\n")
    return web.Response(status=503, text=f"{why}\n")


async def start_http(address: str, ready: Check) -> web.AppRunner:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``address`` (HOST:PORT; no host: all
    interfaces). OSError if it cannot listen; ``cleanup()`` the runner to stop."""

    async def metrics(_: web.Request) -> web.Response:
        # generate_latest may take a while with many series: off the loop, as
        # prometheus_client's own server does in its thread
        body = await asyncio.to_thread(generate_latest, REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return _answer(alive)

    async def readyz(_: web.Request) -> web.Response:
        return _answer(ready)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    host, port = split_address(address, "0.0.0.0")
    runner = web.AppRunner(app, access_log=None)  # no line per scrape or probe
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
