"""The "scale" strategy: a cluster per pod and an O(1) route per model, in shards.

Envoy's subset load balancer rebuilds every subset on every endpoint update, on
every worker thread: about 0.9 s and 1.5 GB at 20,000 models on 100 pods with 8
workers. This strategy keeps placement out of clusters and endpoints altogether:

* CDS: one STATIC cluster per pod and one cluster of all pods (EDS, LEAST_REQUEST)
  for the fallback. Only pods coming and going change CDS/EDS (under ANY_ENDPOINT
  every pod's cluster then, see retries below); loads and unloads never do.
* LDS: the subset strategy's ``header_to_metadata`` filter puts the request's model
  into ``envoy.lb/<model key>`` exactly as there. A short Lua filter copies it into
  the ``x-modelxds-model`` header, writes the name's shard (``shard_of``, a hash of
  it, or ``none`` without a model) into ``x-modelxds-shard`` and makes Envoy route
  again. Scoped routes pick the shard's route table by that header.
* SRDS: a scope per shard, keyed by the shard's name, naming the shard's table.
* RDS: a table per shard. Its virtual host's matcher maps each model id and vmodel
  id of the shard (exact match on the model header, a hash map in Envoy) to a route
  whose ``weighted_clusters`` spread over the pods routable for it; anything else
  gets the DestinationRule's fallback.

Why shards: Envoy rebuilds a whole route table on any change to it, at ~20 us a
route, holding the old one meanwhile. One table of 40,000 names (20,000 models and
their InferenceServices) took 0.8 s and 370 MB to apply per placement change; a
shard of ~160 takes milliseconds, and only changed shards are sent (RDS is not a
state-of-the-world type: a gateway keeps the tables a response leaves out).

Retries: Envoy picks one of the ``weighted_clusters`` per request and every retry
stays in it, so a retry cannot reach another holder the way the subset load
balancer's does. With an ANY_ENDPOINT fallback each pod's cluster therefore lists
the next few pods (in instance id order, round the ring) at priority 1, and the retry
policy moves each retry to a priority not yet tried: a first try always goes to a
holder, a retry after a connection failure to another pod (which serves or forwards
it, as on a fallback). Under NO_FALLBACK or DEFAULT_SUBSET a pod's cluster is that
pod alone and retries stay on it, since sending them anywhere would break the rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from operator import mul
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from modelxds.placement.model import MeshPlacement, Placement
from modelxds.policy import FallbackPolicy, Policy
from modelxds.policy.model import HttpRetry, OutlierDetection
from modelxds.xds.builders import (
    GRPC_NOT_FOUND,
    GRPC_UNAVAILABLE,
    LB_NAMESPACE,
    LUA_IS_GRPC,
    NO_HOLDER_HEADER,
    NO_TIMEOUT,
    ads,
    apply_outlier_detection,
    balanced_header,
    build_listener,
    cluster_name,
    eds_cluster,
    error_body,
    header_value,
    http2_upstream,
    http_filter,
    listener_name,
    lua,
    lua_string,
    ms,
    no_model_route,
    rest_match,
    retry_policy,
    route_timeout,
    unlimited_retries,
    virtual_host,
)
from modelxds.xds.cache import encode_field
from modelxds.xds.ir import Destination, Options, destinations
from modelxds.xds.memo import Memo, Reuse
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources

# The request headers routes match on; whatever a client sent under these names is replaced.
MODEL_HEADER = "x-modelxds-model"
SHARD_HEADER = "x-modelxds-shard"
NO_MODEL = "none"  # the shard of a request that names no model
SHARDS = 256  # per listener and protocol
# Pods a pod's cluster lists for retries after a failed connection (ANY_ENDPOINT): more
# than the retries (2), so each retry finds one not tried yet.
FAILOVER_PODS = 3
# shard_of's hash: h = (31 h + byte) mod 65521 over the name's UTF-8 bytes. Integers this
# small are exact in Lua's doubles, so the gateway's Lua filter computes the same.
SHARD_HASH_MODULUS = 65521
# 31^k mod 65521, highest power first: the hash above is sum(byte_i * 31^(n-1-i)) mod 65521
_POWERS = [pow(31, k, SHARD_HASH_MODULUS) for k in reversed(range(1024))]

Address = tuple[str, str]  # a pod's instance id and IP
Shard = Mapping[str, tuple[str, ...]]  # model id or vmodel id -> the pods it routes to


def shard_of(name: str, shards: int = SHARDS) -> int:
    """The shard a model id or vmodel id routes in, as the gateway's Lua computes it."""
    data = name.encode()
    if len(data) <= len(_POWERS):
        h: int = sum(map(mul, data, _POWERS[len(_POWERS) - len(data) :]))
        return h % SHARD_HASH_MODULUS % shards
    h = 0  # longer than any model id should be: the definition, byte by byte
    for byte in data:
        h = (h * 31 + byte) % SHARD_HASH_MODULUS
    return h % shards


