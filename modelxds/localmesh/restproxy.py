"""ModelMesh Serving's REST proxy for one local mesh pod: KServe V2 REST on <pod>:8008,
sent as KServe V2 gRPC to the pod's own ModelMesh port, as kserve/rest-proxy does.

Because every REST request becomes a gRPC call on the pod's own port, the REST port has
exactly the gRPC port's routing: ModelMesh forwarding, ``mm-balanced`` and loading on a
miss. Nothing is counted here; the pod's gRPC side counts what it serves or forwards.

The JSON <-> protobuf conversion is v2json.py; the routing, header forwarding and error
mapping here are pure functions too (``match_route``, ``grpc_metadata``, ``http_status``,
...); ``RestProxy`` is only the HTTP plumbing around them.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh.v2json import (
    RestError,
    _b64decode,
    _bad,
    infer_response_json,
    model_metadata_json,
    parse_infer_request,
    server_metadata_json,
)

log = logging.getLogger(__name__)

# rest-proxy's defaults (REST_PROXY_LISTEN_PORT, REST_PROXY_GRPC_PORT, REST_PROXY_GRPC_MAX_MSG_SIZE)
REST_PORT = 8008
GRPC_PORT = 8033
MAX_GRPC_MESSAGE = 16 * 1024 * 1024
# JSON spells numbers out, so a body is several times the size of its tensors
MAX_BODY = 8 * MAX_GRPC_MESSAGE
# grpc-gateway sets no deadline unless Grpc-Timeout asks; a load may take minutes, so
# wait as long as one pod waits for another
DEFAULT_TIMEOUT = 300.0

# ---------------------------------------------------------------------- errors

# grpc-gateway v2's runtime.HTTPStatusFromCode (rest-proxy is built on grpc-gateway 2.15)
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    """rest-proxy answers errors with grpc-gateway's google.rpc.Status JSON,
    ``{"code": <gRPC code>, "message": ...}``; the KServe V2 REST protocol (and
    tritonclient.http, which reads ``error``) wants ``{"error": ...}``. Both, so either
    kind of client reads it."""
    return {"code": code.value[0], "message": message, "error": message}


# ---------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Route:
    """What a request path asks for: an ``action`` and the model it names, if any."""

    action: str  # infer | model_metadata | model_ready | server_metadata | live | ready
    name: str = ""
    version: str = ""


def _model_route(rest: list[str]) -> tuple[str, str, str] | None:
    """(action, version, HTTP method) of the path after ``/v2/models/{name}``."""
    version = ""
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    match rest:
        case []:
            return "model_metadata", version, "GET"
        case ["ready"]:
            return "model_ready", version, "GET"
        case ["infer"]:
            return "infer", version, "POST"
    return None


def match_route(method: str, raw_path: str) -> Route:
    """The route of ``method raw_path``; the query string is ignored and each path
    segment is URL-decoded once. Unknown paths are NOT_FOUND and known paths with the
    wrong method UNIMPLEMENTED ("Method Not Allowed"), as grpc-gateway's routing errors."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    segments = [urllib.parse.unquote(s) for s in path.split("/")]
    found: tuple[Route, str] | None = None
    match segments:
        case ["", "v2"]:
            found = Route("server_metadata"), "GET"
        case ["", "v2", "health", "live"]:
            found = Route("live"), "GET"
        case ["", "v2", "health", "ready"]:
            found = Route("ready"), "GET"
        case ["", "v2", "models", name, *rest]:
            model = _model_route(rest)
            if model is not None:
                action, version, wanted = model
                found = Route(action, name, version), wanted
    if found is None:
        raise RestError(grpc.StatusCode.NOT_FOUND, "Not Found")
    route, wanted = found
    if method != wanted:
        raise RestError(grpc.StatusCode.UNIMPLEMENTED, "Method Not Allowed")
    return route


# ---------------------------------------------------------------------- headers

# grpc-gateway's isPermanentHTTPHeader: forwarded as "grpcgateway-<name>"
PERMANENT_HEADERS = frozenset(
    h.lower()
    for h in (
        "Accept",
        "Accept-Charset",
        "Accept-Language",
        "Accept-Ranges",
        "Authorization",
        "Cache-Control",
        "Content-Type",
        "Cookie",
        "Date",
        "Expect",
        "From",
        "If-Match",
        "If-Modified-Since",
        "If-None-Match",
        "If-Schedule-Tag-Match",
        "If-Unmodified-Since",
        "Max-Forwards",
        "Origin",
        "Pragma",
        "Referer",
        "User-Agent",
        "Via",
        "Warning",
    )
)
METADATA_PREFIX = "grpc-metadata-"
# keys gRPC itself owns: a client may not set them as metadata
RESERVED_KEYS = frozenset({"content-type", "te", "user-agent", "host", "connection"})
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def grpc_timeout(value: str) -> float:
    """Seconds of a ``Grpc-Timeout`` header (e.g. ``100m``), as grpc-gateway parses it."""
    unit = _TIMEOUT_UNITS.get(value[-1:]) if len(value) >= 2 else None
    if unit is None or not value[:-1].isdigit():
        raise _bad(f"invalid grpc-timeout: {value}")
    return int(value[:-1]) * unit


