"""What every input, however hostile, must come to: the invariants the atheris harnesses
(tests/fuzz/fuzz_*.py) and the hypothesis tests (tests/unit/test_fuzz_inputs.py) share.

Each ``check_*`` feeds one kind of input through the parser the way modelxds does and
raises AssertionError when it breaks a promise: only the documented error escapes, an
error names where the problem is, and what is read routes to ModelMesh pods only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from modelxds import metrics
from modelxds.epp.exchange import DESTINATION_HEADER, SUBSET_KEY, SUBSET_NAMESPACE, Exchange
from modelxds.epp.pick import Picker
from modelxds.localmesh.isvc import InferenceService, InferenceServiceError, parse_isvcs
from modelxds.modelmesh import (
    InstanceRecord,
    Layout,
    LitelinksRecord,
    ModelRecord,
    Table,
    VModelRecord,
    encode,
    read_model,
)
from modelxds.placement.model import Placement, build_mesh
from modelxds.placement.watch import PlacementWatcher
from modelxds.policy import Policy, PolicyError, default_policy, parse_policy, read_objects
from modelxds.xds.bootstrap import join_address
from modelxds.xds.builders import GRPC_METADATA_PREFIX, LB_NAMESPACE
from modelxds.xds.ir import Destination, Options, RestMode, destinations
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources
from modelxds.xds.scale import ScaleStrategy
from modelxds.xds.subset import SubsetStrategy, translate_subset

NS = "modelmesh-serving"
LAYOUT = Layout()
NOW_MS = 1_715_003_600_000
SOURCE = "fuzz.yaml"
POD_PORT = 8033
OPTIONS = Options(descriptor_set=b"")
# Names that break naive handling: regex metacharacters, path and key separators,
# percent escapes, control characters, unicode (combining, right-to-left, astral), long.
TRICKY_NAMES = [
    ".*",
    "a.b*c+?",
    "(x|y)[z]{3}\\d$^",
    "\\1",
    "%2F",
    "a/b",
    "../x",
    "a:b|c,d",
    "a\tb",
    "a\nb",
    "a\rb",
    "a\x00b",
    "\x7f",
    " m ",
    "ü\u0301",
    "\u202eevil",
    "😀",
    "x" * 5000,
    '"quoted"',
    "${x}",
    "'; drop",
]

# How RecordError and MeshTables word why a record was skipped: a field by its JSON
# name, or why the value as a whole is no record
_RECORD_WHY = re.compile(
    r"field '|not JSON|expected a JSON object|missing required field|"
    r"litelinks record needs|byte limit"
)
# A PolicyError message: the file and document, then the field path (or why the whole
# document could not be read)
_POLICY_WHERE = re.compile(rf"{re.escape(SOURCE)} document \d+")
_POLICY_WHAT = re.compile(
    r": (apiVersion|kind|items|metadata|spec)\b|: invalid (YAML|JSON)|"
    r": expected a Kubernetes object"
)
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# RFC 9110 token: what a header name is on the wire (Envoy refuses NUL, CR, LF in one)
_TOKEN = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_ANSWERS = ("request_headers", "immediate_response")


def _counter(table: str) -> float:
    return metrics.INVALID_RECORDS.labels(table)._value.get()  # type: ignore[no-any-return]


# ---- etcd keys and values -------------------------------------------------------------


def check_etcd_events(
    events: Sequence[tuple[bytes, bytes | None]], namespace: str = NS
) -> Placement:
    """Puts (a value) and deletes (None) as the watcher applies them from a watch: each
    record is read, or skipped with a reason naming its field and counted once; the
    placement built after them (of the mesh ``namespace``) routes only to registered pod
    IPs."""
    watcher = PlacementWatcher("http://127.0.0.1:1", [(namespace, LAYOUT)])
    (tables,) = watcher.tables
    for key, value in events:
        text: str | None
        try:
            text = key.decode()
        except UnicodeDecodeError:
            text = None
        parsed = LAYOUT.parse_key(text) if text is not None else None
        counted = "key" if text is None else parsed[0].value if parsed else None
        before = _counter(counted) if counted else 0.0
        old_why = tables.invalid.get(text or "")
        watcher._apply(tables, key, value)
        if parsed is None:
            assert text is None or text not in tables.invalid, text
            if counted == "key":  # not UTF-8: no key we could name, counted as such
                assert _counter("key") == before + 1
            continue
        assert text is not None and counted is not None
        table, item = parsed
        rows: Mapping[str, object] = getattr(tables, table.value)
        why = tables.invalid.get(text)
        if value is None:
            assert item not in rows and why is None, text
            assert _counter(counted) == before
        elif why is None:
            assert item in rows, text
            assert _counter(counted) == before
        else:
            assert item not in rows, text  # a record we cannot read routes nothing
            assert _RECORD_WHY.search(why), why
            assert len(why) < 1000, "a reason must stay a log line, whatever the value"
            assert _counter(counted) == before + (why != old_why), (why, old_why)
    placement = watcher.snapshot(NOW_MS)
    mesh = placement.meshes[namespace]
    registered = {r.hostname for r in tables.litelinks.values()}
    for iid, instance in mesh.instances.items():
        assert iid in tables.instances, iid  # only a pod holding its lease is live
        assert instance.host in registered
        _assert_pod_ip(instance.host)
    check_translations(placement)
    return placement


def _assert_pod_ip(host: str) -> None:
    ip = ipaddress.ip_address(host)
    assert str(ip) == host and not ip.is_unspecified and not ip.is_multicast, host


def check_translations(placement: Placement, policy: Policy | None = None) -> None:
    """Both strategies translate without an error, and every address they send to is a
    live pod's."""
    pods = {i.host for mesh in placement.meshes.values() for i in mesh.instances.values()}
    policy = policy if policy is not None else default_policy()
    for rest in RestMode:
        options = Options(descriptor_set=b"", rest=rest)
        for strategy in (SubsetStrategy(), ScaleStrategy(shards=4)):
            resources = strategy(placement, policy, options)
            assert addresses(resources) <= pods, addresses(resources) - pods
            check_internal_headers(resources)