class ScaleStrategy:
    """The scale translator, holding what its last translation built: a route table or
    pod cluster whose inputs did not change comes back as the very same message, which
    the SnapshotCache then neither serializes nor sends again. One per ``serve``."""

    def __init__(self, shards: int = SHARDS) -> None:
        self.shards = shards
        self._reuse = Reuse()
        self._sharding: dict[str, _Sharding] = {}  # by namespace
        # by pod set (and route timeout): a push rebuilds a few tables, whose other names
        # kept their pods
        self._on_match: Memo[tuple[tuple[str, ...], int], bytes] = Memo(
            lambda key: _on_match(*key), max_entries=1 << 19
        )
        self._scope: Memo[str, scoped_route_pb2.ScopedRouteConfiguration] = Memo(build_scope)

    def __call__(self, placement: Placement, policy: Policy, options: Options) -> Resources:
        """Same contract as every strategy: same input, same bytes."""
        for memo in (self._reuse, self._on_match, self._scope):
            memo.next_translation()
        clusters: dict[str, Message] = {}
        endpoints: dict[str, Message] = {}
        listeners: dict[str, Message] = {}
        scopes: dict[str, Message] = {}
        routes: dict[str, Message] = {}
        sharding = {}
        for d in destinations(placement, policy, options):
            ns = d.namespace
            if ns not in sharding:
                sharding[ns] = self._sharding.get(ns) or _Sharding(self.shards)
                sharding[ns].update(d.mesh)
            shards = sharding[ns].shards
            for listen_port in d.listen_ports:
                listeners[listener_name(options, listen_port)] = build_listener(
                    listen_port,
                    scoped_routes(listen_port),
                    d,
                    options,
                    [
                        http_filter(
                            "envoy.filters.http.lua",
                            route_by_model(
                                d.keys, listen_port, self.shards, d.rest_port is not None
                            ),
                        )
                    ],
                    grpc_not_found=d.model_miss is FallbackPolicy.NO_FALLBACK,
                )
                if d.rest_port is None:  # REST outside the V2 API, which nothing transcodes
                    name = f"{shard_prefix(listen_port, rest=True)}{NO_MODEL}"
                    scopes[name] = self._scope(name)
                    routes[name] = self._table(name, _refusal_vhost(d), {}, {})
            # gRPC to the pods' gRPC port; REST, unless transcoded, to their REST proxy
            protocols = [(d.port, False)]
            if d.rest_port is not None:
                protocols.append((d.rest_port, True))
            for port, rest in protocols:
                service = cluster_name(d.fqdn, port, rest=rest)
                clusters[service] = eds_cluster(service, options, http2=not rest)
                apply_outlier_detection(clusters[service], d.rule.outlier_detection)
                endpoints[service] = build_service_endpoints(service, d.mesh, port)
                pods = {
                    iid: pod_cluster_name(d.fqdn, port, iid, rest=rest)
                    for iid in sorted(d.mesh.instances)
                }
                clusters.update(self._pod_clusters(d, pods, port, options, http2=not rest))
                model_vhost = _virtual_host(d, d.model_miss, service, pods, rest=rest)
                no_model_vhost = _virtual_host(
                    d, d.rule.fallback_policy, service, pods, rest=rest, no_model=True
                )
                for listen_port in d.listen_ports:
                    names = shard_names(shard_prefix(listen_port, rest=rest), self.shards)
                    for name in names:
                        scopes[name] = self._scope(name)
                    for name, shard in zip(names[:-1], shards, strict=True):
                        routes[name] = self._reuse.get(
                            name, self._table, name, model_vhost, shard, pods, d.timeout_ms
                        )
                    routes[names[-1]] = self._table(names[-1], no_model_vhost, {}, {})
        self._sharding = sharding
        return {
            CLUSTER: clusters,
            ENDPOINT: endpoints,
            LISTENER: listeners,
            SCOPED_ROUTE: scopes,
            ROUTE: routes,
        }

    def _pod_clusters(
        self, d: Destination, pods: Mapping[str, str], port: int, options: Options, *, http2: bool
    ) -> dict[str, cluster_pb2.Cluster]:
        """Cluster name -> the pod's cluster on ``port``, for ``pods`` (instance id ->
        cluster name)."""
        failover = d.model_miss is FallbackPolicy.ANY_ENDPOINT
        # all a pod cluster uses of the pods: their load statistics change nothing
        ring = [(iid, d.mesh.instances[iid].host) for iid in pods]  # sorted by instance id
        out = {}
        for k, name in enumerate(pods.values()):
            # the next FAILOVER_PODS pods round the ring: a pod coming or going changes
            # the clusters of its neighbours only, and CDS grows with pods, not pods^2
            others = (
                tuple(
                    ring[(k + j) % len(ring)]
                    for j in range(1, min(FAILOVER_PODS, len(ring) - 1) + 1)
                )
                if failover
                else ()
            )
            own = ring[k]
            out[name] = self._reuse.get(
                name,
                build_pod_cluster,
                name,
                own,
                others,
                port,
                http2,
                options,
                d.rule.outlier_detection,
            )
        return out

    def _table(
        self,
        name: str,
        vhost: bytes,
        shard: Shard,
        pods: Mapping[str, str],
        timeout_ms: int | None = None,
    ) -> route_pb2.RouteConfiguration:
        """A shard's route table: the virtual host (``_virtual_host``) with a route for
        each name in ``shard`` to the clusters ``pods`` (instance id -> cluster) names,
        each with the VirtualService route's ``timeout_ms``."""
        config = route_pb2.RouteConfiguration(name=name)
        # built in place: a nested message passed to a constructor is copied
        host = config.virtual_hosts.add()
        host.MergeFromString(vhost)
        if shard:  # an empty map is invalid; without a tree every request takes on_no_match
            tree = host.matcher.matcher_tree
            tree.input.CopyFrom(_model_input())
            # MatchMap.map entries (field 1: key 1, value 2), joined and parsed once: 100,000s
            # of names, where a message per route would cost ten times as much. Their order
            # does not matter: the cache serializes maps deterministically, sorted by key.
            on_match = self._on_match
            timeout = timeout_ms or 0
            tree.exact_match_map.MergeFromString(
                b"".join(
                    [
                        encode_field(
                            1,
                            encode_field(1, n.encode())
                            + on_match((tuple([pods[i] for i in holders]), timeout)),
                        )
                        for n, holders in shard.items()
                    ]
                )
            )
        return config


