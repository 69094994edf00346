"""Placement + routing policy -> Envoy resources. A pure function: same input, same bytes.

The "subset" strategy (ASM's dynamic subsets): one EDS cluster per destination
service whose endpoints carry, under ``envoy.lb/<subset key>``, the list of
model ids and InferenceService names routable on that pod. A header_to_metadata
filter copies the request's model (policy headers, ``mm-vmodel-id``,
``mm-model-id`` or the REST path) into the same key, and Envoy's subset load
balancer with ``list_as_any`` picks a pod that holds it, falling back as the
DestinationRule says when none does.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from modelxds.placement.model import MeshPlacement, Placement
from modelxds.policy import DestinationRule, FallbackPolicy, HttpRoute, Policy, VirtualService
from modelxds.policy.model import resolve_host
from modelxds.xds.cache import encode_field
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources

LB_NAMESPACE = "envoy.lb"
KSERVE_SERVICE = "inference.GRPCInferenceService"
# Headers ModelMesh itself routes by: a gateway that understands them needs no extra header.
MODELMESH_HEADERS = ("mm-model-id", "mm-vmodel-id")
# /v2/models/<name>[/versions/<v>][/infer|/ready][?query] -> <name>; any other path -> ""
# which header_to_metadata skips, so a gRPC method path never poses as a model name.
REST_MODEL_PATH = r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?(?:/infer|/ready)?/?(?:\?.*)?$|^.*$"
# The KServe V2 REST API (route matching sees the path without its query string).
REST_API_PATH = r"^/v2(?:/.*)?$"
# ModelMesh Serving's REST proxy (grpc-gateway) passes on as gRPC metadata only the
# headers with this prefix, stripped.
GRPC_METADATA_PREFIX = "grpc-metadata-"
# Set on the gateway's own "no pod holds the model" answers, so the response filter can
# give gRPC clients NOT_FOUND: Envoy maps an HTTP 404 to UNIMPLEMENTED for them.
NO_HOLDER_HEADER = "x-modelxds-no-holder"
# Set by the subset strategy's routes while a destination has no live pod at all.
NO_PODS_HEADER = "x-modelxds-no-pods"
# Lua: is the request gRPC? Envoy's own test: the content type starts with application/grpc
LUA_IS_GRPC = '(headers:get("content-type") or ""):sub(1, 16) == "application/grpc"'
# gRPC status codes in the gateway's own answers
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_UNAVAILABLE = 14

_FALLBACK = {
    FallbackPolicy.ANY_ENDPOINT: cluster_pb2.Cluster.LbSubsetConfig.ANY_ENDPOINT,
    FallbackPolicy.NO_FALLBACK: cluster_pb2.Cluster.LbSubsetConfig.NO_FALLBACK,
    FallbackPolicy.DEFAULT_SUBSET: cluster_pb2.Cluster.LbSubsetConfig.DEFAULT_SUBSET,
}
_SELECTOR_FALLBACK = {
    FallbackPolicy.ANY_ENDPOINT: cluster_pb2.Cluster.LbSubsetConfig.LbSubsetSelector.ANY_ENDPOINT,
    FallbackPolicy.NO_FALLBACK: cluster_pb2.Cluster.LbSubsetConfig.LbSubsetSelector.NO_FALLBACK,
    FallbackPolicy.DEFAULT_SUBSET: (
        cluster_pb2.Cluster.LbSubsetConfig.LbSubsetSelector.DEFAULT_SUBSET
    ),
}


class RestMode(enum.Enum):
    """How the gateway serves KServe V2 REST (HTTP/1.1, JSON) requests."""

    # to the REST proxy of the holder (ModelMesh Serving runs one on every pod, :8008),
    # which takes both JSON forms of the V2 protocol
    PROXY = "proxy"
    # transcoded to gRPC by the gateway, for meshes without the REST proxy; only the
    # protobuf JSON ``contents`` form maps onto the gRPC message
    TRANSCODE = "transcode"


@dataclass(frozen=True, slots=True)
class Options:
    """Knobs that are not part of the routing policy."""

    descriptor_set: bytes  # KServe V2 proto descriptors for the REST -> gRPC transcoder
    listen_address: str = "0.0.0.0"
    default_port: int = 8033  # ModelMesh's gRPC inference port when the VS names none
    rest: RestMode = RestMode.PROXY
    rest_port: int = 8008  # the pods' REST proxy port when the VS names none
    connect_timeout_ms: int = 1000
    # Envoy batches metadata-only endpoint updates for this long (default 1 s);
    # small, so a new copy takes traffic soon after it appears in etcd.
    update_merge_window_ms: int = 50


@dataclass(frozen=True, slots=True)
class Destination:
    """One VirtualService route resolved against the policy and the placement."""

    vs: VirtualService
    http: HttpRoute
    rule: DestinationRule
    fqdn: str
    port: int  # the pods' gRPC port
    rest_port: int | None  # the pods' REST proxy port; None: REST is transcoded to gRPC
    mesh: MeshPlacement


def destinations(placement: Placement, policy: Policy, options: Options) -> Iterator[Destination]:
    """Every routed destination, shared by both strategies so they read the policy alike."""
    for vs in policy.virtual_services:
        for http in vs.routes:
            dr = policy.destination_rule_for(http.destination_host, vs.namespace)
            if dr is None:  # the policy loader rejects this; skip rather than crash
                continue
            fqdn = resolve_host(http.destination_host, vs.namespace)
            namespace = fqdn.split(".")[1]
            port = http.destination_port or options.default_port
            rest_port = vs.rest_port or options.rest_port
            mesh = placement.meshes.get(namespace, MeshPlacement(namespace))
            yield Destination(
                vs,
                http,
                dr,
                fqdn,
                port,
                rest_port if options.rest is RestMode.PROXY else None,
                mesh,
            )


def model_miss_policy(d: Destination) -> FallbackPolicy:
    """The fallback for a model no pod has: Envoy uses the selector whose keys are
    exactly the request's (the model key), else the rule's own fallback."""
    model_key = d.http.header_keys[0].key
    return next(
        (s.fallback_policy for s in d.rule.selectors if s.keys == (model_key,)),
        d.rule.fallback_policy,
    )


def translate(placement: Placement, policy: Policy, options: Options) -> Resources:
    clusters: dict[str, Message] = {}
    endpoints: dict[str, Message] = {}
    listeners: dict[str, Message] = {}
    routes: dict[str, Message] = {}
    for d in destinations(placement, policy, options):
        keys = model_keys(d.http)
        grpc = cluster_name(d.fqdn, d.port)
        clusters[grpc] = build_cluster(grpc, d.rule, options)
        endpoints[grpc] = build_endpoints(grpc, d.mesh, keys, d.port)
        rest = grpc
        if d.rest_port is not None:
            rest = cluster_name(d.fqdn, d.rest_port, rest=True)
            clusters[rest] = build_cluster(rest, d.rule, options, http2=False)
            endpoints[rest] = build_endpoints(rest, d.mesh, keys, d.rest_port)
        # under NO_FALLBACK a request the subset LB finds no host for asks for a model no
        # pod holds, unless there is no pod at all: the routes say which (RDS, so the
        # listener stays as it is when the last pod goes or the first comes)
        not_found = model_miss_policy(d) is FallbackPolicy.NO_FALLBACK
        pods_up = bool(d.mesh.instances)
        for listen_port in d.http.ports:
            route_name = str(listen_port)
            listeners[listener_name(options, listen_port)] = build_listener(
                listen_port,
                rds(route_name),
                d.http,
                options,
                local_reply=no_holder_reply(d.http) if not_found else None,
                grpc_not_found=not_found,
            )
            routes[route_name] = route_config(
                route_name,
                d,
                [
                    _route(grpc_match(), grpc, pods_up=pods_up),
                    # REST to the REST proxy's cluster, or transcoded to gRPC's
                    _route(rest_match(), rest, pods_up=pods_up, rest_proxy=d.rest_port is not None),
                    no_model_route(d.http),
                ],
            )
    return {CLUSTER: clusters, ENDPOINT: endpoints, LISTENER: listeners, ROUTE: routes}


def cluster_name(fqdn: str, port: int, *, rest: bool = False) -> str:
    """Istio's naming, familiar in config_dump; a REST proxy's cluster says ``rest`` where
    Istio names a subset, so it never takes the name of a gRPC port's cluster."""
    return f"outbound|{port}|{'rest' if rest else ''}|{fqdn}"


