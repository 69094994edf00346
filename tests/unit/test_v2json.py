"""The local mesh's V2 REST JSON <-> KServe V2 protobuf conversion (v2json.py): the data
and contents forms of every datatype, raw contents, refused bodies, response documents."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import grpc
import pytest

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.localmesh.restproxy import http_status
from modelxds.localmesh.v2json import (
    RestError,
    infer_response_json,
    model_metadata_json,
    parse_infer_request,
)

# datatype -> (a 2x3 tensor's elements as JSON writes them, its InferTensorContents field)
SAMPLES: dict[str, tuple[list[Any], str]] = {
    "BOOL": ([True, False, True, True, False, False], "bool_contents"),
    "INT8": ([-128, -1, 0, 1, 2, 127], "int_contents"),
    "INT16": ([-32768, -1, 0, 1, 2, 32767], "int_contents"),
    "INT32": ([-(2**31), -1, 0, 1, 2, 2**31 - 1], "int_contents"),
    "INT64": ([-(2**63), -1, 0, 1, 2, 2**63 - 1], "int64_contents"),
    "UINT8": ([0, 1, 2, 3, 4, 255], "uint_contents"),
    "UINT16": ([0, 1, 2, 3, 4, 65535], "uint_contents"),
    "UINT32": ([0, 1, 2, 3, 4, 2**32 - 1], "uint_contents"),
    "UINT64": ([0, 1, 2, 3, 4, 2**64 - 1], "uint64_contents"),
    "FP32": ([0.0, 0.1, -1.5, 16.0, 3.25, 1e30], "fp32_contents"),
    "FP64": ([0.0, 0.1, -1.5, 16.0, 3.25, 1e300], "fp64_contents"),
    "BYTES": (["a", "bc", "", "héllo", "x y", "8"], "bytes_contents"),
}


def _body(*inputs: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **top}).encode()


def _tensor(
    datatype: str, data: Any, shape: list[int] | None = None, **more: Any
) -> dict[str, Any]:
    return {"name": "x", "datatype": datatype, "shape": shape or [2, 3], "data": data, **more}


def _as_output(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The response a runtime echoing its inputs would give: outputs = inputs."""
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    for t in request.inputs:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape).contents.CopyFrom(
            t.contents
        )
    response.raw_output_contents.extend(request.raw_input_contents)
    return response


def _bad(body: bytes) -> str:
    with pytest.raises(RestError) as err:
        parse_infer_request(body, "m")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert http_status(err.value.code) == 400
    return err.value.message


# ---------------------------------------------------------------------- data form


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_data_form_goes_into_the_typed_contents_field_and_back(datatype: str, nested: bool) -> None:
    flat, field = SAMPLES[datatype]
    data = [flat[:3], flat[3:]] if nested else flat
    request = parse_infer_request(_body(_tensor(datatype, data)), "mnist", "2")

    (tensor,) = request.inputs
    assert (request.model_name, request.model_version) == ("mnist", "2")
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [2, 3])
    assert not request.raw_input_contents
    stored = list(getattr(tensor.contents, field))
    if datatype == "BYTES":
        assert stored == [s.encode() for s in flat]
    elif datatype == "FP32":
        assert stored == [struct.unpack("<f", struct.pack("<f", v))[0] for v in flat]
    else:
        assert stored == flat
    assert [f.name for f, _ in tensor.contents.ListFields()] == [field]

    (out,) = infer_response_json(_as_output(request))["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("x", datatype, [2, 3])
    if datatype == "BYTES":  # base64, marked as such, as rest-proxy answers BYTES
        assert out["parameters"] == {"content_type": "base64"}
        assert [base64.b64decode(s).decode() for s in out["data"]] == flat
    else:
        assert out["data"] == flat  # FP32 too: the shortest decimal of each float32


def test_fp16_goes_raw_little_endian_and_takes_every_other_input_along() -> None:
    request = parse_infer_request(
        _body(
            _tensor("FP16", [[0.5, -2.0, 65504.0], [0.1, 0.0, 1.0]]),
            {"name": "y", "datatype": "INT32", "shape": [2], "data": [7, -7]},
            {"name": "z", "datatype": "BYTES", "shape": [2], "data": ["ab", "c"]},
        ),
        "m",
    )
    assert [t.HasField("contents") for t in request.inputs] == [False, False, False]
    fp16, int32, strings = request.raw_input_contents
    assert fp16 == struct.pack("<6e", 0.5, -2.0, 65504.0, 0.1, 0.0, 1.0)
    assert int32 == struct.pack("<2i", 7, -7)
    assert strings == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"

    outputs = infer_response_json(_as_output(request))["outputs"]
    # the shortest decimals that read back as the same halves
    assert outputs[0]["data"] == [0.5, -2.0, 65500.0, 0.1, 0.0, 1.0]
    assert struct.pack("<6e", *outputs[0]["data"]) == fp16
    assert outputs[1]["data"] == [7, -7]
    assert outputs[2]["data"] == [base64.b64encode(b"ab").decode(), "Yw=="]


@pytest.mark.parametrize("datatype", sorted(RAW := {**SAMPLES}))
def test_raw_output_contents_are_decoded_for_every_datatype(datatype: str) -> None:
    flat, _ = RAW[datatype]
    if datatype == "BYTES":
        raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in flat)
    else:
        fmt = {"BOOL": "?", "FP32": "f", "FP64": "d"}.get(datatype) or {
            "INT8": "b",
            "INT16": "h",
            "INT32": "i",
            "INT64": "q",
            "UINT8": "B",
            "UINT16": "H",
            "UINT32": "I",
            "UINT64": "Q",
        }[datatype]
        raw = struct.pack(f"<6{fmt}", *flat)
    response = pb.ModelInferResponse(model_name="m", raw_output_contents=[raw])
    response.outputs.add(name="o", datatype=datatype, shape=[2, 3])
    (out,) = infer_response_json(response)["outputs"]
    if datatype == "BYTES":
        assert [base64.b64decode(s).decode() for s in out["data"]] == flat
    else:
        assert out["data"] == flat


