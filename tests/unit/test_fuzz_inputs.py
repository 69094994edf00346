"""Hostile input, drawn by hypothesis, at every parser a user or a pod can reach: etcd
keys and values, policy and InferenceService documents, requests at the endpoint picker
and the scale gateway's Lua. Each is read or refused with an error naming where; none
raises anything else, routes outside the ModelMesh pods, or lets a client set a header
the gateway uses itself. The invariants live in tests/fuzz/checks.py, shared with the
atheris harnesses there; tests/unit/test_modelmesh_records.py has the record parser's
own properties."""

from __future__ import annotations

import copy
import ipaddress
import re
import urllib.parse
from typing import Any

import yaml
from envoy.config.route.v3 import route_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.localmesh.isvc import InferenceServiceError, parse_isvcs
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, Table, encode
from modelxds.placement.model import Placement
from modelxds.policy import PolicyError, default_policy, parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.ir import Options, RestMode
from modelxds.xds.resources import ROUTE
from modelxds.xds.scale import MODEL_HEADER, SHARD_HEADER, ScaleStrategy, shard_of
from modelxds.xds.subset import NO_PODS_HEADER, translate_subset
from tests.fuzz import checks
from tests.fuzz.checks import LAYOUT, NS
from tests.unit.test_modelmesh_records import RECORD_LIKE, to_json
from tests.unit.test_translate import OPTIONS, _placement
from tests.unit.test_translate_scale import _lua, _run_lua

KEY = "modelmesh.asm.alibabacloud.com"

TRICKY = st.sampled_from(checks.TRICKY_NAMES)
NAMES = TRICKY | st.text(min_size=1, max_size=40)
SETTINGS = settings(max_examples=150, deadline=None)


# ---- etcd keys and values ----------------------------------------------------------

TABLES = st.sampled_from(list(Table))


@st.composite
def etcd_event(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # any bytes as a key, most of them outside the watched prefixes
        key = draw(st.binary(max_size=40))
        prefix = draw(st.sampled_from([b"", *(p.encode() for p in LAYOUT.watch_prefixes())]))
        key = prefix + key
    else:
        key = LAYOUT.key(draw(TABLES), draw(NAMES)).encode()
    if draw(st.booleans()) and kind:
        return key, None
    value = draw(
        st.one_of(
            st.binary(max_size=60),
            RECORD_LIKE.map(lambda d: to_json(d).encode()),
            st.builds(
                lambda iid, ip: encode(LitelinksRecord(ip, iid, 8080)),
                NAMES,
                st.sampled_from(["10.0.0.1", "[FD00::1]", "0.0.0.0", "pod.local", "fe80::1%eth0"]),
            ),
        )
    )
    return key, value


@SETTINGS
@given(st.lists(etcd_event(), max_size=12))
def test_any_etcd_keys_and_values_are_read_or_skipped_with_a_counted_reason(
    events: list[tuple[bytes, bytes | None]],
) -> None:
    checks.check_etcd_events(events)


@SETTINGS
@given(model=NAMES, iid=NAMES, ip=st.ip_addresses())
def test_a_hostile_model_or_instance_id_still_routes_to_its_pod_only(
    model: str, iid: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    if "/" in iid or "/" in model:  # no such key is a record (parse_key skips it)
        return
    events: list[tuple[bytes, bytes | None]] = [
        (LAYOUT.key(Table.INSTANCES, iid).encode(), encode(InstanceRecord(start_time=1))),
        (
            LAYOUT.key(Table.LITELINKS, "pod_8080_1").encode(),
            encode(LitelinksRecord(str(ip), iid, 8080)),
        ),
        (
            LAYOUT.key(Table.REGISTRY, model).encode(),
            encode(ModelRecord(instance_ids={iid: 1})),
        ),
    ]
    mesh = checks.check_etcd_events(events).meshes[NS]
    if ip.is_unspecified or ip.is_multicast:  # no pod's address: the pod is left out
        assert iid not in mesh.instances
    else:
        assert mesh.instances[iid].host == str(ip)
        assert mesh.routable(model) == (iid,)


# ---- policy documents --------------------------------------------------------------

SEED_DOCS: list[dict[str, Any]] = list(yaml.safe_load_all(SEED_POLICY_YAML))
HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    NAMES,
    st.just(""),
    st.just("x" * 20_000),
    st.just("a\ud800"),  # half a surrogate pair, as a YAML or JSON escape can write it
    st.lists(NAMES, max_size=3),
    st.dictionaries(NAMES, NAMES, max_size=3),
    st.just("DEFAULT_SUBSET"),
    st.just("NO_FALLBACK"),
    st.integers(0, 70_000),
)
Path = tuple[str | int, ...]


def paths(node: Any, at: Path = ()) -> list[Path]:
    """Every place in a document a value sits at."""
    out: list[Path] = [at] if at else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*at, i))
    return out