def translate_scale(placement: Placement, policy: Policy, options: Options) -> Resources:
    """One translation with nothing kept: a pure function, same input, same bytes."""
    return ScaleStrategy()(placement, policy, options)


class _Sharding:
    """One mesh's routes split into shards by ``shard_of``, kept current from the
    placement's ``RouteChanges``: a shard no change touched stays the very same mapping,
    so its route table is reused, and a push costs what changed, not every name."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.shards: list[Shard] = [MappingProxyType({})] * count
        self._routes_id: object | None = None

    def update(self, mesh: MeshPlacement) -> None:
        if mesh.routes_id is self._routes_id:
            return
        changes = mesh.changes
        if changes is not None and changes.since is self._routes_id:
            touched: dict[int, dict[str, tuple[str, ...]]] = {}
            for name in changes.names:
                s = shard_of(name, self.count)
                if s not in touched:
                    touched[s] = dict(self.shards[s])
                pods = mesh.routes.get(name)
                if pods:
                    touched[s][name] = pods
                else:
                    touched[s].pop(name, None)
            for s, shard in touched.items():
                self.shards[s] = MappingProxyType(shard)
        else:  # the first snapshot, or one after a re-list: start over
            fresh: list[dict[str, tuple[str, ...]]] = [{} for _ in range(self.count)]
            for name, pods in mesh.routes.items():
                fresh[shard_of(name, self.count)][name] = pods
            self.shards = [MappingProxyType(s) for s in fresh]
        self._routes_id = mesh.routes_id


def shard_prefix(listen_port: int, *, rest: bool) -> str:
    """``<port>/``, or ``<port>/rest/`` for REST sent to the pods' REST proxy: scopes are
    one list for every listener (a gateway takes them all), so the port keeps the
    listeners' apart, and REST names other clusters (the REST port's) than gRPC."""
    return f"{listen_port}/rest/" if rest else f"{listen_port}/"


def shard_names(prefix: str, shards: int) -> list[str]:
    """``<prefix><shard>`` for each shard, then ``<prefix>none``: the scope keys and route
    table names of one listener and protocol."""
    return [f"{prefix}{key}" for key in [*map(str, range(shards)), NO_MODEL]]


def pod_cluster_name(fqdn: str, port: int, instance_id: str, *, rest: bool = False) -> str:
    """``<instance id>.<namespace>:<port>`` (``/rest`` for a REST proxy): short, because
    every route names up to three of these and a gateway holds one route per model and
    InferenceService (40,000 at 20,000 models); an Istio-style ``outbound|port|subset|fqdn``
    would double the RDS."""
    return f"{instance_id}.{fqdn.split('.')[1]}:{port}{'/rest' if rest else ''}"


def build_pod_cluster(
    name: str,
    own: Address,
    others: Sequence[Address],
    port: int,
    http2: bool,
    options: Options,
    outlier: OutlierDetection | None = None,
) -> cluster_pb2.Cluster:
    """The pod at ``own`` at priority 0 and ``others`` at priority 1, for retries: no
    health checks run, so the pod looks healthy and takes every first try, unless the
    DestinationRule's ``outlier`` detection ejects it. Then priority 0 has no healthy
    host and Envoy sends its whole load to priority 1: requests routed to the pod go
    to the others at once, as retries do, until it is back. With no others (no
    ANY_ENDPOINT fallback) the panic threshold decides: Istio's 0 answers 503.

    STATIC: it depends on the pods alone, so loads and unloads never touch it.
    """
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    _add_endpoints(cla.endpoints.add(), [own], port)
    if others:
        _add_endpoints(cla.endpoints.add(priority=1), others, port)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=cla,
        connect_timeout=ms(options.connect_timeout_ms),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,  # among the others
        typed_extension_protocol_options=http2_upstream() if http2 else {},
        circuit_breakers=unlimited_retries(),
    )
    apply_outlier_detection(cluster, outlier)
    return cluster


def build_service_endpoints(
    name: str, mesh: MeshPlacement, port: int
) -> endpoint_pb2.ClusterLoadAssignment:
    """Every pod, for requests whose model no pod can be chosen for (EDS: a pod joining
    or leaving updates hosts in place instead of replacing the cluster)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    pods = [(i, mesh.instances[i].host) for i in sorted(mesh.instances)]
    _add_endpoints(cla.endpoints.add(), pods, port)
    return cla


