"""The "subset" strategy (ASM's dynamic subsets).

One EDS cluster per destination service whose endpoints carry, under
``envoy.lb/<subset key>``, the list of model ids and InferenceService names routable
on that pod. A header_to_metadata filter copies the request's model (policy headers,
``mm-vmodel-id``, ``mm-model-id`` or the REST path) into the same key, and Envoy's
subset load balancer with ``list_as_any`` picks a pod that holds it, falling back as
the DestinationRule says when none does.

Failover (ANY_ENDPOINT): Envoy's subset load balancer never leaves a subset it found,
even when none of its pods is healthy (by design, envoyproxy/envoy#25654), so a retry
of a model whose only holder died would go to that pod again until its lease runs out.
The routes therefore carry a metadata ``fallback_list`` (the cluster's
``metadata_fallback_policy: FALLBACK_LIST``): first the model's subset, then no subset
at all (the model key set to a name no pod holds), which is the ANY_ENDPOINT fallback.
The second is used when the first finds no healthy pod, so a pod taken out of the load
balancer (outlier detection; without the DestinationRule's, ``eject_on_refused_connection``)
sends its models' next tries to the other pods.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from modelxds.placement.model import Placement
from modelxds.policy import DestinationRule, FallbackPolicy, Policy
from modelxds.xds.builders import (
    GRPC_NOT_FOUND,
    LB_NAMESPACE,
    NO_HOLDER_HEADER,
    ads,
    apply_outlier_detection,
    balanced_header,
    build_listener,
    cluster_name,
    eds_cluster,
    eject_on_refused_connection,
    error_doc,
    grpc_match,
    header_value,
    listener_name,
    ms,
    no_model_route,
    rest_match,
    retry_policy,
    route_timeout,
    virtual_host,
)
from modelxds.xds.cache import encode_field
from modelxds.xds.ir import Destination, Options, destinations
from modelxds.xds.memo import Memo
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources

# A subset key Envoy's format strings can name as it is (DestinationRule keys are
# usually label-like: modelmesh.asm.alibabacloud.com, example.com/model)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9._/-]+")

# Set by the routes while a destination has no live pod at all.
NO_PODS_HEADER = "x-modelxds-no-pods"
# The subset key Envoy reads a route's list of metadata to try in turn from
FALLBACK_LIST = "fallback_list"
# A model no pod holds: never a model id (the registry key would be the table's own)
NO_SUCH_MODEL = ""

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


class SubsetStrategy:
    """The subset translator. It keeps each pod's encoded name list: tens of thousands
    of names a push, and an unchanged pod's list is the same bytes again."""

    def __init__(self) -> None:
        self._item: Memo[str, bytes] = Memo(_list_item)
        self._list: Memo[tuple[str, ...], bytes] = Memo(
            lambda names: b"".join(map(self._item, names))
        )

    def __call__(self, placement: Placement, policy: Policy, options: Options) -> Resources:
        self._item.next_translation()
        self._list.next_translation()
        clusters: dict[str, Message] = {}
        endpoints: dict[str, Message] = {}
        listeners: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        for d in destinations(placement, policy, options):
            failover = d.model_miss is FallbackPolicy.ANY_ENDPOINT
            grpc = cluster_name(d.fqdn, d.port)
            clusters[grpc] = build_cluster(grpc, d.rule, options, failover=failover)
            endpoints[grpc] = self.endpoints(grpc, d, d.port)
            rest = grpc
            if d.rest_port is not None:
                rest = cluster_name(d.fqdn, d.rest_port, rest=True)
                clusters[rest] = build_cluster(
                    rest, d.rule, options, http2=False, failover=failover
                )
                endpoints[rest] = self.endpoints(rest, d, d.rest_port)
            # under NO_FALLBACK a request the subset LB finds no host for asks for a model
            # no pod holds, unless there is no pod at all: the routes say which (RDS, so
            # the listener stays as it is when the last pod goes or the first comes)
            not_found = d.model_miss is FallbackPolicy.NO_FALLBACK
            pods_up = bool(d.mesh.instances)
            for listen_port in d.listen_ports:
                name = str(listen_port)
                listeners[listener_name(options, listen_port)] = build_listener(
                    listen_port,
                    hcm_pb2.Rds(config_source=ads(), route_config_name=name),
                    d,
                    options,
                    local_reply=no_holder_reply(d) if not_found else None,
                    grpc_not_found=not_found,
                )
                routes[name] = route_table(
                    name,
                    d,
                    [
                        _route(grpc_match(), grpc, d, pods_up=pods_up),
                        # REST to the REST proxy's cluster, or transcoded to gRPC's
                        _route(
                            rest_match(), rest, d, pods_up=pods_up, rest=d.rest_port is not None
                        ),
                        no_model_route(d),
                    ],
                )
        return {CLUSTER: clusters, ENDPOINT: endpoints, LISTENER: listeners, ROUTE: routes}

    def endpoints(self, name: str, d: Destination, port: int) -> endpoint_pb2.ClusterLoadAssignment:
        """Every pod on ``port``, listing under each model key the names routable to it."""
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        # Built in place: appending finished messages would deep-copy megabytes of metadata.
        lb_endpoints = cla.endpoints.add().lb_endpoints
        mesh = d.mesh
        for iid in sorted(mesh.instances):
            ep = lb_endpoints.add()
            ep.endpoint.hostname = iid
            ep.endpoint.address.socket_address.address = mesh.instances[iid].host
            ep.endpoint.address.socket_address.port_value = port
            names = mesh.names.get(iid, ())
            if names:
                # parsing one blob beats a Python Value object per name
                encoded = self._list(names)
                lb = ep.metadata.filter_metadata[LB_NAMESPACE]
                for key in d.keys:
                    lb.fields[key].list_value.MergeFromString(encoded)
        return cla