def mutate(doc: dict[str, Any], path: Path, how: str, value: Any) -> dict[str, Any]:
    """``doc`` with one change at ``path``: its value replaced, removed, an unknown field
    beside it, or (a list item) duplicated."""
    out = copy.deepcopy(doc)
    parent: Any = out
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "duplicate" and isinstance(parent, list):
        parent.insert(int(last), copy.deepcopy(parent[int(last)]))
    elif how == "extra" and isinstance(parent, dict):
        parent[f"{last}Extra"] = value
    else:
        parent[last] = value
    return out


@st.composite
def mutated(draw: st.DrawFn, docs: list[dict[str, Any]]) -> tuple[int, Path, list[dict[str, Any]]]:
    index = draw(st.integers(0, len(docs) - 1))
    path = draw(st.sampled_from(paths(docs[index])))
    how = draw(st.sampled_from(["replace", "replace", "replace", "delete", "duplicate", "extra"]))
    out = list(docs)
    out[index] = mutate(docs[index], path, how, draw(HOSTILE_VALUES))
    return index, path, out


def top_field(path: Path) -> str:
    return str(path[0])


@settings(max_examples=300, deadline=None)
@given(mutated(SEED_DOCS))
def test_a_policy_with_one_field_broken_is_read_or_refused_naming_document_and_field(
    case: tuple[int, Path, list[dict[str, Any]]],
) -> None:
    index, path, docs = case
    checks.check_policy_text(yaml.safe_dump_all(docs))
    checks.check_policy_objects(docs)
    # beside the rules it needs (a VirtualService its DestinationRule), unchanged, a
    # document that is wrong in itself is refused by name and field
    needed = [d for d in SEED_DOCS[:index] if d["kind"] == "DestinationRule"]
    text = yaml.safe_dump_all([*needed, docs[index]])
    if checks.check_policy_text(text) is None and path != ("kind",):  # kind: List is a list
        got = _policy_errors(text)
        named = [m for m in got if top_field(path) in m]
        if docs[index]["kind"] == "VirtualService" and path == ("metadata", "namespace"):
            # moved to another namespace, the VirtualService names a host with no rule there
            named += [m for m in got if "no DestinationRule" in m]
        assert named, (path, got)


def _policy_errors(text: str) -> list[str]:
    try:
        parse_policy(text, checks.SOURCE, allow_empty=True)
    except PolicyError as e:
        return e.errors
    return []


@SETTINGS
@given(
    host=NAMES,
    header=NAMES,
    key=NAMES,
    domain=NAMES,
    namespace=NAMES,
)
# half a surrogate pair, as a YAML or JSON escape can write it: no UTF-8 encoder takes it
@example(host="m", header="model", key="k\ud800", domain="d", namespace="ns")
@example(host="m", header="model", key="k", domain="d", namespace="ns\udc00")
def test_hostile_names_in_a_policy_are_refused_or_make_a_config_envoy_takes(
    host: str, header: str, key: str, domain: str, namespace: str
) -> None:
    dr, vs = copy.deepcopy(SEED_DOCS)
    dr["spec"]["host"] = host
    dr["metadata"]["namespace"] = vs["metadata"]["namespace"] = namespace
    dr["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]["subsetSelectors"][0]["keys"] = [
        key
    ]
    route = vs["spec"]["http"][0]
    route["headerToDynamicSubsetKey"] = [{"header": header, "key": key}]
    route["route"][0]["destination"]["host"] = host
    vs["spec"]["hosts"] = [domain, domain.upper()]
    # check_policy holds what is read to Envoy's own rules for header and host names
    checks.check_policy_text(yaml.safe_dump_all([dr, vs]))


