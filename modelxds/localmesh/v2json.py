"""KServe V2 REST JSON <-> KServe V2 protobuf, as kserve/rest-proxy converts them: an
infer body to the ModelInferRequest rest-proxy would send (``parse_infer_request``), and
gRPC responses to the V2 REST documents it writes (``infer_response_json``,
``model_metadata_json``, ``server_metadata_json``).

Inputs take the V2 REST ``data`` form (flat or nested, every V2 datatype, BYTES as
strings) and proto JSON's ``contents`` and ``raw_input_contents``; outputs are written in
the ``data`` form, decoded from raw_output_contents when the runtime answered so. What
cannot be converted raises ``RestError`` with the gRPC code grpc-gateway would use
(INVALID_ARGUMENT for a bad body, INTERNAL for a response it cannot write). Pure
functions, no I/O; restproxy.py is the HTTP side.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import struct
from collections.abc import Iterable
from typing import Any

import grpc

from modelxds.kserve import grpc_predict_v2_pb2 as pb

# Where each datatype goes in InferTensorContents, as rest-proxy's targetArray places it.
# FP16 has no field: the V2 proto says FP16 travels as raw contents (rest-proxy itself
# rejects FP16), so a request with an FP16 input is sent all-raw.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
DATATYPES = (*CONTENTS_FIELD, "FP16")
# little-endian element formats of the raw form; BYTES is 4-byte-length-prefixed instead
RAW_FORMAT = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
INT_RANGE = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
FLOAT_MAX = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": math.inf}
# proto JSON's spellings of the non-finite floats, which JSON itself cannot write
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# rest-proxy's isBase64Content: these tensor content_type values mean base64 BYTES data
BASE64_CONTENT_TYPES = frozenset({"base64", "b64", "BASE64", "B64"})
# The V2 proto's shape is repeated int64, and so is the element count the server computes.
INT64_MAX = 2**63 - 1
# numpy's NPY_MAXDIMS (64 since numpy 2; Triton and MLServer hold tensors as arrays):
# more dimensions than any runtime takes, and few enough that flatten's recursion
# stays far from Python's recursion limit.
MAX_RANK = 64
# How deep a body may nest before a refusal names the field: the V2 document itself
# uses 4 levels (body, inputs, tensor, data), nested data MAX_RANK more, plus BYTES'
# arrays of byte values.
MAX_NESTING = 4 + MAX_RANK + 1
# A JSON string or one structural character: enough to follow nesting without recursing.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)
# \uD800-\uDFFF: json.loads turns an unpaired one into a lone surrogate, which no UTF-8
# encoder (protobuf's included) accepts. Bodies without one skip the search for it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _spellings(*fields: str) -> dict[str, str]:
    """snake_case as rest-proxy and proto JSON write fields, lowerCamelCase as proto JSON
    also accepts; any other key is an unknown field."""
    return {spelling: f for f in fields for spelling in (f, _camel(f))}


REQUEST_FIELDS = _spellings(
    "id", "parameters", "inputs", "outputs", "model_name", "model_version", "raw_input_contents"
)
TENSOR_FIELDS = _spellings("name", "datatype", "shape", "parameters", "data", "contents")
OUTPUT_FIELDS = _spellings("name", "parameters")
CONTENTS_FIELDS = _spellings(*sorted(set(CONTENTS_FIELD.values())))
PARAMETER_FIELDS = _spellings("bool_param", "int64_param", "string_param")


class RestError(Exception):
    """A request the proxy answers itself, with the gRPC code grpc-gateway would use."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(message: str) -> RestError:
    return RestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _b64decode(value: str) -> bytes:
    """Standard or URL-safe base64, padded or not (grpc-gateway's decodeBinHeader takes
    both paddings, proto JSON both alphabets); anything else raises ValueError."""
    padded = value + "=" * (-len(value) % 4)
    return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)