def test_raw_output_of_the_wrong_size_is_an_internal_error() -> None:
    response = pb.ModelInferResponse(model_name="m", raw_output_contents=[b"\x00" * 5])
    response.outputs.add(name="o", datatype="INT32", shape=[2])
    with pytest.raises(RestError) as err:
        infer_response_json(response)
    assert http_status(err.value.code) == 500 and "8" in err.value.message


def test_bytes_data_as_base64_strings_and_as_byte_arrays() -> None:
    b64 = _tensor(
        "BYTES",
        ["TXkgVVRGOCBTdHJpbmc=", "QW5vdGhlcg"],  # padded and unpadded
        [2, 1],
        parameters={"content_type": "base64"},
    )
    numbers = {"name": "n", "datatype": "BYTES", "shape": [2, 1], "data": [[[83, 49]], [[50]]]}
    flat_numbers = {"name": "f", "datatype": "BYTES", "shape": [1], "data": [[104, 105]]}
    request = parse_infer_request(_body(b64, numbers, flat_numbers), "m")
    contents = [list(t.contents.bytes_contents) for t in request.inputs]
    assert contents == [[b"My UTF8 String", b"Another"], [b"S1", b"2"], [b"hi"]]
    assert request.inputs[0].parameters["content_type"].string_param == "base64"


def test_request_level_fields_and_parameters() -> None:
    body = _body(
        _tensor("INT64", [1, 2, 3, 4, 5, 6], parameters={"content_type": "np", "n": None}),
        id="req-1",
        parameters={"s": "v", "b": False, "i": 42, "whole": 3.0, "pj": {"int64_param": "9"}},
        outputs=[{"name": "predict", "parameters": {"binary_data": False}}],
    )
    request = parse_infer_request(body, "m")
    assert request.id == "req-1"
    params = request.parameters
    assert params["s"].string_param == "v"
    assert params["b"].WhichOneof("parameter_choice") == "bool_param"
    assert (params["i"].int64_param, params["whole"].int64_param, params["pj"].int64_param) == (
        42,
        3,
        9,
    )
    assert request.inputs[0].parameters["n"].WhichOneof("parameter_choice") is None
    (output,) = request.outputs
    assert output.name == "predict" and output.parameters["binary_data"].bool_param is False


def test_the_path_names_the_model_whatever_the_body_says() -> None:
    body = _body(_tensor("INT32", [1, 2, 3, 4, 5, 6]), model_name="other", model_version="7")
    assert parse_infer_request(body, "path-model").model_name == "path-model"
    assert parse_infer_request(body, "path-model").model_version == "7"
    assert parse_infer_request(body, "path-model", "3").model_version == "3"