def _add_endpoints(
    group: endpoint_pb2.LocalityLbEndpoints, pods: Iterable[Address], port: int
) -> None:
    for iid, host in pods:
        ep = group.lb_endpoints.add()
        ep.endpoint.hostname = iid
        ep.endpoint.address.socket_address.address = host
        ep.endpoint.address.socket_address.port_value = port


def route_by_model(
    keys: tuple[str, ...], listen_port: int, shards: int, rest_proxy: bool
) -> lua_pb2.Lua:
    """The Lua filter: the model named in ``envoy.lb`` (set by header_to_metadata, the
    first of ``keys`` present) -> the model header and the shard header (the listener's
    shard prefix + ``shard_of`` the model), then route again.

    REST takes the REST tables with ``rest_proxy`` (else the gRPC ones: the transcoder
    makes it gRPC); REST outside the V2 API takes the REST table of requests without a
    model whatever its headers say, which answers it 400, as the subset strategy does.

    Envoy picks a route before the first HTTP filter runs and keeps it unless a filter
    clears that cache; no built-in filter does so for a header it sets.
    """
    grpc_prefix = shard_prefix(listen_port, rest=False)
    rest_prefix = shard_prefix(listen_port, rest=True)
    script = f"""\
local KEYS = {{{", ".join(map(lua_string, keys))}}}
function envoy_on_request(request)
  local lb = request:streamInfo():dynamicMetadata():get("{LB_NAMESPACE}") or {{}}
  local model
  for _, key in ipairs(KEYS) do
    local value = lb[key]
    if type(value) == "string" and value ~= "" then
      model = value
      break
    end
  end
  local headers = request:headers()
  local prefix = {lua_string(grpc_prefix)}
  if not ({LUA_IS_GRPC}) then
    local path = (headers:get(":path") or ""):match("^[^?]*")
    if path ~= "/v2" and path:sub(1, 4) ~= "/v2/" then
      model = nil
      prefix = {lua_string(rest_prefix)}
    else
      prefix = {lua_string(rest_prefix if rest_proxy else grpc_prefix)}
    end
  end
  local shard = "{NO_MODEL}"
  if model == nil then
    headers:remove("{MODEL_HEADER}")
  else
    local h = 0
    for i = 1, #model do
      h = (h * 31 + model:byte(i)) % {SHARD_HASH_MODULUS}
    end
    shard = tostring(h % {shards})
    headers:replace("{MODEL_HEADER}", model)
  end
  headers:replace("{SHARD_HEADER}", prefix .. shard)
  request:clearRouteCache()
end
"""
    return lua(script)