def listener_name(options: Options, port: int) -> str:
    return f"{options.listen_address}_{port}"


def model_keys(http: HttpRoute) -> tuple[str, ...]:
    """Subset keys that carry the model: those the VirtualService maps headers to."""
    return tuple(dict.fromkeys(h.key for h in http.header_keys))


def rds(route_name: str) -> hcm_pb2.Rds:
    return hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name)


def build_cluster(
    name: str, dr: DestinationRule, options: Options, *, http2: bool = True
) -> cluster_pb2.Cluster:
    Subset = cluster_pb2.Cluster.LbSubsetConfig
    subset = Subset(
        fallback_policy=_FALLBACK[dr.fallback_policy],
        subset_selectors=[
            Subset.LbSubsetSelector(
                keys=list(s.keys), fallback_policy=_SELECTOR_FALLBACK[s.fallback_policy]
            )
            for s in dr.selectors
        ],
        # a pod whose metadata lists many models joins the subset of each one
        list_as_any=True,
    )
    if dr.default_subset:
        subset.default_subset.update(dict(dr.default_subset))
    cluster = eds_cluster(name, options, http2=http2)
    cluster.lb_subset_config.CopyFrom(subset)
    cluster.common_lb_config.update_merge_window.CopyFrom(_ms(options.update_merge_window_ms))
    return cluster