# ---------------------------------------------------------------------- contents form


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_contents_form_is_taken_as_proto_json_writes_it(datatype: str) -> None:
    flat, field = SAMPLES[datatype]
    if datatype == "BYTES":  # proto JSON bytes are base64
        values: list[Any] = [base64.b64encode(s.encode()).decode() for s in flat]
    elif datatype in ("INT64", "UINT64"):  # proto JSON writes 64-bit integers as strings
        values = [str(v) for v in flat]
    else:
        values = flat
    tensor = {"name": "x", "datatype": datatype, "shape": [2, 3], "contents": {field: values}}
    (got,) = parse_infer_request(_body(tensor), "m").inputs
    expected = parse_infer_request(_body(_tensor(datatype, flat)), "m").inputs[0]
    assert got == expected


def test_the_seeds_contents_payload_and_camel_case_spellings() -> None:
    from modelxds.localmesh.client import SEED_BODY, SEED_REQUEST
    from modelxds.localmesh.train import SEED_INPUT

    (tensor,) = parse_infer_request(SEED_BODY, "example-mnist-isvc").inputs
    assert list(tensor.contents.fp32_contents) == SEED_INPUT
    camel = {
        "modelName": "ignored",
        "inputs": [
            {
                "name": "predict",
                "datatype": "FP32",
                "shape": [1, 64],
                "contents": {"fp32Contents": SEED_INPUT},
            }
        ],
    }
    assert parse_infer_request(json.dumps(camel).encode(), "example-mnist-isvc") == (
        parse_infer_request(json.dumps(SEED_REQUEST).encode(), "example-mnist-isvc")
    )


def test_raw_input_contents_in_proto_json() -> None:
    raw = base64.b64encode(struct.pack("<2f", 1.0, 2.0)).decode()
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}], "raw_input_contents": [raw]}
    ).encode()
    request = parse_infer_request(body, "m")
    assert list(request.raw_input_contents) == [struct.pack("<2f", 1.0, 2.0)]
    assert not request.inputs[0].HasField("contents")