def scoped_routes(listen_port: int) -> hcm_pb2.ScopedRoutes:
    """The connection manager's routing: the shard header's value is the scope key, and
    each scope (SRDS) names its route table (RDS)."""
    Builder = hcm_pb2.ScopedRoutes.ScopeKeyBuilder
    extractor = Builder.FragmentBuilder.HeaderValueExtractor(name=SHARD_HEADER, index=0)
    return hcm_pb2.ScopedRoutes(
        name=str(listen_port),
        scope_key_builder=Builder(
            fragments=[Builder.FragmentBuilder(header_value_extractor=extractor)]
        ),
        rds_config_source=ads(),
        scoped_rds=hcm_pb2.ScopedRds(scoped_rds_config_source=ads()),
    )


def build_scope(name: str) -> scoped_route_pb2.ScopedRouteConfiguration:
    """Scope key ``name`` -> route table ``name``."""
    Key = scoped_route_pb2.ScopedRouteConfiguration.Key
    return scoped_route_pb2.ScopedRouteConfiguration(
        name=name, route_configuration_name=name, key=Key(fragments=[Key.Fragment(string_key=name)])
    )


def _virtual_host(
    d: Destination,
    fallback: FallbackPolicy,
    service: str,
    pods: Mapping[str, str],
    *,
    rest: bool,
    no_model: bool = False,
) -> bytes:
    """A shard table's virtual host, serialized, before its names go in: what every
    shard shares, with ``fallback`` for a request its names do not match. The table of
    REST requests without a model sends the V2 API to ``fallback`` and answers anything
    else 400, as the subset strategy's routes do."""
    vhost = virtual_host(
        d,
        # once here rather than in each of 10,000s of routes
        retry_policy=failover_retry_policy(d.retries),
        request_headers_to_add=[balanced_header(rest=rest)],
    )
    route = _fallback_route(fallback, d, service, pods, model_miss=not no_model)
    if rest and no_model:
        route.match.CopyFrom(rest_match())
        vhost.routes.extend([route, no_model_route(d)])
    else:
        vhost.matcher.on_no_match.CopyFrom(_route_on_match(route))
    serialized: bytes = vhost.SerializeToString(deterministic=True)
    return serialized


def _refusal_vhost(d: Destination) -> bytes:
    """The REST table of requests without a model under ``--rest transcode``: only REST
    outside the V2 API comes here (the V2 API is transcoded to gRPC), and it is refused."""
    serialized: bytes = virtual_host(d, routes=[no_model_route(d)]).SerializeToString(
        deterministic=True
    )
    return serialized


def failover_retry_policy(
    retries: HttpRetry | None = None,
) -> route_components_pb2.RetryPolicy | None:
    """The subset strategy's retries; each retry also goes to a priority not tried yet
    (a pod's cluster: from the pod to the others)."""
    policy = retry_policy(retries)
    if policy is None:
        return None
    policy.retry_priority.name = "envoy.retry_priorities.previous_priorities"
    policy.retry_priority.typed_config.Pack(
        previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=1)
    )
    return policy