def grpc_metadata(
    headers: Iterable[tuple[str, str]], *, remote: str | None = None, host: str | None = None
) -> tuple[list[tuple[str, str | bytes]], float | None]:
    """The gRPC metadata and deadline grpc-gateway's default header matcher and
    AnnotateContext make of HTTP request headers: ``Grpc-Metadata-<k>`` as ``<k>``
    (``-bin`` values base64-decoded), IANA permanent headers as ``grpcgateway-<name>``,
    ``Authorization`` also as itself, ``Grpc-Timeout`` as the deadline, and
    ``x-forwarded-host`` / ``x-forwarded-for``. Nothing else is forwarded."""
    out: list[tuple[str, str | bytes]] = []
    timeout: float | None = None
    forwarded_host = forwarded_for = None
    for raw_key, value in headers:
        key = raw_key.lower()
        if key == "grpc-timeout":
            timeout = grpc_timeout(value)
        elif key == "x-forwarded-host":
            forwarded_host = forwarded_host or value
        elif key == "x-forwarded-for":
            forwarded_for = forwarded_for or value
        if key == "authorization":
            out.append(("authorization", value))
        if key in PERMANENT_HEADERS:
            out.append(("grpcgateway-" + key, value))
        elif key.startswith(METADATA_PREFIX):
            name = key[len(METADATA_PREFIX) :]
            if not name or name in RESERVED_KEYS or name.startswith(("grpc-", ":")):
                continue  # gRPC would refuse the call; grpc-go drops these too
            if not set(name) <= _KEY_CHARS:
                raise _bad(f"header {raw_key}: not a valid gRPC metadata key")
            if name.endswith("-bin"):
                try:
                    out.append((name, _b64decode(value)))
                except ValueError:  # binascii.Error is one
                    raise _bad(f"header {raw_key}: invalid base64 value") from None
            else:
                out.append((name, value))
    if forwarded_host or host:
        out.append(("x-forwarded-host", forwarded_host or host or ""))
    if remote:
        out.append(("x-forwarded-for", f"{forwarded_for}, {remote}" if forwarded_for else remote))
    return out, timeout


# ---------------------------------------------------------------------- HTTP


def _json_response(status: int, doc: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(doc, separators=(",", ":")).encode(),
        content_type="application/json",
    )


def error_response(code: grpc.StatusCode, message: str) -> web.Response:
    return _json_response(http_status(code), error_body(code, message))


class RestProxy:
    """KServe V2 REST on ``host:port``, as gRPC calls to ``grpc_target`` over one channel."""

    def __init__(self, host: str, port: int, grpc_target: str) -> None:
        self.host = host
        self.port = port
        self.grpc_target = grpc_target
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self.grpc_target, options=[("grpc.max_receive_message_length", MAX_GRPC_MESSAGE)]
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        app = web.Application(client_max_size=MAX_BODY)
        # one catch-all route: paths, methods and error bodies are grpc-gateway's, not aiohttp's
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # no SO_REUSEPORT: a second proxy on this address must fail, not split the traffic
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            route = match_route(request.method, request.raw_path)
            metadata, timeout = grpc_metadata(
                request.headers.items(), remote=request.remote, host=request.host
            )
            return await self._call(route, request, metadata, timeout or DEFAULT_TIMEOUT)
        except RestError as e:
            return error_response(e.code, e.message)
        except grpc.aio.AioRpcError as e:
            return error_response(e.code(), e.details() or e.code().name)
        except Exception as e:  # a bug here must still answer in grpc-gateway's shape
            log.exception("REST %s %s failed", request.method, request.raw_path)
            return error_response(grpc.StatusCode.INTERNAL, str(e))

    async def _call(
        self,
        route: Route,
        request: web.Request,
        metadata: list[tuple[str, str | bytes]],
        timeout: float,
    ) -> web.Response:
        stub = self._stub
        assert stub is not None, "RestProxy not started"
        kw: dict[str, Any] = {"metadata": metadata, "timeout": timeout}
        if route.action == "infer":
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise RestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body over {MAX_BODY} bytes"
                ) from None
            message = parse_infer_request(body, route.name, route.version)
            return _json_response(200, infer_response_json(await stub.ModelInfer(message, **kw)))
        if route.action == "model_metadata":
            meta = await stub.ModelMetadata(
                pb.ModelMetadataRequest(name=route.name, version=route.version), **kw
            )
            return _json_response(200, model_metadata_json(meta))
        # Readiness and liveness answer in the status code, as the V2 REST protocol says
        # (200 true, 4xx false; tritonclient.http's is_*_ready read only the status).
        if route.action == "model_ready":
            ready = await stub.ModelReady(
                pb.ModelReadyRequest(name=route.name, version=route.version), **kw
            )
            return _json_response(
                200 if ready.ready else 400, {"name": route.name, "ready": ready.ready}
            )
        if route.action == "live":
            live = await stub.ServerLive(pb.ServerLiveRequest(), **kw)
            return _json_response(200 if live.live else 400, {"live": live.live})
        if route.action == "ready":
            server = await stub.ServerReady(pb.ServerReadyRequest(), **kw)
            return _json_response(200 if server.ready else 400, {"ready": server.ready})
        info = await stub.ServerMetadata(pb.ServerMetadataRequest(), **kw)
        return _json_response(200, server_metadata_json(info))