def addresses(resources: Resources) -> set[str]:
    """Every upstream address in clusters (STATIC) and endpoints (EDS)."""
    assignments: list[endpoint_pb2.ClusterLoadAssignment] = []
    for msg in resources.get(ENDPOINT, {}).values():
        assert isinstance(msg, endpoint_pb2.ClusterLoadAssignment)
        assignments.append(msg)
    for msg in resources.get(CLUSTER, {}).values():
        assert isinstance(msg, cluster_pb2.Cluster)
        assignments.append(msg.load_assignment)
    return {
        lb.endpoint.address.socket_address.address
        for cla in assignments
        for group in cla.endpoints
        for lb in group.lb_endpoints
    }


def check_internal_headers(resources: Resources) -> None:
    """A header the gateway sets for the pods or for its own routing replaces whatever a
    client sent under that name; one it only sometimes sets is otherwise removed."""
    for msg in resources.get(ROUTE, {}).values():
        assert isinstance(msg, route_pb2.RouteConfiguration)
        for vhost in msg.virtual_hosts:
            holders = [vhost, *vhost.routes]
            for holder in holders:
                for option in holder.request_headers_to_add:
                    assert option.append_action == _OVERWRITE, option.header.key
            for route in vhost.routes:
                added = {o.header.key for o in route.request_headers_to_add}
                if route.HasField("route"):
                    # set by the route itself or by its virtual host
                    balanced = added | {o.header.key for o in vhost.request_headers_to_add}
                    assert balanced & {"mm-balanced", f"{GRPC_METADATA_PREFIX}mm-balanced"}
                for name in route.request_headers_to_remove:
                    assert name not in added


