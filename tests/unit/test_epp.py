"""The endpoint picker without a network: which model a request names, whom it picks,
and what it says back on the ext_proc stream."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import given
from hypothesis import strategies as st

from modelxds.epp.exchange import DESTINATION_HEADER, MAX_CHUNK, Exchange
from modelxds.epp.extract import BodyModel, model_from_grpc_body, model_from_headers
from modelxds.epp.pick import Outcome, Picker
from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.model import Placement, build_mesh
from modelxds.policy import default_policy, parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.ir import Destination, Options, destinations

NOW = 1_000_000_000
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _frame(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


def _infer(model: str, **fields: Any) -> bytes:
    return _frame(pb.ModelInferRequest(model_name=model, **fields).SerializeToString())


def _destination(
    loaded: dict[str, list[str]] | None = None,
    loading: dict[str, list[str]] | None = None,
    pods: int = 3,
    policy_text: str | None = None,
    rpm: dict[str, int] | None = None,
) -> Destination:
    ids = [f"pod-{i}" for i in range(pods)]
    instances = {i: InstanceRecord(start_time=1, rpm=(rpm or {}).get(i, 0)) for i in ids}
    litelinks = {
        i: LitelinksRecord(hostname=f"10.0.0.{n + 1}", instance_id=i, port=8080)
        for n, i in enumerate(ids)
    }
    registry: dict[str, ModelRecord] = {}
    for model, holders in (loaded or {}).items():
        registry[model] = ModelRecord(instance_ids={h: 1 for h in holders})
    for model, holders in (loading or {}).items():
        started = dict(registry.get(model, ModelRecord()).instance_ids)
        started.update({h: NOW - 10 for h in holders})
        registry[model] = ModelRecord(instance_ids=started)
    vmodels = {"isvc": VModelRecord(owner="isvc", active_model="m", target_model="m")}
    mesh = build_mesh("modelmesh-serving", registry, vmodels, instances, litelinks, NOW)
    policy = parse_policy(policy_text) if policy_text else default_policy()
    placement = Placement({"modelmesh-serving": mesh})
    return next(destinations(placement, policy, Options(descriptor_set=b"")))


# -- the model of a request ------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "model"),
    [
        ({":path": "/v2/models/example-mnist-isvc/infer"}, "example-mnist-isvc"),
        ({":path": "/v2/models/m/versions/3/infer?trace=1"}, "m"),
        ({":path": "/v2/models/my%2Dmodel/ready"}, "my-model"),
        ({":path": "/v2/models/a%2Fb/infer"}, "a%2Fb"),  # an escaped slash stays escaped
        ({":path": INFER, "mm-vmodel-id": "v", "mm-model-id": "m"}, "v"),
        ({":path": INFER, "mm-model-id": "m"}, "m"),
        ({":path": INFER, "model": "by-policy", "mm-vmodel-id": "v"}, "by-policy"),
        ({":path": "/v2/models/by-path/infer", "model": "by-policy"}, "by-path"),
        ({":path": INFER}, None),
        ({":path": "/v2/health/ready"}, None),
    ],
)
def test_the_model_comes_from_the_path_then_the_policy_headers_then_modelmesh_headers(
    headers: dict[str, str], model: str | None
) -> None:
    assert model_from_headers(headers, ("model",)) == model


def test_model_name_is_read_from_the_body_across_every_chunk_boundary() -> None:
    body = _infer(
        "example-mnist-isvc", id="req-1", inputs=[pb.ModelInferRequest.InferInputTensor(name="x")]
    )
    for cut in range(len(body)):
        first = model_from_grpc_body(body[:cut], complete=False)
        whole = model_from_grpc_body(body, complete=True)
        assert whole.state is BodyModel.FOUND and whole.model == "example-mnist-isvc"
        if cut < 5 + 2 + len("example-mnist-isvc"):
            assert first.state is BodyModel.MORE, cut
        else:
            assert first.model == "example-mnist-isvc", cut


def test_a_body_without_model_name_compressed_or_broken_is_told_apart() -> None:
    no_name = _frame(pb.ModelInferRequest(id="x").SerializeToString())
    assert model_from_grpc_body(no_name, complete=True).state is BodyModel.ABSENT
    assert model_from_grpc_body(_frame(b"", 0), complete=True).state is BodyModel.ABSENT
    assert model_from_grpc_body(_frame(b"\x0a\x01m", 1), False).state is BodyModel.UNREADABLE
    for broken, why in [
        (b"\x00\x00", "frame prefix"),
        (b"\x07" + bytes(4), "frame flag"),
        (_frame(b"\x0a\x05ab"), "longer than its message"),
        (_frame(b"\x0a\x02\xff\xfe"), "not UTF-8"),
        (_frame(b"\x0b"), "wire type"),
        (_frame(b"\x00\x01"), "field number 0"),
        (_frame(b"\x10" + b"\xff" * 11), "varint"),
    ]:
        got = model_from_grpc_body(broken, complete=True)
        assert got.state is BodyModel.MALFORMED and why in got.why, (broken, got)


@given(st.binary(max_size=200))
def test_no_body_bytes_make_the_parser_fail(data: bytes) -> None:
    for complete in (False, True):
        got = model_from_grpc_body(data, complete)
        assert isinstance(got.state, BodyModel)
        if complete:
            assert got.state is not BodyModel.MORE


# -- the pick ---------------------------------------------------------------------------


def test_loaded_copies_come_first_least_loaded_first_then_loading_then_any_pod() -> None:
    d = _destination(
        loaded={"m": ["pod-0", "pod-2"]}, loading={"m": ["pod-1"]}, rpm={"pod-0": 50, "pod-2": 5}
    )
    pick = Picker(8033).pick(d, "m")
    assert pick.outcome is Outcome.HOLDER
    assert pick.endpoints == ("10.0.0.3:8033", "10.0.0.1:8033", "10.0.0.2:8033")
    # an InferenceService name picks its active model's copies
    assert Picker(8033).pick(d, "isvc").endpoints[:2] == ("10.0.0.3:8033", "10.0.0.1:8033")


def test_equally_loaded_holders_take_turns_and_the_rest_follow_for_retries() -> None:
    d = _destination(loaded={"m": ["pod-0", "pod-1"]})
    picker = Picker(8033)
    firsts = {picker.pick(d, "m").endpoints[0] for _ in range(4)}
    assert firsts == {"10.0.0.1:8033", "10.0.0.2:8033"}
    assert picker.pick(d, "m").endpoints[2] == "10.0.0.3:8033"


def test_only_loading_copies_are_picked_before_a_second_load() -> None:
    pick = Picker(8033).pick(_destination(loading={"m": ["pod-2"]}), "m")
    assert pick.outcome is Outcome.LOADING and pick.endpoints[0] == "10.0.0.3:8033"


def test_an_unknown_model_falls_back_to_every_pod_unless_no_fallback() -> None:
    pick = Picker(8033).pick(_destination(), "never-loaded")
    assert pick.outcome is Outcome.FALLBACK and len(pick.endpoints) == 3
    strict = SEED_POLICY_YAML.replace("ANY_ENDPOINT", "NO_FALLBACK")
    d = _destination(loaded={"m": ["pod-1"]}, policy_text=strict)
    assert Picker(8033).pick(d, "never-loaded").outcome is Outcome.NOT_FOUND
    assert Picker(8033).pick(d, "m").endpoints == ("10.0.0.2:8033",)  # no others to retry


def test_no_live_pod_is_unavailable_and_the_subset_hint_limits_the_pick() -> None:
    assert Picker(8033).pick(_destination(pods=0), "m").outcome is Outcome.UNAVAILABLE
    d = _destination(loaded={"m": ["pod-0"]})
    hinted = Picker(8033).pick(d, "m", allowed={"10.0.0.2:8033"})
    assert hinted.outcome is Outcome.FALLBACK and hinted.endpoints == ("10.0.0.2:8033",)


# -- the ext_proc stream ----------------------------------------------------------------


def _headers(headers: dict[str, str], end_of_stream: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
                    for k, v in headers.items()
                ]
            ),
            end_of_stream=end_of_stream,
        )
    )


def _body(data: bytes, end_of_stream: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


GRPC = {"content-type": "application/grpc", ":path": INFER}


def _exchange(d: Destination | None) -> Exchange:
    return Exchange(lambda: d, Picker(8033), ("model",))


def _set_headers(r: ep.ProcessingResponse) -> dict[str, str]:
    mutation = r.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def _echoed(responses: list[ep.ProcessingResponse]) -> tuple[bytes, bool]:
    out, eos = b"", False
    for r in responses:
        assert r.WhichOneof("response") == "request_body"
        streamed = r.request_body.response.body_mutation.streamed_response
        out += streamed.body
        eos = streamed.end_of_stream
    return out, eos


def test_a_header_named_model_is_answered_at_once_and_the_body_echoed() -> None:
    x = _exchange(_destination(loaded={"m": ["pod-1"]}))
    (r,) = x.handle(_headers({**GRPC, "mm-vmodel-id": "m"}))
    headers = _set_headers(r)
    assert headers[DESTINATION_HEADER].startswith("10.0.0.2:8033,")
    assert headers["mm-balanced"] == "true"
    lb = r.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DESTINATION_HEADER]
    assert lb.string_value == headers[DESTINATION_HEADER]
    assert r.request_headers.response.clear_route_cache
    assert _echoed(x.handle(_body(b"abc", True))) == (b"abc", True)


def test_a_model_only_in_the_body_holds_the_headers_until_field_1_arrives() -> None:
    x = _exchange(_destination(loaded={"m": ["pod-2"]}))
    body = _infer("m", inputs=[pb.ModelInferRequest.InferInputTensor(name="t")])
    assert x.handle(_headers({**GRPC})) == []
    assert x.handle(_body(body[:6], False)) == []  # held: field 1 not complete yet
    first, *echo = x.handle(_body(body[6:], True))
    assert _set_headers(first)[DESTINATION_HEADER].startswith("10.0.0.3:8033")
    assert _echoed(echo) == (body, True)  # every held byte, unchanged


def test_large_bodies_echo_in_chunks_of_at_most_62_kib() -> None:
    x = _exchange(_destination(loaded={"m": ["pod-0"]}))
    x.handle(_headers({**GRPC, "model": "m"}))
    big = bytes(range(256)) * 1000
    responses = x.handle(_body(big, False))
    assert all(
        len(r.request_body.response.body_mutation.streamed_response.body) <= MAX_CHUNK
        for r in responses
    )
    assert _echoed(responses) == (big, False)
    (trailers,) = x.handle(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))
    assert trailers.WhichOneof("response") == "request_trailers"


def test_rest_gets_the_rest_proxy_form_of_mm_balanced() -> None:
    x = _exchange(_destination(loaded={"m": ["pod-0"]}))
    (r,) = x.handle(_headers({":path": "/v2/models/m/infer", "content-type": "application/json"}))
    assert _set_headers(r)["grpc-metadata-mm-balanced"] == "true"


def test_no_fallback_answers_404_for_rest_and_not_found_for_grpc() -> None:
    d = _destination(policy_text=SEED_POLICY_YAML.replace("ANY_ENDPOINT", "NO_FALLBACK"))
    (rest,) = _exchange(d).handle(_headers({":path": "/v2/models/nope/infer"}))
    assert rest.immediate_response.status.code == 404
    assert b'"code": 5' in rest.immediate_response.body
    (grpc,) = _exchange(d).handle(_headers({**GRPC, "model": "nope"}))
    assert grpc.immediate_response.grpc_status.status == 5


def test_no_live_pod_or_no_placement_yet_answers_503_unavailable() -> None:
    for d in (_destination(pods=0), None):
        (r,) = _exchange(d).handle(_headers({**GRPC, "model": "m"}))
        assert r.immediate_response.status.code == 503
        assert r.immediate_response.grpc_status.status == 14


def test_a_malformed_body_is_invalid_argument_and_nothing_breaks() -> None:
    x = _exchange(_destination())
    x.handle(_headers({**GRPC}))
    (r,) = x.handle(_body(b"\x09garbage", True))
    assert r.immediate_response.grpc_status.status == 3
    assert b"frame flag" in r.immediate_response.body
    assert x.handle(_body(b"more", True)) == []  # after the answer: silence
    stray = _exchange(_destination())
    assert stray.handle(_body(b"x", True)) == []  # a body before headers is ignored
    assert stray.handle(ep.ProcessingRequest()) == []


def test_response_messages_are_passed_back_unchanged() -> None:
    x = _exchange(_destination(loaded={"m": ["pod-0"]}))
    x.handle(_headers({**GRPC, "model": "m"}))
    (h,) = x.handle(ep.ProcessingRequest(response_headers=ep.HttpHeaders()))
    assert h.WhichOneof("response") == "response_headers"
    (b,) = x.handle(
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"out", end_of_stream=False))
    )
    assert b.response_body.response.body_mutation.streamed_response.body == b"out"
    (t,) = x.handle(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    assert t.WhichOneof("response") == "response_trailers"
