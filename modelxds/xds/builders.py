"""Envoy resources both strategies build alike: names, listeners and their filters,
the gateway's own error answers, retries, and the small protobuf helpers."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from modelxds.kserve import SERVICE_NAME
from modelxds.policy.model import HttpRetry, OutlierDetection
from modelxds.xds.ir import Destination, Options, RestMode

LB_NAMESPACE = "envoy.lb"
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
# Lua: is the request gRPC? Envoy's own test: the content type starts with application/grpc
LUA_IS_GRPC = '(headers:get("content-type") or ""):sub(1, 16) == "application/grpc"'
# gRPC status codes in the gateway's own answers
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_UNAVAILABLE = 14
# A zero timeout: model loads can take minutes, and ModelMesh holds the request meanwhile.
NO_TIMEOUT = duration_pb2.Duration(seconds=0)
# Istio's circuit breaker limit for retries (math.MaxUint32): no limit
UNLIMITED = 2**32 - 1

_LUA_SAFE = frozenset(string.ascii_letters + string.digits + " -_./:,;{}[]()<>=!?*#'%")


def cluster_name(fqdn: str, port: int, *, rest: bool = False) -> str:
    """Istio's naming, familiar in config_dump; a REST proxy's cluster says ``rest`` where
    Istio names a subset, so it never takes the name of a gRPC port's cluster."""
    return f"outbound|{port}|{'rest' if rest else ''}|{fqdn}"


def listener_name(options: Options, port: int) -> str:
    return f"{options.listen_address}_{port}"


def eds_cluster(name: str, options: Options, *, http2: bool = True) -> cluster_pb2.Cluster:
    """A destination service's pods over EDS, least request; gRPC (HTTP/2) upstream, or
    HTTP/1.1 for a REST proxy."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads()),
        connect_timeout=ms(options.connect_timeout_ms),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        typed_extension_protocol_options=http2_upstream() if http2 else {},
        circuit_breakers=unlimited_retries(),
    )


def unlimited_retries() -> circuit_breaker_pb2.CircuitBreakers:
    """No limit on retries under way, as Istio sets it. Envoy's default allows 3 at once
    per cluster: when a pod dies, every request in flight to it and every request routed
    to it until it leaves fails at once and wants a retry, and past the third each one
    failed with the dead pod's error (counted as upstream_rq_retry_overflow)."""
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                max_retries=wrappers_pb2.UInt32Value(value=UNLIMITED)
            )
        ]
    )


def http2_upstream() -> dict[str, any_pb2.Any]:
    """``typed_extension_protocol_options`` for gRPC (HTTP/2) to the pods."""
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(http2)}


def build_listener(
    port: int,
    routes: hcm_pb2.Rds | hcm_pb2.ScopedRoutes,
    d: Destination,
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
        http_filter("envoy.filters.http.header_to_metadata", header_rules(d)),
        *model_filters,
    ]
    if options.rest is RestMode.TRANSCODE:
        filters.append(http_filter("envoy.filters.http.lua", data_form_guard()))
        filters.append(
            http_filter(
                "envoy.filters.http.grpc_json_transcoder",
                transcoder_pb2.GrpcJsonTranscoder(
                    proto_descriptor_bin=options.descriptor_set,
                    services=[SERVICE_NAME],
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
        filters.append(http_filter("envoy.filters.http.lua", grpc_not_found_filter()))
    filters.append(http_filter("envoy.filters.http.router", router_pb2.Router()))
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
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=options.listen_address, port_value=port
            )
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=pack(hcm),
                    )
                ]
            )
        ],
    )


def header_rules(d: Destination) -> header_to_metadata_pb2.Config:
    """Request model -> ``envoy.lb/<key>``. Later rules overwrite earlier ones.

    ModelMesh's own headers first, then the headers the VirtualService names, and
    the REST path last: the transcoder puts the path's model into the body, and the
    body is what ModelMesh serves. The implicit sources (ModelMesh headers, path)
    feed the model key.
    """
    Config = header_to_metadata_pb2.Config
    rules = [_header_rule(h, d.model_key) for h in MODELMESH_HEADERS]
    rules.extend(_header_rule(h.header, h.key) for h in d.headers)
    rules.append(
        Config.Rule(
            header=":path",
            on_header_present=Config.KeyValuePair(
                metadata_namespace=LB_NAMESPACE,
                key=d.model_key,
                regex_value_rewrite=regex_pb2.RegexMatchAndSubstitute(
                    pattern=regex_pb2.RegexMatcher(regex=REST_MODEL_PATH), substitution="\\1"
                ),
            ),
        )
    )
    return Config(request_rules=rules)


