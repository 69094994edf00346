"""Which model a request names: from its headers (REST path, the policy's headers,
ModelMesh's own), or for gRPC from ``model_name`` (field 1) at the start of the body.

Pure functions and one small incremental parser, so that every case is a unit test.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelxds.kserve import SERVICE_NAME
from modelxds.xds.builders import MODELMESH_HEADERS, REST_MODEL_PATH

_REST_PATH = re.compile(REST_MODEL_PATH)
# RFC 3986 unreserved characters, the only ones a percent escape may hide in a model name
# (the gateway's own normalize_path decodes these too)
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# gRPC methods of the KServe V2 service whose request carries the model in field 1
# (ModelInferRequest.model_name, ModelReadyRequest.name, ModelMetadataRequest.name)
MODEL_METHODS = frozenset(
    f"/{SERVICE_NAME}/{m}" for m in ("ModelInfer", "ModelReady", "ModelMetadata")
)
GRPC_PREFIX = 5  # compressed flag (1 byte) + message length (4 bytes, big endian)
# Read at most this much of a body for its model: field 1 comes first in any encoder that
# writes fields in number order; past this the model is taken to be absent.
MAX_HELD_BYTES = 64 * 1024
_MODEL_FIELD_TAG = 0x0A  # field 1, wire type 2 (length-delimited)


def is_grpc(headers: Mapping[str, str]) -> bool:
    # Envoy's own test: the content type starts with application/grpc
    return headers.get("content-type", "").startswith("application/grpc")


def model_from_headers(headers: Mapping[str, str], policy_headers: Sequence[str]) -> str | None:
    """The model as the xDS gateway reads it, the strongest source first: the REST path,
    the policy's headers (last one first), ``mm-vmodel-id``, then ``mm-model-id``."""
    match = _REST_PATH.match(headers.get(":path", ""))
    if match and match.group(1):
        return _unescape(match.group(1))
    for name in (*reversed(policy_headers), *reversed(MODELMESH_HEADERS)):
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


def needs_body(headers: Mapping[str, str]) -> bool:
    """A gRPC call of a method whose request names the model in field 1."""
    return is_grpc(headers) and headers.get(":path", "").split("?", 1)[0] in MODEL_METHODS


def _unescape(name: str) -> str:
    def one(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        return chr(byte) if byte in _UNRESERVED else m.group(0)

    return _ESCAPE.sub(one, name) if "%" in name else name


class BodyModel(enum.Enum):
    MORE = "more"  # not enough bytes yet
    FOUND = "found"
    ABSENT = "absent"  # the message has no field 1 (or it is past MAX_HELD_BYTES)
    UNREADABLE = "unreadable"  # compressed: only the pod can read it
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class BodyResult:
    state: BodyModel
    model: str = ""
    why: str = ""


def model_from_grpc_body(data: bytes | bytearray, complete: bool) -> BodyResult:
    """``model_name`` of the first gRPC message in ``data`` (the body so far); ``complete``:
    no more bytes will come. ``MORE`` asks for the next chunk."""
    if len(data) < GRPC_PREFIX:
        if complete:
            return _malformed(
                f"the body ends after {len(data)} bytes, inside the gRPC frame prefix"
            )
        return BodyResult(BodyModel.MORE)
    if data[0] not in (0, 1):
        return _malformed(f"gRPC frame flag {data[0]} (expected 0 or 1)")
    if data[0] == 1:
        return BodyResult(BodyModel.UNREADABLE, why="the message is compressed")
    end = GRPC_PREFIX + int.from_bytes(data[1:GRPC_PREFIX], "big")
    try:
        return _scan(data, end)
    except _Truncated:
        if complete or len(data) >= end:
            return _malformed("the message ends inside a field")
        if len(data) >= MAX_HELD_BYTES:
            return BodyResult(BodyModel.ABSENT, why=f"no model_name in the first {len(data)} bytes")
        return BodyResult(BodyModel.MORE)
    except _Bad as e:
        return _malformed(str(e))


class _Truncated(Exception):
    """The bytes so far end inside a field."""


class _Bad(Exception):
    pass


def _scan(data: bytes | bytearray, end: int) -> BodyResult:
    """Walk the fields of the message ending at ``end`` until field 1."""
    have = min(len(data), end)
    pos = GRPC_PREFIX
    while pos < have:
        tag, pos = _varint(data, pos, have)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _Bad("protobuf field number 0")
        if wire == 0:
            _, pos = _varint(data, pos, have)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos, have)
            if pos + size > end:
                raise _Bad(f"field {field} is longer than its message")
            if tag == _MODEL_FIELD_TAG:
                if pos + size > have:
                    raise _Truncated
                try:
                    name = bytes(data[pos : pos + size]).decode("utf-8")
                except UnicodeDecodeError:
                    raise _Bad("model_name is not UTF-8") from None
                if not name:
                    return BodyResult(BodyModel.ABSENT, why="model_name is empty")
                return BodyResult(BodyModel.FOUND, name)
            pos += size
        else:
            raise _Bad(f"protobuf wire type {wire} of field {field}")
    if pos > end:
        raise _Bad("a field runs past the end of its message")
    if pos < end:
        raise _Truncated
    return BodyResult(BodyModel.ABSENT, why="the message has no model_name")


def _varint(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it)."""
    value = shift = 0
    while pos < end:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Bad("a protobuf varint longer than 10 bytes")
    raise _Truncated


def _malformed(why: str) -> BodyResult:
    return BodyResult(BodyModel.MALFORMED, why=why)