def eds_cluster(name: str, options: Options, *, http2: bool = True) -> cluster_pb2.Cluster:
    """A destination service's pods over EDS, least request; gRPC (HTTP/2) upstream, or
    HTTP/1.1 for a REST proxy."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_ms(options.connect_timeout_ms),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        typed_extension_protocol_options=http2_upstream() if http2 else {},
    )


def http2_upstream() -> dict[str, any_pb2.Any]:
    """``typed_extension_protocol_options`` for gRPC (HTTP/2) to the pods."""
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(http2)}


def build_endpoints(
    name: str, mesh: MeshPlacement, keys: Iterable[str], port: int
) -> endpoint_pb2.ClusterLoadAssignment:
    keys = tuple(keys)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    # Built in place: appending finished messages would deep-copy megabytes of metadata.
    lb_endpoints = cla.endpoints.add().lb_endpoints
    for iid in sorted(mesh.instances):
        ep = lb_endpoints.add()
        ep.endpoint.hostname = iid
        ep.endpoint.address.socket_address.address = mesh.instances[iid].host
        ep.endpoint.address.socket_address.port_value = port
        names = mesh.names.get(iid, ())
        if names:
            encoded = _encoded_list(names)
            lb = ep.metadata.filter_metadata[LB_NAMESPACE]
            for key in keys:
                lb.fields[key].list_value.MergeFromString(encoded)
    return cla


@lru_cache(maxsize=4096)
def _encoded_list(names: tuple[str, ...]) -> bytes:
    """A serialized ListValue of strings. Tens of thousands of names per push: parsing one
    blob beats a Python Value object per name, and an unchanged pod's blob is reused."""
    return b"".join(map(_list_item, names))


@lru_cache(maxsize=1 << 20)
def _list_item(name: str) -> bytes:
    """``ListValue.values`` entry (field 1) holding ``Value.string_value`` (field 3)."""
    return encode_field(1, encode_field(3, name.encode()))


def build_listener(
    port: int,
    routes: hcm_pb2.Rds | hcm_pb2.ScopedRoutes,
    http: HttpRoute,
    options: Options,
    model_filters: Sequence[hcm_pb2.HttpFilter] = (),
    *,
    local_reply: hcm_pb2.LocalReplyConfig | None = None,
    grpc_not_found: bool = False,
) -> listener_pb2.Listener:
    """``model_filters`` run right after the model is in ``envoy.lb`` metadata;
    ``grpc_not_found`` gives the gateway's "no pod holds the model" answers to gRPC
    clients as NOT_FOUND."""
    filters = [
        _http_filter("envoy.filters.http.header_to_metadata", header_rules(http)),
        *model_filters,
    ]
    if options.rest is RestMode.TRANSCODE:
        filters.append(_http_filter("envoy.filters.http.lua", data_form_guard()))
        filters.append(
            _http_filter(
                "envoy.filters.http.grpc_json_transcoder",
                transcoder_pb2.GrpcJsonTranscoder(
                    proto_descriptor_bin=options.descriptor_set,
                    services=[KSERVE_SERVICE],
                    print_options=transcoder_pb2.GrpcJsonTranscoder.PrintOptions(
                        preserve_proto_field_names=True
                    ),
                    convert_grpc_status=True,
                ),
            )
        )
    if grpc_not_found:
        # next to the router: a response passes it first, before the transcoder turns a
        # gRPC status into the HTTP one a REST client gets
        filters.append(_http_filter("envoy.filters.http.lua", grpc_not_found_filter()))
    filters.append(_http_filter("envoy.filters.http.router", router_pb2.Router()))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"gateway_{port}",
        # one port for gRPC (HTTP/2) and REST (HTTP/1.1), as ModelMesh's own service
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        # RFC 3986 normalization: /v2/models/my%2Dmodel/infer names model my-model
        normalize_path=wrappers_pb2.BoolValue(value=True),
        http_filters=filters,
    )
    if local_reply is not None:
        hcm.local_reply_config.CopyFrom(local_reply)
    if isinstance(routes, hcm_pb2.Rds):
        hcm.rds.CopyFrom(routes)
    else:
        hcm.scoped_routes.CopyFrom(routes)
    return listener_pb2.Listener(
        name=listener_name(options, port),
        address=_address(options.listen_address, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(hcm),
                    )
                ]
            )
        ],
    )


