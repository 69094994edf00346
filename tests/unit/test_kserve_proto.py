import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.message import Message

from modelxds import kserve
from modelxds.kserve import grpc_predict_v2_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED = (
    "grpc_predict_v2_pb2.py",
    "grpc_predict_v2_pb2.pyi",
    "grpc_predict_v2_pb2_grpc.py",
    "grpc_predict_v2.pb",
)


def test_committed_outputs_match_a_fresh_build(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(REPO_ROOT / "proto" / "build.sh"), str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
    )
    committed = REPO_ROOT / "modelxds" / "kserve"
    stale = [
        name
        for name in GENERATED
        if (tmp_path / name).read_bytes() != (committed / name).read_bytes()
    ]
    assert not stale, f"{stale} differ from proto/grpc_predict_v2.proto; run `make proto`"


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(kserve.descriptor_set_bytes())


def _http_rules() -> dict[str, http_pb2.HttpRule]:
    files = {f.name: f for f in _descriptor_set().file}
    predict = files["grpc_predict_v2.proto"]
    assert predict.package == "inference"
    (service,) = [s for s in predict.service if f"inference.{s.name}" == kserve.SERVICE_NAME]
    return {m.name: m.options.Extensions[annotations_pb2.http] for m in service.method}


def test_descriptor_set_is_self_contained() -> None:
    # The transcoder resolves every import from the set itself, so the
    # google.api options must travel with it.
    names = {f.name for f in _descriptor_set().file}
    assert {"google/api/annotations.proto", "google/api/http.proto"} <= names
    assert "google/protobuf/descriptor.proto" in names


def _route(rule: http_pb2.HttpRule) -> tuple[str, str, str]:
    verb = rule.WhichOneof("pattern")
    assert verb is not None
    return verb, getattr(rule, verb), rule.body


@pytest.mark.parametrize(
    ("method", "routes"),
    [
        ("ServerLive", [("get", "/v2/health/live", "")]),
        ("ServerReady", [("get", "/v2/health/ready", "")]),
        ("ServerMetadata", [("get", "/v2", "")]),
        (
            "ModelReady",
            [
                ("get", "/v2/models/{name}/ready", ""),
                ("get", "/v2/models/{name}/versions/{version}/ready", ""),
            ],
        ),
        (
            "ModelMetadata",
            [
                ("get", "/v2/models/{name}", ""),
                ("get", "/v2/models/{name}/versions/{version}", ""),
            ],
        ),
        (
            "ModelInfer",
            [
                ("post", "/v2/models/{model_name}/infer", "*"),
                ("post", "/v2/models/{model_name}/versions/{model_version}/infer", "*"),
            ],
        ),
    ],
)
def test_rest_routes_follow_kserve_v2(method: str, routes: list[tuple[str, str, str]]) -> None:
    rule = _http_rules()[method]
    assert [_route(rule)] + [_route(extra) for extra in rule.additional_bindings] == routes


def test_descriptor_set_covers_exactly_the_served_methods() -> None:
    assert set(_http_rules()) == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }


def test_rest_payload_parses_into_model_infer_request() -> None:
    pixels = [0.0, 0.0, 1.0] + [0.5] * 61
    payload = {
        "inputs": [
            {
                "name": "predict",
                "shape": [1, 64],
                "datatype": "FP32",
                "contents": {"fp32_contents": pixels},
            }
        ]
    }
    request = json_format.Parse(json.dumps(payload), pb.ModelInferRequest())

    (tensor,) = request.inputs
    assert tensor.name == "predict"
    assert list(tensor.shape) == [1, 64]
    assert tensor.datatype == "FP32"
    assert list(tensor.contents.fp32_contents) == pixels


def test_rest_payload_accepts_lower_camel_names() -> None:
    payload = '{"id": "r1", "inputs": [{"name": "x", "contents": {"int64Contents": ["7"]}}]}'
    request = json_format.Parse(payload, pb.ModelInferRequest())
    assert request.id == "r1"
    assert list(request.inputs[0].contents.int64_contents) == [7]


def test_wire_field_numbers_match_kserve() -> None:
    # Real ModelMesh pods decode by number; these must never drift.
    def numbers(message: type[Message]) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.ModelInferRequest) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    assert numbers(pb.ModelInferResponse) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "outputs": 5,
        "raw_output_contents": 6,
    }
    assert numbers(pb.InferTensorContents) == {
        "bool_contents": 1,
        "int_contents": 2,
        "int64_contents": 3,
        "uint_contents": 4,
        "uint64_contents": 5,
        "fp32_contents": 6,
        "fp64_contents": 7,
        "bytes_contents": 8,
    }
    assert numbers(pb.InferParameter) == {"bool_param": 1, "int64_param": 2, "string_param": 3}
    assert numbers(pb.ModelInferRequest.InferInputTensor) == {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    }