# ---------------------------------------------------------------------- refused bodies


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b"not json", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "request body: must be a JSON object"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', "JSON"),
        (_body(_tensor("FP32", [1, 2, 3, 4, 5, 6]), extra=1), "extra: unknown field"),
        (
            _body(_tensor("FP32", [1, 2, 3, 4, 5, 6], colour="red")),
            "inputs[0].colour: unknown field",
        ),
        (
            _body(_tensor("FP32", [1, 2, 3, 4, 5, 6]), outputs=[{"name": "o", "binary": True}]),
            "outputs[0].binary: unknown field",
        ),
        (_body(_tensor("FLOAT32", [1, 2, 3, 4, 5, 6])), "inputs[0].datatype: unknown datatype"),
        (_body(_tensor("fp32", [1, 2, 3, 4, 5, 6])), "inputs[0].datatype"),
        (_body(_tensor("FP32", [1, 2, 3, 4, 5])), "inputs[0].data: 5 elements, but shape [2, 3]"),
        (_body(_tensor("FP32", [[1, 2], [3, 4], [5, 6]])), "inputs[0].data: nesting"),
        (_body(_tensor("FP32", [[1, 2, 3], [4, 5, [6]]])), "inputs[0].data[1][2]: nested deeper"),
        (_body(_tensor("FP32", [1, 2, 3, 4, 5, "6"])), "inputs[0].data[5]"),
        (_body(_tensor("FP32", [1, 2, 3, 4, 5, 1e39])), "inputs[0].data[5]: 1e+39 is out of range"),
        (_body(_tensor("INT8", [1, 2, 3, 4, 5, 128])), "inputs[0].data[5]: 128 is out of range"),
        (_body(_tensor("UINT16", [1, 2, 3, 4, 5, -1])), "inputs[0].data[5]: -1 is out of range"),
        (_body(_tensor("INT32", [1, 2, 3, 4, 5, 6.5])), "inputs[0].data[5]: 6.5 is not an integer"),
        (_body(_tensor("BOOL", [1, 0, 1, 1, 0, 0])), "inputs[0].data[0]: 1 is not a boolean"),
        (_body(_tensor("BYTES", ["a", "b", "c", "d", "e", 6])), "inputs[0].data[5]"),
        (
            _body(
                _tensor("BYTES", ["a", "b", "c", "d", "e", "!"], parameters={"content_type": "b64"})
            ),
            "inputs[0].data[0]: 'a' is not base64",
        ),
        (_body({"name": "x", "datatype": "FP32", "data": [1]}), "inputs[0].shape: required"),
        (_body({"name": "x", "datatype": "FP32", "shape": [1]}), "inputs[0]: needs exactly one"),
        (_body(_tensor("FP32", [1], [-1])), "inputs[0].shape: must be an array of non-negative"),
        (
            _body(
                {"name": "x", "datatype": "FP32", "shape": [1], "contents": {"int_contents": [1]}}
            ),
            "inputs[0].contents.int_contents: does not hold FP32",
        ),
        (
            _body(
                {"name": "x", "datatype": "FP32", "shape": [2], "contents": {"fp32_contents": [1]}}
            ),
            "inputs[0].contents.fp32_contents: 1 elements, but shape [2]",
        ),
        (
            _body(
                {"name": "x", "datatype": "FP32", "shape": [1], "contents": {"fp33_contents": [1]}}
            ),
            "inputs[0].contents.fp33_contents: unknown field",
        ),
        (
            _body({"name": "x", "datatype": "FP16", "shape": [1], "contents": {}}),
            "inputs[0].contents: FP16 has no contents field",
        ),
        (_body(_tensor("FP32", [1, 2, 3, 4, 5, 6]), parameters={"p": 0.5}), "parameters.p"),
        (_body(_tensor("FP32", [1, 2, 3, 4, 5, 6]), parameters={"p": [1]}), "parameters.p"),
        (b'{"inputs": []}', "inputs: must be a non-empty array"),
        (b'{"id": "x"}', "inputs: required"),
    ],
)
def test_a_malformed_body_is_a_400_naming_the_field(body: bytes, names: str) -> None:
    assert names in _bad(body)


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize(
    ("body", "names"),
    [
        # shapes the proto's int64 cannot hold: protobuf raised ValueError (a 500)
        (_body(_tensor("FP32", [1], [10**30])), "inputs[0].shape[0]: does not fit in int64"),
        (_body(_tensor("FP32", [], [2**63])), "inputs[0].shape[0]: does not fit in int64"),
        (
            _body(_tensor("FP32", [], [2**62, 2**62])),
            "inputs[0].shape: [4611686018427387904, 4611686018427387904] holds more elements",
        ),
        (_body(_tensor("FP32", [1], [1] * 65)), "inputs[0].shape: 65 dimensions, at most 64"),
        # an unpaired \ud800 escape: protobuf (UTF-8) refused the string (a 500)
        (
            _body(_tensor("BYTES", ["a", "b", "c", "d", "e", "\ud800"])),
            "inputs[0].data[5]: not valid Unicode (a lone surrogate)",
        ),
        (
            _body(_tensor("FP32", [1, 2, 3, 4, 5, 6]), id="r\udfff"),
            "id: not valid Unicode",
        ),
        (
            _body(_tensor("FP32", [1, 2, 3, 4, 5, 6], parameters={"k\ud800": 1})),
            "inputs[0].parameters: a key: not valid Unicode",
        ),
        (
            _body({"name": "x\ud800", "datatype": "FP32", "shape": [1], "data": [1]}),
            "inputs[0].name: not valid Unicode",
        ),
        # nesting past json's recursion: RecursionError (a 500)
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
            + _nested(100_000).encode()
            + b"}]}",
            "inputs[0].data: nested too deeply",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
            + b'"parameters": {"p": '
            + _nested(100_000, '{"q": 1}').encode()
            + b'}, "data": [1]}]}',
            "inputs[0].parameters.p: nested too deeply",
        ),
        (_nested(100_000).encode(), "request body: nested too deeply"),
    ],
    ids=[
        "dim-1e30",
        "dim-2^63",
        "count-overflow",
        "rank-65",
        "bytes-surrogate",
        "id-surrogate",
        "key-surrogate",
        "name-surrogate",
        "deep-data",
        "deep-parameters",
        "deep-body",
    ],
)
def test_hostile_bodies_are_a_400_naming_the_field(body: bytes, names: str) -> None:
    assert names in _bad(body)


def test_data_nested_as_deep_as_its_shape_allows_is_converted() -> None:
    # 64 dimensions: flatten recurses once per dimension, far below the recursion limit
    request = parse_infer_request(_body(_tensor("INT32", json.loads(_nested(64)), [1] * 64)), "m")
    assert list(request.inputs[0].contents.int_contents) == [1]
    # a surrogate pair is one character, not a lone surrogate
    request = parse_infer_request(_body(_tensor("BYTES", ["\U0001f600"], [1])), "m")
    assert list(request.inputs[0].contents.bytes_contents) == ["\U0001f600".encode()]


# ---------------------------------------------------------------------- documents


def test_model_metadata_document() -> None:
    meta = pb.ModelMetadataResponse(name="m__isvc-1", platform="mlserver")
    meta.inputs.add(name="predict", datatype="FP32", shape=[-1, 64])
    assert model_metadata_json(meta) == {
        "name": "m__isvc-1",
        "platform": "mlserver",
        "inputs": [{"name": "predict", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [],
    }