def _on_match(clusters: tuple[str, ...], timeout_ms: int = 0) -> bytes:
    """``MatchMap.map`` entry value (field 2): an ``OnMatch`` whose action is the route to
    ``clusters``, as ``_route_on_match(_any_path_route(_spread(clusters, timeout_ms)))``
    serializes it (a unit test holds them equal), encoded directly: a cold push has
    100,000s of these.
    Kept: a push changes few pod sets, and an InferenceService shares its model's."""
    if len(clusters) == 1:  # RouteAction.cluster
        action = encode_field(1, clusters[0].encode())
    else:  # RouteAction.weighted_clusters: ClusterWeight{name, weight: 1} each
        action = encode_field(
            3,
            b"".join(
                [encode_field(1, encode_field(1, c.encode()) + _WEIGHT_ONE) for c in clusters]
            ),
        )
    timeout = _NO_TIMEOUT_FIELD
    if timeout_ms:
        timeout = encode_field(8, ms(timeout_ms).SerializeToString())
    route = _ANY_PATH_FIELD + encode_field(2, action + timeout)  # Route.match, .route
    typed = _ROUTE_TYPE_URL_FIELD + encode_field(2, route)  # Any.type_url, .value
    extension = _ROUTE_ACTION_NAME_FIELD + encode_field(2, typed)  # .name, .typed_config
    return encode_field(2, encode_field(2, extension))  # the entry's value: OnMatch.action


# The constant fields of _on_match's encoding
_WEIGHT_ONE = encode_field(2, b"\x08\x01")  # ClusterWeight.weight: UInt32Value{value: 1}
_NO_TIMEOUT_FIELD = encode_field(8, b"")  # RouteAction.timeout: NO_TIMEOUT, Duration{}
_ANY_PATH_FIELD = encode_field(1, encode_field(1, b"/"))  # Route.match: RouteMatch{prefix: "/"}
_ROUTE_TYPE_URL_FIELD = encode_field(1, b"type.googleapis.com/envoy.config.route.v3.Route")
_ROUTE_ACTION_NAME_FIELD = encode_field(1, b"route")


def _spread(clusters: tuple[str, ...], timeout_ms: int = 0) -> route_components_pb2.RouteAction:
    timeout = ms(timeout_ms) if timeout_ms else NO_TIMEOUT
    if len(clusters) == 1:  # most models have one copy; Envoy builds this route faster
        return route_components_pb2.RouteAction(cluster=clusters[0], timeout=timeout)
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
        timeout=timeout,
    )


def _route_on_match(route: route_components_pb2.Route) -> matcher_pb2.Matcher.OnMatch:
    on_match = matcher_pb2.Matcher.OnMatch()
    on_match.action.name = "route"
    on_match.action.typed_config.Pack(route)
    return on_match


# A matcher action's own RouteMatch is not consulted, but the field is required.
_ANY_PATH = route_components_pb2.RouteMatch(prefix="/")


def _fallback_route(
    policy: FallbackPolicy,
    d: Destination,
    service: str,
    pods: Mapping[str, str],
    *,
    model_miss: bool,
) -> route_components_pb2.Route:
    if policy is FallbackPolicy.ANY_ENDPOINT:
        return _any_path_route(
            route_components_pb2.RouteAction(cluster=service, timeout=route_timeout(d))
        )
    if policy is FallbackPolicy.DEFAULT_SUBSET:
        holders = d.default_subset_pods()
        if holders:
            return _any_path_route(_spread(tuple(pods[i] for i in holders), d.timeout_ms or 0))
    # As the subset strategy answers: NO_FALLBACK with pods up is a model no pod holds
    # (404, gRPC NOT_FOUND); a request naming no model, no pod at all, or an empty
    # default subset is 503.
    if policy is FallbackPolicy.NO_FALLBACK and model_miss and d.mesh.instances:
        status, body = (
            404,
            error_body(
                "no pod holds this model and the DestinationRule's fallbackPolicy is NO_FALLBACK",
                GRPC_NOT_FOUND,
            ),
        )
        headers = [header_value(NO_HOLDER_HEADER, "true")]
    else:
        status, body = 503, error_body(f"no pod can serve this ({policy.value})", GRPC_UNAVAILABLE)
        headers = []
    return route_components_pb2.Route(
        match=_ANY_PATH,
        direct_response=route_components_pb2.DirectResponseAction(
            status=status, body=base_pb2.DataSource(inline_string=body)
        ),
        response_headers_to_add=[header_value("content-type", "application/json"), *headers],
    )


def _any_path_route(action: route_components_pb2.RouteAction) -> route_components_pb2.Route:
    return route_components_pb2.Route(match=_ANY_PATH, route=action)


def _model_input() -> extension_pb2.TypedExtensionConfig:
    config = extension_pb2.TypedExtensionConfig(name="model")
    config.typed_config.Pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=MODEL_HEADER))
    return config