def _header_rule(header: str, key: str) -> header_to_metadata_pb2.Config.Rule:
    Config = header_to_metadata_pb2.Config
    return Config.Rule(
        header=header,
        on_header_present=Config.KeyValuePair(metadata_namespace=LB_NAMESPACE, key=key),
    )


def error_doc(message: str, grpc_code: int) -> dict[str, str | int]:
    """A gateway error as the pods' REST proxy words its own: the V2 REST protocol's
    ``error`` and grpc-gateway's ``code`` / ``message``, so either kind of client reads it."""
    return {"error": message, "code": grpc_code, "message": message}


def error_body(message: str, grpc_code: int) -> str:
    return json.dumps(error_doc(message, grpc_code))


def grpc_not_found_filter() -> lua_pb2.Lua:
    """Envoy answers a gRPC client's local reply with the status an HTTP proxy's code
    maps to, UNIMPLEMENTED for 404; the gateway's "no pod holds the model" is NOT_FOUND,
    as ModelMesh itself says for a model it does not know."""
    return lua(
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
    return lua(
        f"""\
local BODY = {lua_string(error_body(message, GRPC_INVALID_ARGUMENT))}
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


def lua(script: str) -> lua_pb2.Lua:
    return lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=script))


def lua_string(text: str) -> str:
    """A Lua string literal of any text: other than a few plain ASCII characters, each
    byte is a ``\\ddd`` escape."""
    body = "".join(chr(b) if chr(b) in _LUA_SAFE else f"\\{b:03d}" for b in text.encode())
    return f'"{body}"'


def virtual_host(d: Destination, **fields: object) -> route_components_pb2.VirtualHost:
    """The VirtualService's virtual host: its name and hosts, and ``fields``."""
    return route_components_pb2.VirtualHost(
        name=d.virtual_host,
        domains=list(d.domains),
        **fields,
    )


def grpc_match() -> route_components_pb2.RouteMatch:
    return route_components_pb2.RouteMatch(
        prefix="/", grpc=route_components_pb2.RouteMatch.GrpcRouteMatchOptions()
    )


def rest_match() -> route_components_pb2.RouteMatch:
    return route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=REST_API_PATH))


# Envoy refuses a whole route table whose direct response body is over 4 KiB (its
# max_direct_response_body_size_bytes); the body says the message twice.
_LISTED_HEADERS = 10
_LISTED_HEADER_CHARS = 100


def no_model_route(d: Destination) -> route_components_pb2.Route:
    """REST outside the V2 API: there is no model to route by, and no pod would serve it."""
    names = list(dict.fromkeys([*(h.header for h in d.headers), *MODELMESH_HEADERS]))
    # a policy may name many or very long headers: the body lists what fits
    shown = [
        n if len(n) <= _LISTED_HEADER_CHARS else f"{n[: _LISTED_HEADER_CHARS - 3]}..."
        for n in names[:_LISTED_HEADERS]
    ]
    if len(names) > _LISTED_HEADERS:
        shown.append(f"{len(names) - _LISTED_HEADERS} more")
    headers = ", ".join(shown)
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
        response_headers_to_add=[header_value("content-type", "application/json")],
    )


def retry_policy(retries: HttpRetry | None = None) -> route_components_pb2.RetryPolicy | None:
    """The VirtualService route's ``retries`` over the gateway's default, as Istio lays
    them over its own: ``attempts`` sets the number (0: no retry policy at all, None),
    ``retryOn`` replaces the conditions and status codes, ``perTryTimeout`` bounds each
    try. Another pod is preferred for every retry either way."""
    policy = _default_retry_policy()
    if retries is None:
        return policy
    if retries.attempts == 0:
        return None
    policy.num_retries.value = retries.attempts
    if retries.retry_on is not None:
        policy.retry_on = ",".join(retries.retry_on)
        del policy.retriable_status_codes[:]
        policy.retriable_status_codes.extend(retries.retriable_status_codes)
    if retries.per_try_timeout_ms is not None:
        # Envoy's router resets a try that times out, and retries it when retry_on has
        # reset, 5xx or gateway-error (the default's reset does)
        policy.per_try_timeout.CopyFrom(ms(retries.per_try_timeout_ms))
    return policy


def route_timeout(d: Destination) -> duration_pb2.Duration:
    """The VirtualService route's ``timeout``, else none (NO_TIMEOUT)."""
    return NO_TIMEOUT if d.timeout_ms is None else ms(d.timeout_ms)