# ---------------------------------------------------------------------- JSON -> protobuf


def element_count(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parameters_from_json(value: object, where: str) -> dict[str, pb.InferParameter]:
    """V2 REST parameters (``{"k": "v" | 1 | true | null}``) as InferParameters, as
    rest-proxy converts them; proto JSON's ``{"k": {"string_param": "v"}}`` is also taken.
    The gRPC InferParameter holds only bool, int64 and string, so a fractional number,
    an array or an object of any other form is refused rather than altered or dropped."""
    if not isinstance(value, dict):
        raise _bad(f"{where}: must be a JSON object")
    out: dict[str, pb.InferParameter] = {}
    for key, v in value.items():
        at = f"{where}.{key}"
        if isinstance(v, dict):
            if len(v) != 1 or next(iter(v)) not in PARAMETER_FIELDS:
                raise _bad(f"{at}: an object parameter must be one of {sorted(PARAMETER_FIELDS)}")
            ((spelling, inner),) = v.items()
            field = PARAMETER_FIELDS[spelling]
            if field == "bool_param" and isinstance(inner, bool):
                out[key] = pb.InferParameter(bool_param=inner)
            elif field == "string_param" and isinstance(inner, str):
                out[key] = pb.InferParameter(string_param=inner)
            elif field == "int64_param" and (_is_int(inner) or isinstance(inner, str)):
                out[key] = pb.InferParameter(int64_param=_integer(inner, "INT64", at, True))
            else:
                raise _bad(f"{at}.{spelling}: wrong type {type(inner).__name__}")
        elif v is None:
            out[key] = pb.InferParameter()
        elif isinstance(v, bool):
            out[key] = pb.InferParameter(bool_param=v)
        elif isinstance(v, str):
            out[key] = pb.InferParameter(string_param=v)
        elif _is_int(v) or (isinstance(v, float) and v.is_integer()):
            out[key] = pb.InferParameter(int64_param=_integer(int(v), "INT64", at, False))
        elif isinstance(v, float):
            raise _bad(f"{at}: {v} is not an integer (InferParameter holds bool, int64, string)")
        else:
            raise _bad(f"{at}: arrays are not parameter values")
    return out


def _put(target: Any, params: dict[str, pb.InferParameter]) -> None:
    for key, value in params.items():  # a protobuf message map cannot take assignments
        target[key].CopyFrom(value)


def _integer(x: object, datatype: str, where: str, strings: bool) -> int:
    # proto JSON writes 64-bit integers as strings, so the contents form may too
    if strings and isinstance(x, str):
        try:
            x = int(x, 10)
        except ValueError:
            raise _bad(f"{where}: {x!r} is not an integer") from None
    if not _is_int(x):
        raise _bad(f"{where}: {x!r} is not an integer ({datatype})")
    assert isinstance(x, int)
    low, high = INT_RANGE[datatype]
    if not low <= x <= high:
        raise _bad(f"{where}: {x} is out of range for {datatype}")
    return x


def _float(x: object, datatype: str, where: str, strings: bool) -> float:
    if strings and isinstance(x, str) and x in NON_FINITE:
        return NON_FINITE[x]
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise _bad(f"{where}: {x!r} is not a number ({datatype})")
    try:
        value = float(x)
    except OverflowError:
        value = math.inf
    # json reads 1e999 as infinity; a JSON number is always finite
    if math.isinf(value) or abs(value) > FLOAT_MAX[datatype]:
        raise _bad(f"{where}: {x} is out of range for {datatype}")
    return value


def _bytes_element(x: object, where: str, b64: bool, proto_json: bool) -> bytes:
    """A BYTES element: a string (UTF-8, or base64 when the tensor says so, and always
    base64 in proto JSON's bytes_contents) or, in the data form, an array of byte values."""
    if isinstance(x, str):
        if not (b64 or proto_json):
            return x.encode()
        try:
            return _b64decode(x)
        except ValueError:  # binascii.Error is one
            raise _bad(f"{where}: {x!r} is not base64") from None
    if not proto_json and isinstance(x, list) and all(_is_int(b) and 0 <= b <= 255 for b in x):
        return bytes(x)
    raise _bad(f"{where}: {x!r} is not a string or an array of byte values")


def _elements(
    values: list[Any], datatype: str, where: str, *, b64: bool = False, proto_json: bool = False
) -> list[Any]:
    """Each element checked and converted for ``datatype``."""
    if datatype == "BOOL":
        for i, x in enumerate(values):
            if not isinstance(x, bool):
                raise _bad(f"{where}[{i}]: {x!r} is not a boolean (BOOL)")
        return values
    if datatype in INT_RANGE:
        return [_integer(x, datatype, f"{where}[{i}]", proto_json) for i, x in enumerate(values)]
    if datatype in FLOAT_MAX:
        return [_float(x, datatype, f"{where}[{i}]", proto_json) for i, x in enumerate(values)]
    return [_bytes_element(x, f"{where}[{i}]", b64, proto_json) for i, x in enumerate(values)]


def _is_leaf(x: object, datatype: str) -> bool:
    if datatype == "BYTES":  # a string, or an array of byte values
        return isinstance(x, str) or (isinstance(x, list) and all(_is_int(b) for b in x))
    return not isinstance(x, list)


def flatten(data: object, shape: list[int], datatype: str, where: str) -> list[Any]:
    """``data`` as a flat row-major list: flat already, or nested exactly as ``shape``."""
    if not isinstance(data, list):
        raise _bad(f"{where}: must be a JSON array")
    if not any(isinstance(x, list) and not _is_leaf(x, datatype) for x in data):
        flat = data  # the elements' own types are checked later, each by its index
    else:
        flat = []

        def walk(value: object, depth: int, at: str) -> None:
            if depth == len(shape):
                if not _is_leaf(value, datatype):
                    raise _bad(f"{at}: nested deeper than shape {shape}")
                flat.append(value)
                return
            if not isinstance(value, list) or len(value) != shape[depth]:
                raise _bad(f"{at}: nesting does not match shape {shape}")
            for i, item in enumerate(value):
                walk(item, depth + 1, f"{at}[{i}]")

        walk(data, 0, where)
    if len(flat) != element_count(shape):
        raise _bad(f"{where}: {len(flat)} elements, but shape {shape} needs {element_count(shape)}")
    return flat


def _raw(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return struct.pack(f"<{len(values)}{RAW_FORMAT[datatype]}", *values)


def _fields(
    obj: object, allowed: dict[str, str], where: str, required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``obj``'s fields by canonical name; an unknown or repeated field is refused.

    rest-proxy's proto-JSON marshaler has DiscardUnknown = false, but its infer body goes
    through Go's encoding/json, which skips unknown keys; refusing them everywhere makes
    a misspelt field a 400 instead of a tensor silently missing."""
    if not isinstance(obj, dict):
        raise _bad(f"{where or 'request body'}: must be a JSON object")
    out: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in obj.items():
        field = allowed.get(key)
        if field is None:
            raise _bad(f"{prefix}{key}: unknown field")
        if field in out:
            raise _bad(f"{prefix}{key}: given twice")
        out[field] = value
    for field in required:
        if field not in out:
            raise _bad(f"{prefix}{field}: required")
    return out


def _tensor(
    obj: object, where: str, raw_given: bool
) -> tuple[pb.ModelInferRequest.InferInputTensor, list[Any] | None]:
    """An input tensor and its converted elements (None when the body sent raw contents)."""
    f = _fields(obj, TENSOR_FIELDS, where, ("name", "datatype", "shape"))
    name, datatype, shape = f["name"], f["datatype"], f["shape"]
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name: must be a non-empty string")
    if datatype not in DATATYPES:
        raise _bad(
            f"{where}.datatype: unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(f"{where}.shape: must be an array of non-negative integers")
    if len(shape) > MAX_RANK:
        raise _bad(f"{where}.shape: {len(shape)} dimensions, at most {MAX_RANK}")
    for i, d in enumerate(shape):
        if d > INT64_MAX:  # the proto field would refuse it (a 500, not a 400)
            raise _bad(f"{where}.shape[{i}]: does not fit in int64")
    if element_count(shape) > INT64_MAX:
        raise _bad(f"{where}.shape: {shape} holds more elements than int64 can count")
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if "parameters" in f:
        _put(tensor.parameters, parameters_from_json(f["parameters"], f"{where}.parameters"))
    sources = [k for k in ("data", "contents") if k in f]
    if raw_given:
        if sources:
            raise _bad(f"{where}.{sources[0]}: not allowed with raw_input_contents")
        return tensor, None
    if len(sources) != 1:
        raise _bad(f"{where}: needs exactly one of data or contents")
    if sources == ["data"]:
        content_type = tensor.parameters.get("content_type")
        b64 = content_type is not None and content_type.string_param in BASE64_CONTENT_TYPES
        flat = flatten(f["data"], shape, datatype, f"{where}.data")
        return tensor, _elements(flat, datatype, f"{where}.data", b64=b64)
    contents = _fields(f["contents"], CONTENTS_FIELDS, f"{where}.contents")
    expected = CONTENTS_FIELD.get(datatype)
    if expected is None:
        raise _bad(f"{where}.contents: {datatype} has no contents field; send data instead")
    for field in contents:
        if field != expected:
            raise _bad(f"{where}.contents.{field}: does not hold {datatype} (use {expected})")
    values = contents.get(expected, [])
    at = f"{where}.contents.{expected}"
    if not isinstance(values, list):
        raise _bad(f"{at}: must be a JSON array")
    if len(values) != element_count(shape):
        raise _bad(f"{at}: {len(values)} elements, but shape {shape} needs {element_count(shape)}")
    return tensor, _elements(values, datatype, at, proto_json=True)


def _output(obj: object, where: str) -> pb.ModelInferRequest.InferRequestedOutputTensor:
    f = _fields(obj, OUTPUT_FIELDS, where, ("name",))
    if not isinstance(f["name"], str) or not f["name"]:
        raise _bad(f"{where}.name: must be a non-empty string")
    out = pb.ModelInferRequest.InferRequestedOutputTensor(name=f["name"])
    if "parameters" in f:
        _put(out.parameters, parameters_from_json(f["parameters"], f"{where}.parameters"))
    return out


def _strict_json(body: bytes) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    try:
        doc = json.loads(body, parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"request body is not JSON: {e}") from None
    except RecursionError:
        # json recurses once per level; say where, found without recursing
        raise _bad(f"{_deep_field(body, MAX_NESTING)}: nested too deeply") from None
    if _SURROGATE_ESCAPE.search(body):
        where = _lone_surrogate(doc)
        if where is not None:
            raise _bad(f"{where}: not valid Unicode (a lone surrogate)")
    return doc


def _path(parts: list[str | int | None]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part is not None:
            out += f".{part}" if out else part
    return out


def _key(token: bytes) -> str:
    try:
        key = json.loads(token)
    except ValueError:
        key = token[1:-1].decode(errors="replace")
    return repr(key[:64])[1:-1]  # no lone surrogate or control character in a message


def _deep_field(body: bytes, limit: int) -> str:
    """The field (``inputs[0].data``) under which ``body`` first nests deeper than
    ``limit``; "request body" if no named field holds that nesting."""
    path: list[str | int | None] = []  # per open container: its current key or index
    last_string = b""
    for m in _JSON_TOKEN.finditer(body):
        token = m.group()
        if token[:1] == b'"':
            last_string = token
        elif token == b":":
            if path and not isinstance(path[-1], int):
                path[-1] = _key(last_string)
        elif token in (b"[", b"{"):
            path.append(0 if token == b"[" else None)
            if len(path) > limit:
                named = [i for i, part in enumerate(path) if isinstance(part, str)]
                return _path(path[: named[-1] + 1]) if named else "request body"
        elif token == b",":
            if path:
                top = path[-1]
                path[-1] = top + 1 if isinstance(top, int) else None
        elif path:  # "]" or "}"
            path.pop()
    return "request body"


def _lone_surrogate(doc: object) -> str | None:
    """The path of a string or key holding a lone surrogate (depth-first, no recursion)."""
    stack: list[tuple[object, str]] = [(doc, "")]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            if not _is_utf8(value):
                return at or "request body"
        elif isinstance(value, list):
            stack.extend((v, f"{at}[{i}]") for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key, v in reversed(list(value.items())):
                if not _is_utf8(key):
                    return f"{at or 'request body'}: a key"
                stack.append((v, f"{at}.{key}" if at else key))
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_infer_request(
    body: bytes, model_name: str, model_version: str = ""
) -> pb.ModelInferRequest:
    """A V2 REST infer body as the ModelInferRequest rest-proxy would send.

    Inputs may use the V2 REST ``data`` form (flat or nested, every V2 datatype, BYTES as
    strings) or proto JSON's ``contents`` form, which the gateway's gRPC-JSON transcoder
    takes (rest-proxy itself reads only ``data``); ``raw_input_contents`` (base64) is
    taken as proto JSON writes it. The path's model name (and version, if the path has one)
    wins over the body's, as grpc-gateway sets path fields after decoding the body.
    """
    f = _fields(_strict_json(body), REQUEST_FIELDS, "", ("inputs",))
    request = pb.ModelInferRequest(model_name=model_name)
    body_version = f.get("model_version", "")
    if not isinstance(body_version, str):
        raise _bad("model_version: must be a string")
    request.model_version = model_version or body_version
    if "id" in f:
        if not isinstance(f["id"], str):
            raise _bad("id: must be a string")
        request.id = f["id"]
    if "parameters" in f:
        _put(request.parameters, parameters_from_json(f["parameters"], "parameters"))
    inputs = f["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise _bad("inputs: must be a non-empty array")
    raw_given = "raw_input_contents" in f
    tensors = [_tensor(t, f"inputs[{i}]", raw_given) for i, t in enumerate(inputs)]
    outputs = f.get("outputs", [])
    if not isinstance(outputs, list):
        raise _bad("outputs: must be an array")
    request.outputs.extend(_output(o, f"outputs[{i}]") for i, o in enumerate(outputs))
    request.inputs.extend(t for t, _ in tensors)
    if raw_given:
        raw = f["raw_input_contents"]
        if not isinstance(raw, list) or len(raw) != len(inputs):
            raise _bad(f"raw_input_contents: must be an array of {len(inputs)} base64 strings")
        request.raw_input_contents.extend(
            _bytes_element(r, f"raw_input_contents[{i}]", True, True) for i, r in enumerate(raw)
        )
    elif any(t.datatype == "FP16" for t, _ in tensors):
        # raw contents for one input means raw contents for all (the V2 proto's rule)
        request.raw_input_contents.extend(_raw(t.datatype, v or []) for t, v in tensors)
    else:
        for (tensor, values), message in zip(tensors, request.inputs, strict=True):
            getattr(message.contents, CONTENTS_FIELD[tensor.datatype]).extend(values or [])
    return request


# ---------------------------------------------------------------------- protobuf -> JSON


def _short_float(x: float, fmt: str) -> float | str:
    """The shortest decimal that reads back as the same FP16 / FP32 value (as Go prints
    a float32), so 0.1f comes out as 0.1; non-finite values as proto JSON spells them."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if fmt == "d":
        return x
    target = struct.pack(f"<{fmt}", x)
    for digits in range(1, 18):
        candidate = float(f"{x:.{digits}g}")
        with contextlib.suppress(OverflowError):  # rounded up past the type's maximum
            if struct.pack(f"<{fmt}", candidate) == target:
                return candidate
    return x


def parameters_json(params: Any) -> dict[str, Any]:
    """InferParameters as V2 REST values; an unset one is null, as rest-proxy writes it."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        choice = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, choice) if choice else None
    return out


def _typed_values(output: pb.ModelInferResponse.InferOutputTensor) -> list[Any]:
    field = CONTENTS_FIELD.get(output.datatype)
    if field is None:
        raise RestError(
            grpc.StatusCode.INTERNAL,
            f"output {output.name}: {output.datatype} must come as raw_output_contents",
        )
    return list(getattr(output.contents, field))


def _raw_values(raw: bytes, datatype: str, count: int, name: str) -> list[Any]:
    if datatype == "BYTES":
        values: list[Any] = []
        offset = 0
        while offset < len(raw) and len(values) < count:
            if offset + 4 > len(raw):
                break
            (size,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4 : offset + 4 + size])
            offset += 4 + size
        if len(values) != count or offset != len(raw):
            raise RestError(
                grpc.StatusCode.INTERNAL, f"output {name}: raw BYTES do not hold {count} elements"
            )
        return values
    fmt = RAW_FORMAT.get(datatype)
    if fmt is None:
        raise RestError(grpc.StatusCode.INTERNAL, f"output {name}: unknown datatype {datatype}")
    size = struct.calcsize(fmt) * count
    if len(raw) != size:
        raise RestError(
            grpc.StatusCode.INTERNAL,
            f"output {name}: {len(raw)} raw bytes, but its shape needs {size}",
        )
    return list(struct.unpack(f"<{count}{fmt}", raw))


def infer_response_json(response: pb.ModelInferResponse) -> dict[str, Any]:
    """A ModelInferResponse as the V2 REST response rest-proxy writes: outputs in the
    ``data`` form (flat), decoded from raw_output_contents when the runtime answered so;
    BYTES as base64 strings with ``content_type: base64``, as rest-proxy marks them."""
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise RestError(
            grpc.StatusCode.INTERNAL,
            f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs",
        )
    outputs = []
    for i, output in enumerate(response.outputs):
        count = element_count(output.shape)
        if raw:
            values = _raw_values(raw[i], output.datatype, count, output.name)
        else:
            values = _typed_values(output)
        parameters = parameters_json(output.parameters)
        if output.datatype == "BYTES":
            data: list[Any] = [base64.b64encode(v).decode() for v in values]
            parameters["content_type"] = "base64"
        elif output.datatype in ("FP16", "FP32", "FP64"):
            data = [_short_float(v, RAW_FORMAT[output.datatype]) for v in values]
        else:
            data = values
        tensor: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if parameters:
            tensor["parameters"] = parameters
        tensor["data"] = data
        outputs.append(tensor)
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        doc["model_version"] = response.model_version
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = parameters_json(response.parameters)
    doc["outputs"] = outputs
    return doc


def model_metadata_json(response: pb.ModelMetadataResponse) -> dict[str, Any]:
    """The V2 REST model metadata document (name, versions, platform, inputs, outputs)."""

    def tensors(ts: Iterable[pb.ModelMetadataResponse.TensorMetadata]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    doc: dict[str, Any] = {"name": response.name}
    if response.versions:
        doc["versions"] = list(response.versions)
    doc["platform"] = response.platform
    doc["inputs"] = tensors(response.inputs)
    doc["outputs"] = tensors(response.outputs)
    return doc


def server_metadata_json(response: pb.ServerMetadataResponse) -> dict[str, Any]:
    return {
        "name": response.name,
        "version": response.version,
        "extensions": list(response.extensions),
    }