def translate_subset(placement: Placement, policy: Policy, options: Options) -> Resources:
    """One translation with nothing kept: a pure function, same input, same bytes."""
    return SubsetStrategy()(placement, policy, options)


def _list_item(name: str) -> bytes:
    """``ListValue.values`` entry (field 1) holding ``Value.string_value`` (field 3)."""
    return encode_field(1, encode_field(3, name.encode()))


def build_cluster(
    name: str,
    dr: DestinationRule,
    options: Options,
    *,
    http2: bool = True,
    failover: bool = False,
) -> cluster_pb2.Cluster:
    """``failover``: a model whose pods are all out of the load balancer goes to the
    ANY_ENDPOINT fallback (the module's docstring)."""
    Subset = cluster_pb2.Cluster.LbSubsetConfig
    subset = Subset(
        fallback_policy=_FALLBACK[dr.fallback_policy],
        # whatever the fallback: a policy change swaps clusters and routes in separate
        # updates (CDS, then a cluster warms, RDS), and a route's fallback_list read by a
        # cluster without this names no subset: no healthy upstream for every request
        metadata_fallback_policy=Subset.FALLBACK_LIST,
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
    cluster.common_lb_config.update_merge_window.CopyFrom(ms(options.update_merge_window_ms))
    # an ejected pod leaves every subset it is in: a retry, and the next requests for
    # the model, go to its other holders (or, with failover, to any pod)
    apply_outlier_detection(cluster, dr.outlier_detection)
    if failover and dr.outlier_detection is None:
        eject_on_refused_connection(cluster)
    return cluster


def failover_list(d: Destination) -> base_pb2.Metadata:
    """A route's ``metadata_match``: the model's subset, and when it has no healthy pod,
    no subset (the ANY_ENDPOINT fallback)."""
    metadata = base_pb2.Metadata()
    # first nothing changed (the request's own model), then a model no pod holds
    fallbacks = [{}, {d.model_key: NO_SUCH_MODEL}]
    metadata.filter_metadata[LB_NAMESPACE].update({FALLBACK_LIST: fallbacks})
    return metadata


def no_holder_reply(d: Destination) -> hcm_pb2.LocalReplyConfig:
    """NO_FALLBACK, and the subset load balancer found no pod for the request's model:
    404 with a V2 error body instead of Envoy's 503 "no healthy upstream"."""
    Filter = accesslog_pb2.AccessLogFilter
    names_model = metadata_pb2.MetadataMatcher(
        filter=LB_NAMESPACE,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=d.model_key)],
        value=value_pb2.ValueMatcher(
            string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
        ),
    )
    # Envoy's format strings have no quoting: a key with ':' reads a nested value, and
    # one with a line break or ')%' breaks the command, refusing the listener
    model = (
        f"model '%DYNAMIC_METADATA({LB_NAMESPACE}:{d.model_key})%'"
        if _PLAIN_KEY.fullmatch(d.model_key)
        else "the requested model"
    )
    message = f"no pod holds {model} and the DestinationRule's fallbackPolicy is NO_FALLBACK"
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
        headers_to_add=[header_value(NO_HOLDER_HEADER, "true")],
    )
    mapper.body_format_override.json_format.update(error_doc(message, GRPC_NOT_FOUND))
    return hcm_pb2.LocalReplyConfig(mappers=[mapper])


def route_table(
    name: str, d: Destination, routes: Sequence[route_components_pb2.Route]
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[virtual_host(d, routes=routes)])


def _route(
    match: route_components_pb2.RouteMatch,
    cluster: str,
    d: Destination,
    *,
    pods_up: bool,
    rest: bool = False,
) -> route_components_pb2.Route:
    """To ``cluster``'s pods: their gRPC port, or with ``rest`` their REST proxy."""
    route = route_components_pb2.Route(
        match=match,
        route=route_components_pb2.RouteAction(
            cluster=cluster, timeout=route_timeout(d), retry_policy=retry_policy(d.retries)
        ),
        request_headers_to_add=[balanced_header(rest=rest)],
    )
    if d.model_miss is FallbackPolicy.ANY_ENDPOINT:
        route.route.metadata_match.CopyFrom(failover_list(d))
    # With no pod at all, the subset LB's "no host" is no model miss: the request says
    # so, and no_holder_reply keeps Envoy's 503. A client's own such header is dropped.
    if pods_up:
        route.request_headers_to_remove.append(NO_PODS_HEADER)
    else:
        route.request_headers_to_add.append(header_value(NO_PODS_HEADER, "true"))
    return route