# ---- policy documents -----------------------------------------------------------------


def check_policy_text(text: str) -> Policy | None:
    """A policy file's text: a Policy, or a PolicyError whose every message names the
    document and the field; what is read translates for a gateway Envoy can take."""
    try:
        policy = parse_policy(text, SOURCE, allow_empty=True)
    except PolicyError as e:
        assert e.errors, "a PolicyError says what is wrong"
        for message in e.errors:
            assert _POLICY_WHERE.match(message), message[:300]
            assert _POLICY_WHAT.search(message), message[:300]
        return None
    check_policy(policy)
    return policy


def check_policy_objects(objects: Sequence[Mapping[str, object]]) -> Policy:
    """Kubernetes objects as the CRD watch passes them: never an exception, each problem
    naming the object."""
    policy, problems = read_objects(objects)
    for messages in problems.values():
        for message in messages:
            assert message.startswith("kubernetes"), message[:300]
            assert _POLICY_WHAT.search(message) or ": " in message, message[:300]
    check_policy(policy)
    return policy


def check_policy(policy: Policy) -> None:
    """What Envoy would refuse in a translated policy (its own checks, which the loader
    must have caught): header names are tokens, host names have no NUL, CR or LF and
    appear once per virtual host (Envoy compares them ignoring case)."""
    placement = _small_placement()
    for resources in (translate_subset(placement, policy, OPTIONS),):
        for msg in resources.get(LISTENER, {}).values():
            assert isinstance(msg, listener_pb2.Listener)
            hcm = hcm_pb2.HttpConnectionManager()
            assert msg.filter_chains[0].filters[0].typed_config.Unpack(hcm)
            for f in hcm.http_filters:
                if f.name.endswith("header_to_metadata"):
                    config = header_to_metadata_pb2.Config()
                    assert f.typed_config.Unpack(config)
                    for rule in config.request_rules:
                        assert _TOKEN.fullmatch(rule.header), rule.header
        for msg in resources.get(ROUTE, {}).values():
            assert isinstance(msg, route_pb2.RouteConfiguration)
            for vhost in msg.virtual_hosts:
                domains = [d.lower() for d in vhost.domains]
                assert len(set(domains)) == len(domains), domains
                assert not any(c in d for d in domains for c in "\0\r\n"), domains
    check_translations(placement, policy)


def _small_placement() -> Placement:
    pods = {"pod-a": "10.0.0.1", "pod-b": "10.0.0.2"}
    mesh = build_mesh(
        NS,
        registry={"m": ModelRecord(instance_ids={"pod-a": NOW_MS - 60_000})},
        vmodels={"v": VModelRecord(active_model="m", target_model="m")},
        instances={i: InstanceRecord(start_time=1) for i in pods},
        litelinks={f"{ip}_8080_1": LitelinksRecord(ip, i, 8080) for i, ip in pods.items()},
        now_ms=NOW_MS,
    )
    return Placement({NS: mesh})


# ---- InferenceService documents -------------------------------------------------------


def check_isvc_text(text: str) -> list[InferenceService]:
    """An InferenceService file: what `modelxds mesh apply` reads, or an
    InferenceServiceError naming the file; each one read registers under a key the
    watcher reads back as its own, with a record ModelMesh can parse."""
    try:
        services = parse_isvcs(text, SOURCE, required=False)
    except InferenceServiceError as e:
        assert str(e).startswith(SOURCE), str(e)[:300]
        return []
    for svc in services:
        assert _K8S_NAME.fullmatch(svc.name) and len(svc.name) <= 253, svc.name
        for table, item in ((Table.REGISTRY, svc.model_id), (Table.VMODELS, svc.name)):
            assert LAYOUT.parse_key(LAYOUT.key(table, item)) == (table, item)
        assert read_model(encode(svc.record())).record == svc.record()
    return services


# ---- requests at the endpoint picker --------------------------------------------------