# ---- InferenceService documents ----------------------------------------------------

ISVC_DOC: dict[str, Any] = {
    "apiVersion": "serving.kserve.io/v1beta1",
    "kind": "InferenceService",
    "metadata": {
        "name": "example-mnist-isvc",
        "namespace": "modelmesh-serving",
        "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh"},
    },
    "spec": {
        "predictor": {
            "model": {
                "modelFormat": {"name": "sklearn"},
                "storage": {"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"},
            }
        }
    },
}
ISVC_EXTRAS = st.sampled_from(
    [
        "2024-13-45",
        "2024-01-01",
        "!!binary AAAA",
        "!!set {a, b}",
        "1" * 5000,
        "&a [*a]",
        '"a\\ud800"',  # half a surrogate pair, which no UTF-8 record can carry
    ]
)


@settings(max_examples=300, deadline=None)
@given(mutated([ISVC_DOC]))
def test_an_inference_service_with_one_field_broken_is_read_or_refused_naming_it(
    case: tuple[int, Path, list[dict[str, Any]]],
) -> None:
    _, path, (doc,) = case
    text = yaml.safe_dump(doc)
    services = checks.check_isvc_text(text)
    if not services and doc.get("kind") == "InferenceService":
        try:
            parse_isvcs(text, checks.SOURCE, required=False)
        except InferenceServiceError as e:
            assert "document 1" in str(e) and top_field(path) in str(e), (path, str(e))


@SETTINGS
@given(ISVC_EXTRAS, st.sampled_from(["name", "path", "extra"]))
def test_yaml_values_no_json_holds_are_refused_not_raised(raw: str, where: str) -> None:
    text = yaml.safe_dump(ISVC_DOC)
    target = {
        "name": "name: example-mnist-isvc",
        "path": "path: sklearn/mnist-svm.joblib",
        "extra": "name: sklearn",
    }[where]
    assert target in text
    replaced = text.replace(target, f"{target.split(':')[0]}: {raw}", 1)
    checks.check_isvc_text(replaced)
    checks.check_policy_text(replaced)


# ---- requests at the endpoint picker -----------------------------------------------

INTERNAL = st.sampled_from(
    [
        ("x-gateway-destination-endpoint", b"8.8.8.8:53"),
        ("x-gateway-destination-endpoint", b"10.0.0.1:22,169.254.169.254:80"),
        ("X-Gateway-Destination-Endpoint", b"127.0.0.1:15000"),
        ("mm-balanced", b"false"),
        ("grpc-metadata-mm-balanced", b"false"),
        ("x-gateway-destination-endpoint-subset", b"8.8.8.8:53"),
        (MODEL_HEADER, b"forged"),
        (SHARD_HEADER, b"8008/0"),
        (NO_PODS_HEADER, b"true"),
    ]
)
HINTS = st.lists(
    st.sampled_from(["10.0.0.2:8033", "[fd00::3]:8033", "8.8.8.8:53", "10.0.0.1:22", ""]),
    max_size=3,
)
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _grpc_body(model: str) -> bytes:
    message = pb.ModelInferRequest(model_name=model, id="r").SerializeToString()
    return bytes([0]) + len(message).to_bytes(4, "big") + message


@st.composite
def request(draw: st.DrawFn, model: str) -> tuple[list[tuple[str, bytes]], list[bytes], str]:
    """(headers, body chunks, how the model is sent) for a request naming ``model``."""
    how = draw(st.sampled_from(["header", "mm-model-id", "path", "body"]))
    headers: list[tuple[str, bytes]] = []
    chunks: list[bytes] = []
    if how == "path":
        quoted = urllib.parse.quote(model, safe="")
        headers += [(":path", f"/v2/models/{quoted}/infer".encode())]
        chunks = [b"{}"]
    else:
        headers += [(":path", INFER.encode()), ("content-type", b"application/grpc")]
        if how == "body":
            body = _grpc_body(model)
            cut = draw(st.integers(0, len(body)))
            chunks = [body[:cut], body[cut:]]
        else:
            headers.append(("model" if how == "header" else how, model.encode()))
            chunks = [_grpc_body("")]
    forged = draw(st.lists(INTERNAL, max_size=4))
    noise = draw(st.lists(st.tuples(NAMES.map(str.lower), st.binary(max_size=20)), max_size=3))
    mixed = draw(st.permutations([*forged, *noise]))
    # the request's own headers come first: the picker reads the first of repeated ones
    return [*headers, *mixed], chunks, how


