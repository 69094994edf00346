"""One ext_proc stream (one HTTP request) as a state machine: each message from the
gateway in, the messages to send back out. No I/O, so every path is a unit test.

The gateway runs the filter as the GIE implementations configure it: request headers
and trailers SEND, bodies FULL_DUPLEX_STREAMED. The pick goes out on the request
headers response as soon as the model is known; for a gRPC call naming it only in the
body, that response waits for the first body bytes that hold ``model_name``. Every body
chunk, held or not, is echoed back unchanged, request and response alike.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from modelxds import metrics
from modelxds.epp.extract import BodyModel, model_from_grpc_body, model_from_headers, needs_body
from modelxds.epp.pick import Outcome, Pick, Picker
from modelxds.xds.builders import (
    GRPC_INVALID_ARGUMENT,
    GRPC_METADATA_PREFIX,
    GRPC_NOT_FOUND,
    GRPC_UNAVAILABLE,
    LB_NAMESPACE,
    error_body,
)
from modelxds.xds.ir import Destination

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
# the gateway's hint: the only endpoints the picker may choose from
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
# below Envoy's 64 KiB recommendation for one streamed body response, as reference EPPs
MAX_CHUNK = 62 * 1024

# The pool as it is now: the destination (policy + placement) the picks read, or None
# before placement is read.
PoolState = Callable[[], Destination | None]


class _Phase(enum.Enum):
    HEADERS = "headers"  # waiting for the request headers
    HOLDING = "holding"  # headers answered later: the model is in the body
    PASSING = "passing"  # picked: echo what follows
    DONE = "done"  # answered with an ImmediateResponse: nothing more to say


class Exchange:
    def __init__(self, pool: PoolState, picker: Picker, policy_headers: Sequence[str]) -> None:
        self.pool = pool
        self.picker = picker
        self.policy_headers = policy_headers
        self.phase = _Phase.HEADERS
        self.grpc = False
        self.subset: tuple[str, ...] = ()
        self.held = bytearray()
        self.pick: Pick | None = None  # for logs and tests

    def handle(self, request: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(request)
        if kind == "request_body":
            return self._request_body(request.request_body)
        if kind == "request_trailers":
            out = self._release(complete=True, end_of_stream=False)
            if self.phase is _Phase.DONE:
                return out
            return [*out, ep.ProcessingResponse(request_trailers=ep.TrailersResponse())]
        if kind == "response_headers":
            return [ep.ProcessingResponse(response_headers=ep.HeadersResponse())]
        if kind == "response_body":
            body = request.response_body
            return [
                ep.ProcessingResponse(response_body=r) for r in _echo(body.body, body.end_of_stream)
            ]
        if kind == "response_trailers":
            return [ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]
        metrics.EPP_INVALID_MESSAGES.labels("empty").inc()
        return []

    def _request_headers(self, request: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        if self.phase is not _Phase.HEADERS:
            metrics.EPP_INVALID_MESSAGES.labels("headers_twice").inc()
            return []
        message = request.request_headers
        headers = _header_dict(message.headers)
        self.grpc = headers.get("content-type", "").startswith("application/grpc")
        self.subset = _subset_hint(request)
        model = model_from_headers(headers, self.policy_headers)
        if model is None and needs_body(headers) and not message.end_of_stream:
            self.phase = _Phase.HOLDING
            return []
        return self._answer(model)

    def _request_body(self, body: ep.HttpBody) -> list[ep.ProcessingResponse]:
        if self.phase is _Phase.HOLDING:
            self.held += body.body
            return self._release(complete=body.end_of_stream, end_of_stream=body.end_of_stream)
        if self.phase is _Phase.PASSING:
            return [
                ep.ProcessingResponse(request_body=r) for r in _echo(body.body, body.end_of_stream)
            ]
        if self.phase is _Phase.HEADERS:
            metrics.EPP_INVALID_MESSAGES.labels("body_before_headers").inc()
        return []

    def _release(self, *, complete: bool, end_of_stream: bool) -> list[ep.ProcessingResponse]:
        """While holding: answer the headers once the held body names the model (or
        cannot), then echo everything held."""
        if self.phase is not _Phase.HOLDING:
            return []
        found = model_from_grpc_body(self.held, complete)
        if found.state is BodyModel.MORE:
            return []
        metrics.EPP_BODY_PARSES.labels(found.state.value).inc()
        if found.state is BodyModel.MALFORMED:
            # counted above; a client sending many would flood the log at INFO
            log.debug("gRPC request body unreadable: %s", found.why)
            self.phase = _Phase.DONE
            return [
                _immediate(
                    400,
                    GRPC_INVALID_ARGUMENT,
                    f"the request body is not a KServe V2 gRPC message: {found.why}",
                    grpc=True,
                )
            ]
        out = self._answer(found.model or None)
        if not out[0].HasField("immediate_response"):
            out += [ep.ProcessingResponse(request_body=r) for r in _echo(self.held, end_of_stream)]
        self.held = bytearray()
        return out

    def _answer(self, model: str | None) -> list[ep.ProcessingResponse]:
        started = time.perf_counter()
        destination = self.pool()
        if destination is None:
            pick = Pick(Outcome.UNAVAILABLE)
        else:
            pick = self.picker.pick(destination, model, self.subset)
        metrics.EPP_PICK_SECONDS.observe(time.perf_counter() - started)
        metrics.EPP_PICKS.labels(pick.outcome.value).inc()
        self.pick = pick
        if pick.outcome is Outcome.NOT_FOUND:
            self.phase = _Phase.DONE
            message = f"model {model} is not loaded on any pod and the policy has NO_FALLBACK"
            return [_immediate(404, GRPC_NOT_FOUND, message, grpc=self.grpc)]
        if pick.outcome is Outcome.UNAVAILABLE:
            self.phase = _Phase.DONE
            why = "placement not read from etcd yet" if destination is None else "no live pod"
            message = f"no ModelMesh pod to send the request to: {why}"
            return [_immediate(503, GRPC_UNAVAILABLE, message, grpc=self.grpc)]
        self.phase = _Phase.PASSING
        balanced = "mm-balanced" if self.grpc else f"{GRPC_METADATA_PREFIX}mm-balanced"
        value = pick.header
        metadata = struct_pb2.Struct()
        metadata.fields[LB_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = value
        return [
            ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(
                    response=ep.CommonResponse(
                        header_mutation=ep.HeaderMutation(
                            set_headers=[
                                _header(DESTINATION_HEADER, value),
                                _header(balanced, "true"),
                            ]
                        ),
                        clear_route_cache=True,
                    )
                ),
                dynamic_metadata=metadata,
            )
        ]


def _echo(data: bytes | bytearray, end_of_stream: bool) -> list[ep.BodyResponse]:
    """``data`` unchanged as streamed body responses of at most MAX_CHUNK bytes; the
    last one carries ``end_of_stream``."""
    pieces = [bytes(data[i : i + MAX_CHUNK]) for i in range(0, len(data), MAX_CHUNK)] or [b""]
    return [
        ep.BodyResponse(
            response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(
                    streamed_response=ep.StreamedBodyResponse(
                        body=piece, end_of_stream=end_of_stream and n == len(pieces) - 1
                    )
                )
            )
        )
        for n, piece in enumerate(pieces)
    ]


def _immediate(status: int, grpc_code: int, message: str, *, grpc: bool) -> ep.ProcessingResponse:
    """The gateway answers for the picker: a V2 REST error body, or for gRPC the status
    (Envoy turns the body into ``grpc-message``)."""
    response = ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        details=f"modelxds_epp_{status}",
    )
    if grpc:
        response.grpc_status.status = grpc_code
        response.body = message.encode()
    else:
        response.body = error_body(message, grpc_code).encode()
        response.headers.set_headers.append(_header("content-type", "application/json"))
    return ep.ProcessingResponse(immediate_response=response)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _header_dict(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Lower-case name -> value (the first of repeated ones); Envoy sends values as
    ``raw_value`` bytes, older gateways as ``value``."""
    out: dict[str, str] = {}
    for h in headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out.setdefault(h.key.lower(), value)
    return out


def _subset_hint(request: ep.ProcessingRequest) -> tuple[str, ...]:
    hint = request.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if hint is None or SUBSET_KEY not in hint.fields:
        return ()
    value = hint.fields[SUBSET_KEY]
    if value.WhichOneof("kind") == "list_value":
        return tuple(v.string_value for v in value.list_value.values if v.string_value)
    if value.WhichOneof("kind") == "string_value":
        return tuple(e.strip() for e in value.string_value.split(",") if e.strip())
    return ()