def error_doc(message: str, grpc_code: int) -> dict[str, str | int]:
    """A gateway error as the pods' REST proxy words its own: the V2 REST protocol's
    ``error`` and grpc-gateway's ``code`` / ``message``, so either kind of client reads it."""
    return {"error": message, "code": grpc_code, "message": message}


def error_body(message: str, grpc_code: int) -> str:
    return json.dumps(error_doc(message, grpc_code))


def no_holder_reply(http: HttpRoute) -> hcm_pb2.LocalReplyConfig:
    """NO_FALLBACK, and the subset load balancer found no pod for the request's model:
    404 with a V2 error body instead of Envoy's 503 "no healthy upstream"."""
    model_key = http.header_keys[0].key
    Filter = accesslog_pb2.AccessLogFilter
    names_model = metadata_pb2.MetadataMatcher(
        filter=LB_NAMESPACE,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=model_key)],
        value=value_pb2.ValueMatcher(
            string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
        ),
    )
    message = (
        f"no pod holds model '%DYNAMIC_METADATA({LB_NAMESPACE}:{model_key})%' "
        "and the DestinationRule's fallbackPolicy is NO_FALLBACK"
    )
    pods_up = route_components_pb2.HeaderMatcher(
        name=NO_PODS_HEADER, present_match=True, invert_match=True
    )
    mapper = hcm_pb2.ResponseMapper(
        filter=Filter(
            and_filter=accesslog_pb2.AndFilter(
                filters=[
                    Filter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["UH"])),
                    Filter(
                        metadata_filter=accesslog_pb2.MetadataFilter(
                            matcher=names_model,
                            match_if_key_not_found=wrappers_pb2.BoolValue(value=False),
                        )
                    ),
                    Filter(header_filter=accesslog_pb2.HeaderFilter(header=pods_up)),
                ]
            )
        ),
        status_code=wrappers_pb2.UInt32Value(value=404),
        headers_to_add=[_header(NO_HOLDER_HEADER, "true")],
    )
    mapper.body_format_override.json_format.update(error_doc(message, GRPC_NOT_FOUND))
    return hcm_pb2.LocalReplyConfig(mappers=[mapper])


def grpc_not_found_filter() -> lua_pb2.Lua:
    """Envoy answers a gRPC client's local reply with the status an HTTP proxy's code
    maps to, UNIMPLEMENTED for 404; the gateway's "no pod holds the model" is NOT_FOUND,
    as ModelMesh itself says for a model it does not know."""
    return _lua(
        f"""\
function envoy_on_response(response)
  local headers = response:headers()
  if headers:get("{NO_HOLDER_HEADER}") ~= nil and headers:get("grpc-status") ~= nil then
    headers:replace("grpc-status", "{GRPC_NOT_FOUND}")
  end
end
"""
    )


def data_form_guard() -> lua_pb2.Lua:
    """With ``--rest transcode``: the transcoder maps protobuf JSON onto ModelInferRequest
    and drops fields it does not know, so a V2 ``data`` tensor would reach the model as
    an empty one. Answer such a body 400 instead, saying why."""
    message = (
        "this gateway transcodes KServe V2 REST to gRPC (--rest transcode) and reads only "
        'the protobuf JSON form of tensors ("contents": {"fp32_contents": [...]}); send '
        'that form, or run the pods\' REST proxy and the gateway with --rest proxy to use "data"'
    )
    return _lua(
        f"""\
local BODY = {_lua_long_string(error_body(message, GRPC_INVALID_ARGUMENT))}
function envoy_on_request(request)
  local headers = request:headers()
  local path = headers:get(":path") or ""
  if headers:get(":method") ~= "POST" or {LUA_IS_GRPC} or path:sub(1, 11) ~= "/v2/models/" then
    return
  end
  local body = request:body()
  if body ~= nil and body:getBytes(0, body:length()):find('"data"%s*:') then
    request:respond({{[":status"] = "400", ["content-type"] = "application/json"}}, BODY)
  end
end
"""
    )


def _lua(script: str) -> lua_pb2.Lua:
    return lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=script))