PICKER_PODS = {"pod-0": "10.0.0.1", "pod-1": "10.0.0.2", "pod-2": "fd00::3"}


def picker_destination(models: Mapping[str, str] | None = None) -> Destination:
    """Three live pods; ``models``: model id -> the pod holding it (default: "m" on pod-1)."""
    held = models if models is not None else {"m": "pod-1"}
    mesh = build_mesh(
        NS,
        registry={m: ModelRecord(instance_ids={pod: 1}) for m, pod in held.items()},
        vmodels={},
        instances={i: InstanceRecord(start_time=1) for i in PICKER_PODS},
        litelinks={f"{ip}_8080_1": LitelinksRecord(ip, i, 8080) for i, ip in PICKER_PODS.items()},
        now_ms=NOW_MS,
    )
    return next(destinations(Placement({NS: mesh}), default_policy(), OPTIONS))


def pod_addresses() -> set[str]:
    return {join_address(ip, POD_PORT) for ip in PICKER_PODS.values()}


def check_exchange(
    headers: Sequence[tuple[str, bytes]],
    chunks: Sequence[bytes],
    hint: Sequence[str] = (),
    destination: Destination | None = None,
) -> tuple[str, ...]:
    """One request through the picker: headers (repeats allowed), the body in ``chunks``,
    trailers. The request is answered exactly once, with a pick of live pods on the pod
    port only (whatever address the client or the hint names), set over any header of
    that name the client sent, or refused; a passed body is echoed unchanged. Returns the
    picked endpoints (empty when refused)."""
    d = destination if destination is not None else picker_destination()
    exchange = Exchange(lambda: d, Picker(POD_PORT), ("model",))
    request = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in headers]
            ),
            end_of_stream=not chunks,
        )
    )
    if hint:
        fields = request.metadata_context.filter_metadata[SUBSET_NAMESPACE].fields
        fields[SUBSET_KEY].string_value = ",".join(hint)
    out = exchange.handle(request)
    for n, chunk in enumerate(chunks):
        body = ep.HttpBody(body=chunk, end_of_stream=n == len(chunks) - 1)
        out += exchange.handle(ep.ProcessingRequest(request_body=body))
    out += exchange.handle(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))

    kinds = [r.WhichOneof("response") for r in out]
    answers = [r for r, k in zip(out, kinds, strict=True) if k in _ANSWERS]
    assert len(answers) == 1, kinds
    (answer,) = answers
    if answer.HasField("immediate_response"):
        assert out[-1] is answer, kinds  # refused: nothing of the request goes on
        return ()
    assert out[0] is answer, kinds  # no body byte passes before the pick
    mutation = answer.request_headers.response.header_mutation
    set_headers = {o.header.key: o for o in mutation.set_headers}
    assert all(o.append_action == _OVERWRITE for o in mutation.set_headers)
    value = set_headers[DESTINATION_HEADER].header.raw_value.decode()
    picked = tuple(value.split(","))
    live = pod_addresses()
    assert picked and set(picked) <= live, picked
    narrowed = set(hint) & live
    if narrowed:
        assert set(picked) <= narrowed, (picked, hint)
    assert {"mm-balanced", f"{GRPC_METADATA_PREFIX}mm-balanced"} & set(set_headers)
    lb = answer.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields
    assert lb[DESTINATION_HEADER].string_value == value
    echoed = b"".join(
        r.request_body.response.body_mutation.streamed_response.body
        for r in out
        if r.HasField("request_body")
    )
    assert echoed == b"".join(chunks)
    return picked


def load_yaml_objects(text: str) -> list[Mapping[str, object]]:
    """The mappings in a YAML text, as a Kubernetes client would hand them over (JSON
    types only); [] for text that is not YAML."""
    try:
        docs = list(yaml.safe_load_all(text))
    except (yaml.YAMLError, ValueError, RecursionError):
        return []
    return [d for d in docs if isinstance(d, dict)]