@SETTINGS
@given(st.data(), NAMES, HINTS)
def test_the_pick_is_only_live_pods_and_overwrites_whatever_the_client_sent(
    data: st.DataObject, model: str, hint: list[str]
) -> None:
    destination = checks.picker_destination({model: "pod-1", "m": "pod-2"})
    headers, chunks, how = data.draw(request(model))
    picked = checks.check_exchange(headers, chunks, hint, destination)
    # the model is found, however it is spelled, where the gateway can carry it: in the
    # body any text; in a header, text without NUL, CR, LF or surrounding blanks; in the
    # REST path only unreserved characters, as an escaped "/" stays escaped in routing
    readable = {
        "body": True,
        "header": model == model.strip() and not re.search(r"[\x00\r\n]", model),
        "path": re.fullmatch(r"[A-Za-z0-9._~-]+", model) is not None,
    }
    if readable.get(how, readable["header"]) and not hint:
        assert picked[0] == "10.0.0.2:8033", (how, model, picked)


@SETTINGS
@given(st.lists(st.tuples(NAMES, st.binary(max_size=30)), max_size=8), st.binary(max_size=80))
def test_any_headers_and_body_are_answered_once_by_live_pods_or_refused(
    headers: list[tuple[str, bytes]], body: bytes
) -> None:
    grpc = [(":path", INFER.encode()), ("content-type", b"application/grpc")]
    checks.check_exchange([*grpc, *headers], [body] if body else [], ())
    checks.check_exchange(headers, [body] if body else [], ())


# ---- the xDS gateway's own headers -------------------------------------------------


@SETTINGS
@given(NAMES, st.sampled_from(list(RestMode)))
def test_the_scale_gateway_routes_a_hostile_name_to_its_own_shard_whatever_the_client_sent(
    model: str, rest: RestMode
) -> None:
    options = Options(descriptor_set=OPTIONS.descriptor_set, rest=rest)
    script = _lua(ScaleStrategy(4)(_placement(), default_policy(), options))
    forged = {MODEL_HEADER: "forged", SHARD_HEADER: "8008/none"}
    got = _run_lua(script, {**_GRPC, **forged}, {KEY: model})
    assert got[SHARD_HEADER] == f"8008/{shard_of(model, 4)}"
    assert got[MODEL_HEADER] == model


_GRPC = {":path": INFER, "content-type": "application/grpc"}


@SETTINGS
@given(st.lists(NAMES, min_size=1, max_size=6, unique=True))
def test_the_subset_gateway_drops_or_overwrites_its_no_pods_header_on_every_route(
    names: list[str],
) -> None:
    placement = checks.check_etcd_events(
        [
            (LAYOUT.key(Table.INSTANCES, "p").encode(), encode(InstanceRecord(start_time=1))),
            (
                LAYOUT.key(Table.LITELINKS, "x").encode(),
                encode(LitelinksRecord("10.0.0.1", "p", 8080)),
            ),
            *(
                (LAYOUT.key(Table.REGISTRY, n).encode(), encode(ModelRecord(instance_ids={"p": 1})))
                for n in names
                if "/" not in n
            ),
        ]
    )
    for pods_up in (placement, Placement({})):
        resources = translate_subset(pods_up, default_policy(), checks.OPTIONS)
        for table in resources[ROUTE].values():
            assert isinstance(table, route_pb2.RouteConfiguration)
            for route in table.virtual_hosts[0].routes:
                if route.HasField("route"):
                    added = {o.header.key for o in route.request_headers_to_add}
                    assert (NO_PODS_HEADER in added) != (
                        NO_PODS_HEADER in route.request_headers_to_remove
                    )