def _lua_long_string(text: str) -> str:
    """A Lua long string literal: no escapes inside, so JSON goes in as it is."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def header_rules(http: HttpRoute) -> header_to_metadata_pb2.Config:
    """Request model -> ``envoy.lb/<key>``. Later rules overwrite earlier ones.

    ModelMesh's own headers first, then the headers the VirtualService names, and
    the REST path last: the transcoder puts the path's model into the body, and the
    body is what ModelMesh serves. The implicit sources (ModelMesh headers, path)
    feed the first mapped key, the model key.
    """
    Config = header_to_metadata_pb2.Config
    model_key = http.header_keys[0].key
    rules = [_header_rule(h, model_key) for h in MODELMESH_HEADERS]
    rules.extend(_header_rule(h.header, h.key) for h in http.header_keys)
    rules.append(
        Config.Rule(
            header=":path",
            on_header_present=Config.KeyValuePair(
                metadata_namespace=LB_NAMESPACE,
                key=model_key,
                regex_value_rewrite=regex_pb2.RegexMatchAndSubstitute(
                    pattern=regex_pb2.RegexMatcher(regex=REST_MODEL_PATH), substitution="\\1"
                ),
            ),
        )
    )
    return Config(request_rules=rules)


def route_config(
    name: str, d: Destination, routes: Sequence[route_components_pb2.Route]
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=f"{d.vs.namespace}/{d.vs.name}",
                domains=list(d.vs.hosts) or ["*"],
                routes=routes,
            )
        ],
    )


def grpc_match() -> route_components_pb2.RouteMatch:
    return route_components_pb2.RouteMatch(
        prefix="/", grpc=route_components_pb2.RouteMatch.GrpcRouteMatchOptions()
    )


def rest_match() -> route_components_pb2.RouteMatch:
    return route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=REST_API_PATH))


def _route(
    match: route_components_pb2.RouteMatch,
    cluster: str,
    *,
    pods_up: bool,
    rest_proxy: bool = False,
) -> route_components_pb2.Route:
    """To ``cluster``'s pods: their gRPC port, or with ``rest_proxy`` their REST proxy."""
    route = route_components_pb2.Route(
        match=match,
        route=route_components_pb2.RouteAction(
            cluster=cluster,
            # model loads can take minutes; ModelMesh holds the request meanwhile
            timeout=duration_pb2.Duration(seconds=0),
            retry_policy=retry_policy(),
        ),
        request_headers_to_add=[balanced_header(rest=rest_proxy)],
    )
    # With no pod at all, the subset LB's "no host" is no model miss: the request says
    # so, and no_holder_reply keeps Envoy's 503. A client's own such header is dropped.
    if pods_up:
        route.request_headers_to_remove.append(NO_PODS_HEADER)
    else:
        route.request_headers_to_add.append(_header(NO_PODS_HEADER, "true"))
    return route


def no_model_route(http: HttpRoute) -> route_components_pb2.Route:
    """REST outside the V2 API: there is no model to route by, and no pod would serve it."""
    headers = ", ".join(dict.fromkeys([*(h.header for h in http.header_keys), *MODELMESH_HEADERS]))
    message = (
        "no model in this request: expected a KServe V2 REST path (/v2/models/{name}/infer, "
        f"/v2/models/{{name}}/ready, /v2/models/{{name}}) or gRPC with one of the headers "
        f"{headers} or the model_name field"
    )
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        direct_response=route_components_pb2.DirectResponseAction(
            status=400,
            body=base_pb2.DataSource(inline_string=error_body(message, GRPC_INVALID_ARGUMENT)),
        ),
        response_headers_to_add=[_header("content-type", "application/json")],
    )


def retry_policy() -> route_components_pb2.RetryPolicy:
    return route_components_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream,reset",
        num_retries=wrappers_pb2.UInt32Value(value=2),
        # a retry goes to another pod, so one that just died is left behind
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )


def balanced_header(*, rest: bool = False) -> base_pb2.HeaderValueOption:
    """ModelMesh: serve from the local copy; without this the pod may forward
    the request again and spend the hop this gateway saved. A pod's REST proxy passes
    it on only as a ``grpc-metadata-`` header."""
    return _header(f"{GRPC_METADATA_PREFIX if rest else ''}mm-balanced", "true")


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _header_rule(header: str, key: str) -> header_to_metadata_pb2.Config.Rule:
    Config = header_to_metadata_pb2.Config
    return Config.Rule(
        header=header,
        on_header_present=Config.KeyValuePair(metadata_namespace=LB_NAMESPACE, key=key),
    )


def _http_filter(name: str, config: Message) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=_any(config))


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _ms(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(ms)
    return d


def _any(msg: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed
