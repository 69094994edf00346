"""The "scale" strategy: a cluster per pod and an O(1) route per model.

Envoy's subset load balancer rebuilds every subset on every endpoint update, on
every worker thread: about 0.9 s and 1.5 GB at 20,000 models on 100 pods with 8
workers. This strategy keeps placement out of clusters and endpoints altogether:

* CDS: one STATIC cluster per pod and one cluster of all pods (EDS, LEAST_REQUEST)
  for the fallback. Only pods coming and going change CDS/EDS (under ANY_ENDPOINT
  every pod's cluster then, see retries below); loads and unloads never do.
* LDS: the subset strategy's ``header_to_metadata`` filter puts the request's model
  into ``envoy.lb/<model key>`` exactly as there; a ``header_mutation`` filter then
  copies it into the ``x-modelxds-model`` request header, and a one-line Lua filter
  makes Envoy route again with that header.
* RDS: the virtual host's matcher maps each model id and vmodel id (exact match on
  that header, a hash map in Envoy) to a route whose ``weighted_clusters`` spread
  over the pods routable for it; anything else gets the DestinationRule's fallback.

Placement changes touch only RDS, which Envoy's workers share.

Retries: Envoy picks one of the ``weighted_clusters`` per request and every retry
stays in it, so a retry cannot reach another holder the way the subset load
balancer's does. With an ANY_ENDPOINT fallback each pod's cluster therefore lists
the other pods at priority 1, and the retry policy moves each retry to a priority
not yet tried: a first try always goes to a holder, a retry after a connection
failure to another pod (which serves or forwards it, as on a fallback). Under
NO_FALLBACK or DEFAULT_SUBSET a pod's cluster is that pod alone and retries stay on
it, since sending them anywhere would break the rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2, regex_pb2, string_pb2

from modelxds.placement.model import Instance, MeshPlacement, Placement
from modelxds.policy import FallbackPolicy, HttpRoute, Policy
from modelxds.xds.cache import encode_field
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources
from modelxds.xds.translate import (
    LB_NAMESPACE,
    Destination,
    Options,
    _ads,
    _http_filter,
    _ms,
    balanced_header,
    build_listener,
    cluster_name,
    destinations,
    http2_upstream,
    listener_name,
    model_keys,
    retry_policy,
)

# The request header routes match on; whatever the client sent under this name is dropped.
MODEL_HEADER = "x-modelxds-model"
# Envoy picks the route before the first HTTP filter runs and keeps it: a header set by
# a filter changes nothing unless a later filter clears that cache. No built-in filter
# does so on request (the transcoder does only for the REST requests it rewrites).
REROUTE = lua_pb2.Lua(
    default_source_code=base_pb2.DataSource(
        inline_string="function envoy_on_request(request) request:clearRouteCache() end"
    )
)


def translate_scale(placement: Placement, policy: Policy, options: Options) -> Resources:
    """Same contract as ``translate``: a pure function, same input, same bytes."""
    clusters: dict[str, Message] = {}
    endpoints: dict[str, Message] = {}
    listeners: dict[str, Message] = {}
    routes: dict[str, Message] = {}
    for d in destinations(placement, policy, options):
        service = cluster_name(d.fqdn, d.port)
        clusters[service] = build_service_cluster(service, options)
        endpoints[service] = build_service_endpoints(service, d.mesh, d.port)
        pods = {iid: pod_cluster_name(d.fqdn, d.port, iid) for iid in sorted(d.mesh.instances)}
        failover = model_miss_policy(d) is FallbackPolicy.ANY_ENDPOINT
        for iid, name in pods.items():
            others = [d.mesh.instances[o] for o in pods if o != iid] if failover else []
            clusters[name] = build_pod_cluster(name, d.mesh.instances[iid], others, d.port, options)
        model_filters = [
            _http_filter("envoy.filters.http.header_mutation", model_header(d.http)),
            _http_filter("envoy.filters.http.lua", REROUTE),
        ]
        match_map = model_match_map(d.mesh, d.fqdn, d.port)
        for listen_port in d.http.ports:
            route_name = str(listen_port)
            listeners[listener_name(options, listen_port)] = build_listener(
                listen_port, route_name, d.http, options, model_filters
            )
            routes[route_name] = build_scale_route_config(route_name, d, service, pods, match_map)
    return {CLUSTER: clusters, ENDPOINT: endpoints, LISTENER: listeners, ROUTE: routes}


def pod_cluster_name(fqdn: str, port: int, instance_id: str) -> str:
    """``<instance id>.<namespace>:<port>``: short, because every route names up to three
    of these and a gateway holds one route per model and InferenceService (40,000 at
    20,000 models); an Istio-style ``outbound|port|subset|fqdn`` would double the RDS."""
    return f"{instance_id}.{fqdn.split('.')[1]}:{port}"


def build_pod_cluster(
    name: str, pod: Instance, others: Sequence[Instance], port: int, options: Options
) -> cluster_pb2.Cluster:
    """The pod at priority 0, ``others`` at priority 1 for retries only: no health
    checks run, so the pod always looks healthy and takes every first try.

    STATIC: it depends on the pods alone, so loads and unloads never touch it.
    """
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    _add_endpoints(cla.endpoints.add(), [pod], port)
    if others:
        _add_endpoints(cla.endpoints.add(priority=1), others, port)
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=cla,
        connect_timeout=_ms(options.connect_timeout_ms),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,  # among ``others``
        typed_extension_protocol_options=http2_upstream(),
    )


def build_service_cluster(name: str, options: Options) -> cluster_pb2.Cluster:
    """Every pod, for requests whose model no pod can be chosen for."""
    return cluster_pb2.Cluster(
        name=name,
        # EDS: a pod joining or leaving updates hosts in place instead of replacing
        # the cluster (and draining its connections)
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_ms(options.connect_timeout_ms),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        typed_extension_protocol_options=http2_upstream(),
    )


def build_service_endpoints(
    name: str, mesh: MeshPlacement, port: int
) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    _add_endpoints(cla.endpoints.add(), [mesh.instances[i] for i in sorted(mesh.instances)], port)
    return cla


def _add_endpoints(
    group: endpoint_pb2.LocalityLbEndpoints, pods: Iterable[Instance], port: int
) -> None:
    for pod in pods:
        ep = group.lb_endpoints.add()
        ep.endpoint.hostname = pod.id
        ep.endpoint.address.socket_address.address = pod.host
        ep.endpoint.address.socket_address.port_value = port


def model_header(http: HttpRoute) -> header_mutation_pb2.HeaderMutation:
    """``envoy.lb/<key>`` (set by header_to_metadata) -> the ``x-modelxds-model`` header.

    A header a client sent itself is removed first. Then one mutation per key the
    VirtualService maps, the model key last: Envoy skips a mutation whose value
    formats empty (the key is absent), so the last key present wins.
    """
    keys = [h.key for h in http.header_keys[1:]] + [http.header_keys[0].key]
    Mutation = mutation_rules_pb2.HeaderMutation
    mutations = [Mutation(remove=MODEL_HEADER)]
    mutations.extend(
        Mutation(
            append=base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(
                    key=MODEL_HEADER, value=f"%DYNAMIC_METADATA({LB_NAMESPACE}:{key})%"
                ),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
        for key in keys  # the policy loader allows each key once
    )
    return header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(request_mutations=mutations)
    )


def build_scale_route_config(
    name: str, d: Destination, service: str, pods: Mapping[str, str], match_map: bytes
) -> route_pb2.RouteConfiguration:
    """Exact model name -> a route over its pods (``match_map``, from model_match_map);
    ``on_no_match`` is the fallback."""
    config = route_pb2.RouteConfiguration(name=name)
    # built in place: a nested message passed to a constructor is copied, megabytes here
    vhost = config.virtual_hosts.add(
        name=f"{d.vs.namespace}/{d.vs.name}",
        domains=list(d.vs.hosts) or ["*"],
        # once here rather than in each of 10,000s of routes
        retry_policy=failover_retry_policy(),
        request_headers_to_add=[balanced_header()],
    )
    vhost.matcher.on_no_match.CopyFrom(_fallback(d, service, pods))
    if match_map:  # an empty map is invalid; without a tree every request takes on_no_match
        tree = vhost.matcher.matcher_tree
        tree.input.CopyFrom(_model_input())
        tree.exact_match_map.MergeFromString(match_map)
    return config


def model_match_map(mesh: MeshPlacement, fqdn: str, port: int) -> bytes:
    """A serialized ``MatchMap``: every routable model id and vmodel id -> its route.

    Tens of thousands of entries: joining cached bytes and parsing them once is several
    times faster than filling the protobuf map entry by entry.
    """
    return b"".join(
        [_map_entry(name, holders, fqdn, port) for name, holders in routable_names(mesh).items()]
    )


def failover_retry_policy() -> route_components_pb2.RetryPolicy:
    """The subset strategy's retries; each retry also goes to a priority not tried yet
    (a pod's cluster: from the pod to the others)."""
    policy = retry_policy()
    policy.retry_priority.name = "envoy.retry_priorities.previous_priorities"
    policy.retry_priority.typed_config.Pack(
        previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=1)
    )
    return policy


def routable_names(mesh: MeshPlacement) -> dict[str, tuple[str, ...]]:
    """``mesh.routable(name)`` for every model id and vmodel id that has pods."""
    names = {model: copies.routable for model, copies in mesh.models.items() if copies.routable}
    for vid, vmodel in mesh.vmodels.items():
        active = mesh.models.get(vmodel.active)
        if vid not in mesh.models and active is not None and active.routable:
            names[vid] = active.routable
    return names


@lru_cache(maxsize=1 << 18)
def _map_entry(name: str, holders: tuple[str, ...], fqdn: str, port: int) -> bytes:
    """``MatchMap.map`` (field 1) entry: key (field 1), value. Cached whole: most names
    keep their pods from one push to the next, so a push mostly joins cached bytes."""
    clusters = tuple(pod_cluster_name(fqdn, port, i) for i in holders)
    return encode_field(1, encode_field(1, name.encode()) + _on_match(clusters))


@lru_cache(maxsize=1 << 16)
def _on_match(clusters: tuple[str, ...]) -> bytes:
    """``MatchMap.map`` entry value (field 2): an ``OnMatch`` routing to ``clusters``.
    Cached: a push changes few pod sets, and an InferenceService shares its model's."""
    on_match = _route_action(_spread(clusters)).SerializeToString(deterministic=True)
    return encode_field(2, on_match)


def _spread(clusters: tuple[str, ...]) -> route_components_pb2.RouteAction:
    # model loads can take minutes; ModelMesh holds the request meanwhile
    no_timeout = duration_pb2.Duration(seconds=0)
    if len(clusters) == 1:  # most models have one copy; Envoy builds this route faster
        return route_components_pb2.RouteAction(cluster=clusters[0], timeout=no_timeout)
    # Equal weights: every holder has the model loaded, so any of them serves it at once;
    # weighting by free capacity would change every route on every load elsewhere.
    WeightedCluster = route_components_pb2.WeightedCluster
    return route_components_pb2.RouteAction(
        weighted_clusters=WeightedCluster(
            clusters=[
                WeightedCluster.ClusterWeight(name=c, weight=wrappers_pb2.UInt32Value(value=1))
                for c in clusters
            ]
        ),
        timeout=no_timeout,
    )


def _route_action(action: route_components_pb2.RouteAction) -> matcher_pb2.Matcher.OnMatch:
    return _route_on_match(route_components_pb2.Route(match=_ANY_PATH, route=action))


def _route_on_match(route: route_components_pb2.Route) -> matcher_pb2.Matcher.OnMatch:
    on_match = matcher_pb2.Matcher.OnMatch()
    on_match.action.name = "route"
    on_match.action.typed_config.Pack(route)
    return on_match


# A matcher action's own RouteMatch is not consulted, but the field is required.
_ANY_PATH = route_components_pb2.RouteMatch(prefix="/")


def _fallback(d: Destination, service: str, pods: Mapping[str, str]) -> matcher_pb2.Matcher.OnMatch:
    """What the subset load balancer does without a subset for the request.

    A model no pod has gets the fallback of the selector on the model key; a request
    without a model (say gRPC with the name only in the body) gets the rule's own.
    """
    rule = d.rule
    for_model = model_miss_policy(d)
    miss = _fallback_action(for_model, d, service, pods)
    if for_model is rule.fallback_policy:
        return miss
    present = matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
        value_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(
                google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=".*"
            )
        )
    )
    present.input.CopyFrom(_model_input())
    nested = matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(
            matchers=[
                matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=matcher_pb2.Matcher.MatcherList.Predicate(single_predicate=present),
                    on_match=miss,
                )
            ]
        ),
        on_no_match=_fallback_action(rule.fallback_policy, d, service, pods),
    )
    return matcher_pb2.Matcher.OnMatch(matcher=nested)


def model_miss_policy(d: Destination) -> FallbackPolicy:
    """The fallback for a model no pod has: Envoy uses the selector whose keys are
    exactly the request's (the model key), else the rule's own fallback."""
    model_key = d.http.header_keys[0].key
    return next(
        (s.fallback_policy for s in d.rule.selectors if s.keys == (model_key,)),
        d.rule.fallback_policy,
    )


def _fallback_action(
    policy: FallbackPolicy, d: Destination, service: str, pods: Mapping[str, str]
) -> matcher_pb2.Matcher.OnMatch:
    if policy is FallbackPolicy.ANY_ENDPOINT:
        return _route_action(
            route_components_pb2.RouteAction(
                cluster=service, timeout=duration_pb2.Duration(seconds=0)
            )
        )
    if policy is FallbackPolicy.DEFAULT_SUBSET:
        holders = default_subset_pods(d)
        if holders:
            return _route_action(_spread(tuple(pods[i] for i in holders)))
    # NO_FALLBACK, or an empty default subset: the subset load balancer finds no host
    # and Envoy answers 503 (gRPC: UNAVAILABLE); so does this.
    return _route_on_match(
        route_components_pb2.Route(
            match=_ANY_PATH,
            direct_response=route_components_pb2.DirectResponseAction(
                status=503,
                body=base_pb2.DataSource(inline_string=f"no pod holds the model ({policy.value})"),
            ),
        )
    )


def default_subset_pods(d: Destination) -> list[str]:
    """Pods whose endpoint metadata (in the subset strategy) matches the rule's
    ``defaultSubset``: every key is a model key and lists the value."""
    keys = set(model_keys(d.http))
    pods = set(d.mesh.instances)
    for key, value in d.rule.default_subset:
        pods &= set(d.mesh.routable(value)) if key in keys else set()
    return sorted(pods)


def _model_input() -> extension_pb2.TypedExtensionConfig:
    config = extension_pb2.TypedExtensionConfig(name="model")
    config.typed_config.Pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=MODEL_HEADER))
    return config