def apply_outlier_detection(cluster: cluster_pb2.Cluster, od: OutlierDetection | None) -> None:
    """The DestinationRule's ``outlierDetection`` on ``cluster``, as Istio translates
    it: each consecutive-errors field given is enforced (0 turns it off), success-rate
    ejection stays off, and the panic threshold is ``minHealthPercent`` (0: an ejected
    pod gets no traffic however few pods are left)."""
    if od is None:
        return
    out = outlier_detection_pb2.OutlierDetection(
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0)
    )
    if od.consecutive_5xx_errors is not None:
        out.consecutive_5xx.value = od.consecutive_5xx_errors
        out.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx_errors else 0
    if od.consecutive_gateway_errors is not None:
        out.consecutive_gateway_failure.value = od.consecutive_gateway_errors
        out.enforcing_consecutive_gateway_failure.value = (
            100 if od.consecutive_gateway_errors else 0
        )
    if od.interval_ms is not None:
        out.interval.CopyFrom(ms(od.interval_ms))
    if od.base_ejection_time_ms is not None:
        out.base_ejection_time.CopyFrom(ms(od.base_ejection_time_ms))
    if od.max_ejection_percent:  # Istio: 0 is unset, Envoy's default 10 %
        out.max_ejection_percent.value = od.max_ejection_percent
    cluster.outlier_detection.CopyFrom(out)
    panic = cluster.common_lb_config.healthy_panic_threshold
    panic.SetInParent()  # 0 must be sent: absent is Envoy's 50 %
    panic.value = od.min_health_percent


def eject_on_refused_connection(cluster: cluster_pb2.Cluster) -> None:
    """A host that refuses (or drops) a connection is taken out of the load balancer at
    once, however few hosts are left, and nothing unhealthy is chosen anyway (panic
    threshold 0). Only local-origin failures count: a host's answers, errors included,
    are its own business.

    The subset strategy's pods without the DestinationRule's ``outlierDetection``: a
    dead pod stays in placement until its etcd lease runs out, and Envoy would go on
    choosing it meanwhile; taken out, it leaves its subsets, so the next try of a
    request goes elsewhere (``subset.failover_list``). The endpoint picker's gateway: a
    stream to a picker known down fails open (``epp.gateway``)."""
    cluster.outlier_detection.CopyFrom(
        outlier_detection_pb2.OutlierDetection(
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=1),
            enforcing_consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=100),
            enforcing_local_origin_success_rate=wrappers_pb2.UInt32Value(value=0),
            enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(value=0),
            enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=0),
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
            # several pods may die together (a node); with none left, nothing would answer
            max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
            # short: a pod that refused for a moment (or every pod, in a network blip) is
            # back within seconds; a dead one is ejected again by its next refusal, each
            # time longer, up to the max, until its lease runs out (Envoy's defaults: 30 s
            # from the first, up to 300 s, returned by a sweep every 10 s)
            interval=ms(1000),
            base_ejection_time=ms(1000),
            max_ejection_time=ms(5000),
        )
    )
    panic = cluster.common_lb_config.healthy_panic_threshold
    panic.SetInParent()  # 0: a subset whose pods are all out has no pod, never a dead one
    panic.value = 0


def _default_retry_policy() -> route_components_pb2.RetryPolicy:
    return route_components_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream,reset",
        # 4, not 2: a model whose only pod just died has nowhere else to go until the
        # pod's first refused connection ejects it and the worker threads see it out
        # (a main-thread update); until then every try goes to the dead pod. 2 retries
        # (back-off up to 25 then 75 ms) lost 3 requests in 855 on a loaded 2-core CI
        # machine; 4 wait up to 175 and 250 ms more.
        num_retries=wrappers_pb2.UInt32Value(value=4),
        # a retry goes to another pod, so one that just died is left behind: the load
        # balancer picks again while it picks a host already tried, up to this many times,
        # then takes it anyway. With two holders, one dead, a request fails when its try
        # and both retries land on the dead one: 1 in 512 with 3 re-picks, 1 in 32,768
        # with 6.
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=6,
    )


def balanced_header(*, rest: bool = False) -> base_pb2.HeaderValueOption:
    """ModelMesh: serve from the local copy; without this the pod may forward
    the request again and spend the hop this gateway saved. A pod's REST proxy passes
    it on only as a ``grpc-metadata-`` header."""
    return header_value(f"{GRPC_METADATA_PREFIX if rest else ''}mm-balanced", "true")


def header_value(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def http_filter(name: str, config: Message) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(config))


def ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def ms(milliseconds: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(milliseconds)
    return d


def pack(msg: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed
