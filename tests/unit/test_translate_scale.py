"""The "scale" translator: routes per model in route tables per shard, fallbacks, and
which resources a change touches."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message
from lupa.luajit21 import LuaRuntime
from xds.type.matcher.v3 import matcher_pb2

from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord
from modelxds.placement.index import MeshIndex
from modelxds.placement.model import Placement, build_mesh
from modelxds.policy import Policy, default_policy, parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds import scale
from modelxds.xds.builders import REST_API_PATH
from modelxds.xds.cache import encode_field
from modelxds.xds.ir import Options, RestMode, Strategy
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources
from modelxds.xds.scale import MODEL_HEADER, SHARD_HEADER, ScaleStrategy, shard_of
from modelxds.xds.subset import translate_subset
from tests.unit.test_placement_index import History
from tests.unit.test_translate import (
    KEY,
    NOW,
    OPTIONS,
    assert_resilient_cluster,
    resilient_policy,
    several_headers_and_ports,
)
from tests.unit.test_translate import _placement as seed_placement

FQDN = "modelmesh-serving.modelmesh-serving.svc.cluster.local"
SERVICE = f"outbound|8033||{FQDN}"
REST_SERVICE = f"outbound|8008|rest|{FQDN}"
PODS = ("7dd689-4zwqs", "7dd689-k2x9p", "7dd689-p3r7q")
# Shards in these tests: a readable golden file, and the seed's three names land in three
# different ones (1, 2, 3), leaving shard 0 empty.
SHARDS = 4


def translate_scale(placement: Placement, policy: Policy, options: Options) -> Resources:
    return ScaleStrategy(SHARDS)(placement, policy, options)


def _placement(registry: dict[str, ModelRecord] | None = None) -> Placement:
    return seed_placement(registry)


def _pod(iid: str, port: int = 8033) -> str:
    return f"{iid}.modelmesh-serving:{port}"


def _rest_pod(iid: str) -> str:
    return f"{iid}.modelmesh-serving:8008/rest"


def _policy(fallback: str = "ANY_ENDPOINT", default_subset: str = "") -> str:
    text = SEED_POLICY_YAML.replace("fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {fallback}")
    if default_subset:
        text = text.replace(
            "        subsetSelectors:",
            f"        defaultSubset: {{{KEY}: {default_subset}}}\n        subsetSelectors:",
        )
    return text


def _table(resources: Resources, name: str) -> route_pb2.RouteConfiguration:
    msg = resources[ROUTE][name]
    assert isinstance(msg, route_pb2.RouteConfiguration)
    return msg


def _model_tables(
    resources: Resources, port: int = 8008, prefix: str = ""
) -> list[route_pb2.RouteConfiguration]:
    """A listener's model tables: gRPC's, or with ``prefix="rest/"`` REST's."""
    return [_table(resources, f"{port}/{prefix}{b}") for b in range(SHARDS)]


def _cluster(msg: Message) -> cluster_pb2.Cluster:
    assert isinstance(msg, cluster_pb2.Cluster)
    return msg


def _route(on_match: matcher_pb2.Matcher.OnMatch) -> route_components_pb2.Route:
    route = route_components_pb2.Route()
    assert on_match.action.typed_config.Unpack(route)
    return route


def _targets(route: route_components_pb2.Route) -> list[str]:
    """Where a route sends requests: clusters, or the direct response status."""
    if route.HasField("direct_response"):
        return [f"status {route.direct_response.status}"]
    if route.route.HasField("weighted_clusters"):
        return [c.name for c in route.route.weighted_clusters.clusters]
    return [route.route.cluster]


def _entries(table: route_pb2.RouteConfiguration) -> dict[str, matcher_pb2.Matcher.OnMatch]:
    return dict(table.virtual_hosts[0].matcher.matcher_tree.exact_match_map.map)


def _routes(resources: Resources, port: int = 8008, prefix: str = "") -> dict[str, list[str]]:
    """Every name's targets, over all of a listener's route tables (of one protocol)."""
    return {
        name: _targets(_route(on_match))
        for table in _model_tables(resources, port, prefix)
        for name, on_match in _entries(table).items()
    }


def _no_match(table: route_pb2.RouteConfiguration) -> list[str]:
    """Where a table sends what its names do not match; the REST table of requests
    without a model has routes instead: the V2 API to the fallback, anything else 400."""
    vhost = table.virtual_hosts[0]
    if vhost.routes:
        v2_api, other = vhost.routes
        assert v2_api.match.safe_regex.regex == REST_API_PATH
        assert other.direct_response.status == 400
        return _targets(v2_api)
    return _targets(_route(vhost.matcher.on_no_match))


def _serialized(resources: Resources, type_url: str) -> dict[str, bytes]:
    return {n: m.SerializeToString(deterministic=True) for n, m in resources[type_url].items()}


def _hcm(resources: Resources, name: str = "0.0.0.0_8008") -> hcm_pb2.HttpConnectionManager:
    listener = resources[LISTENER][name]
    assert isinstance(listener, listener_pb2.Listener)
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def _lua(resources: Resources, name: str = "0.0.0.0_8008") -> str:
    """The routing Lua filter's script (the first Lua filter)."""
    lua = lua_pb2.Lua()
    found = next(f for f in _hcm(resources, name).http_filters if f.name.endswith(".lua"))
    assert found.typed_config.Unpack(lua)
    return str(lua.default_source_code.inline_string)


def test_translation_is_deterministic() -> None:
    a = translate_scale(_placement(), default_policy(), OPTIONS)
    b = translate_scale(_placement(), default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE):
        assert _serialized(a, t) == _serialized(b, t)


def test_each_name_routes_to_exactly_its_routable_pods_from_its_shards_table() -> None:
    placement = _placement()
    mesh = placement.meshes["modelmesh-serving"]
    resources = translate_scale(placement, default_policy(), OPTIONS)
    assert _routes(resources) == {
        # the vmodel follows its active model, not the target that is still loading
        "example-mnist-isvc": [_pod("7dd689-4zwqs"), _pod("7dd689-k2x9p")],
        "mnist-svm__isvc-6b2eb0b8bf": [_pod("7dd689-4zwqs"), _pod("7dd689-k2x9p")],
        # a copy that is still loading takes traffic when it is the only one
        "xgb__isvc-1a2b3c4d5e": [_pod("7dd689-p3r7q")],
        # "orphan" (a dead pod's copy and a failed load) has no route: fallback
    }
    for name, clusters in _routes(resources).items():
        assert clusters == [_pod(iid) for iid in mesh.routable(name)]
        # the gateway's Lua filter sends a request for the name to this table only
        assert name in _entries(_table(resources, f"8008/{shard_of(name, SHARDS)}"))
    # REST: the same holders, at their REST proxy
    assert _routes(resources, prefix="rest/") == {
        name: [c.replace(":8033", ":8008/rest") for c in clusters]
        for name, clusters in _routes(resources).items()
    }


def test_one_scope_per_shard_and_one_for_requests_without_a_model() -> None:
    resources = translate_scale(_placement(), default_policy(), OPTIONS)
    names = [f"8008/{prefix}{b}" for prefix in ("", "rest/") for b in [*range(SHARDS), "none"]]
    assert sorted(resources[SCOPED_ROUTE]) == sorted(names)
    assert sorted(resources[ROUTE]) == sorted(names)
    for name, scope in resources[SCOPED_ROUTE].items():
        assert isinstance(scope, scoped_route_pb2.ScopedRouteConfiguration)
        assert scope.route_configuration_name == name
        assert [f.string_key for f in scope.key.fragments] == [name]
    scoped = _hcm(resources).scoped_routes
    assert not _hcm(resources).HasField("rds")
    (fragment,) = scoped.scope_key_builder.fragments
    assert fragment.header_value_extractor.name == SHARD_HEADER
    assert scoped.scoped_rds.scoped_rds_config_source.HasField("ads")
    assert scoped.rds_config_source.HasField("ads")


def _run_lua(script: str, headers: dict[str, str], lb: dict[str, str]) -> dict[str, str]:
    """Run a filter's envoy_on_request in LuaJIT (Envoy's Lua) on a stand-in request with
    these headers and ``envoy.lb`` dynamic metadata; the headers it leaves."""
    lua = LuaRuntime()
    out = dict(headers)
    lua.execute(script)
    lua.globals().run = lua.eval(
        """function(handler, headers, lb)
          local request = {
            headers = function(_) return headers end,
            streamInfo = function(_) return {dynamicMetadata = function(_) return {
              get = function(_, ns) if ns == "envoy.lb" then return lb end end} end} end,
            clearRouteCache = function(_) headers.routed = "again" end,
          }
          handler(request)
        end"""
    )
    box = lua.table_from(out)
    box.get = lua.eval("function(t, k) return rawget(t, k) end")
    box.replace = lua.eval("function(t, k, v) rawset(t, k, v) end")
    box.remove = lua.eval("function(t, k) rawset(t, k, nil) end")
    lua.globals().run(lua.globals().envoy_on_request, box, lua.table_from(lb))
    return {str(k): str(v) for k, v in box.items() if k not in ("get", "replace", "remove")}


GRPC = {":path": "/inference.GRPCInferenceService/ModelInfer", "content-type": "application/grpc"}


@pytest.mark.parametrize("rest", [RestMode.PROXY, RestMode.TRANSCODE])
def test_lua_filter_sends_each_request_to_its_names_table_and_routes_again(
    rest: RestMode,
) -> None:
    options = dataclasses.replace(OPTIONS, rest=rest)
    script = _lua(translate_scale(_placement(), default_policy(), options))
    rest_tables = "8008/rest/" if rest is RestMode.PROXY else "8008/"
    for name in ["example-mnist-isvc", "m", "x" * 300, "ünïcode-model", "a.b_c-d/e"]:
        shard = shard_of(name, SHARDS)  # the hash the translator shards by
        grpc = _run_lua(script, GRPC, {KEY: name})
        assert grpc[SHARD_HEADER] == f"8008/{shard}"
        assert grpc[MODEL_HEADER] == name and grpc["routed"] == "again"
        for path in (f"/v2/models/{name}/infer", "/v2/models/m/infer?x=1", "/v2"):
            got = _run_lua(script, {":path": path, "content-type": "application/json"}, {KEY: name})
            assert got[SHARD_HEADER] == f"{rest_tables}{shard}", path
    # no model: the table of requests without one; a client cannot pick a route itself
    got = _run_lua(script, {**GRPC, MODEL_HEADER: "forged", SHARD_HEADER: "8008/0"}, {})
    assert got[SHARD_HEADER] == "8008/none" and MODEL_HEADER not in got
    # REST outside the V2 API, whatever model its headers name: refused there with a 400
    got = _run_lua(script, {":path": "/predict", "content-type": "application/json"}, {KEY: "m"})
    assert got[SHARD_HEADER] == "8008/rest/none" and MODEL_HEADER not in got


def test_per_model_routes_split_equally_and_never_time_out() -> None:
    resources = translate_scale(_placement(), default_policy(), OPTIONS)
    on_match = {n: m for t in _model_tables(resources) for n, m in _entries(t).items()}
    action = _route(on_match["example-mnist-isvc"]).route
    assert [c.weight.value for c in action.weighted_clusters.clusters] == [1, 1]
    assert action.timeout.ToSeconds() == 0  # ModelMesh may hold a request while it loads
    one_copy = _route(on_match["xgb__isvc-1a2b3c4d5e"]).route
    assert one_copy.cluster == _pod("7dd689-p3r7q")  # cheaper for Envoy than a 1-way split
    assert one_copy.HasField("timeout") and one_copy.timeout.ToSeconds() == 0


def test_retries_and_mm_balanced_are_set_once_on_each_virtual_host() -> None:
    resources = translate_scale(_placement(), default_policy(), OPTIONS)
    subset = translate_subset(_placement(), default_policy(), OPTIONS)[ROUTE]["8008"]
    assert isinstance(subset, route_pb2.RouteConfiguration)
    grpc_route, rest_route, _ = subset.virtual_hosts[0].routes
    for name, table in resources[ROUTE].items():
        assert isinstance(table, route_pb2.RouteConfiguration)
        subset_route = rest_route if "/rest/" in name else grpc_route
        vhost = table.virtual_hosts[0]
        assert list(vhost.request_headers_to_add) == list(subset_route.request_headers_to_add)
        retry = vhost.retry_policy
        assert retry.retry_on == subset_route.route.retry_policy.retry_on
        assert retry.retry_priority.name == "envoy.retry_priorities.previous_priorities"
        # a matcher and a route list are exclusive
        assert bool(vhost.routes) == (name == "8008/rest/none")


def test_pod_clusters_are_static_with_the_other_pods_for_retries() -> None:
    resources = translate_scale(_placement(), default_policy(), OPTIONS)
    assert sorted(resources[CLUSTER]) == sorted(
        [SERVICE, REST_SERVICE, *map(_pod, PODS), *map(_rest_pod, PODS)]
    )
    # only the all-pods clusters use EDS
    assert list(resources[ENDPOINT]) == [SERVICE, REST_SERVICE]
    rest_pod = _cluster(resources[CLUSTER][_rest_pod("7dd689-k2x9p")])
    assert not rest_pod.typed_extension_protocol_options  # HTTP/1.1 to the REST proxy
    (rest_port,) = {
        ep.endpoint.address.socket_address.port_value
        for group in rest_pod.load_assignment.endpoints
        for ep in group.lb_endpoints
    }
    assert rest_port == 8008
    pod = _cluster(resources[CLUSTER][_pod("7dd689-k2x9p")])
    assert pod.type == cluster_pb2.Cluster.STATIC
    assert not pod.HasField("lb_subset_config")
    by_priority = {
        group.priority: [ep.endpoint.hostname for ep in group.lb_endpoints]
        for group in pod.load_assignment.endpoints
    }
    # the next pods round the ring of instance ids
    assert by_priority == {0: ["7dd689-k2x9p"], 1: ["7dd689-p3r7q", "7dd689-4zwqs"]}
    service = _cluster(resources[CLUSTER][SERVICE])
    assert service.type == cluster_pb2.Cluster.EDS
    assert service.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert not service.HasField("lb_subset_config")
    cla = resources[ENDPOINT][SERVICE]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    assert [ep.endpoint.hostname for ep in cla.endpoints[0].lb_endpoints] == list(PODS)
    assert not any(ep.HasField("metadata") for ep in cla.endpoints[0].lb_endpoints)


@pytest.mark.parametrize("fallback", ["NO_FALLBACK", "DEFAULT_SUBSET"])
def test_retries_stay_on_the_pod_unless_any_endpoint_may_serve(fallback: str) -> None:
    policy = parse_policy(_policy(fallback, default_subset="example-mnist-isvc"))
    resources = translate_scale(_placement(), policy, OPTIONS)
    pod = _cluster(resources[CLUSTER][_pod("7dd689-k2x9p")])
    assert [g.priority for g in pod.load_assignment.endpoints] == [0]
    assert len(pod.load_assignment.endpoints[0].lb_endpoints) == 1


def test_placement_change_touches_only_the_tables_of_the_names_that_moved() -> None:
    before = translate_scale(_placement(), default_policy(), OPTIONS)
    # mnist unloads from one pod (and so does its InferenceService), xgb finishes loading
    # and loads on a second pod
    moved = _placement(
        {
            "mnist-svm__isvc-6b2eb0b8bf": ModelRecord(instance_ids={"7dd689-4zwqs": NOW - 60_000}),
            "xgb__isvc-1a2b3c4d5e": ModelRecord(
                instance_ids={"7dd689-k2x9p": NOW - 60_000, "7dd689-p3r7q": NOW - 60_000}
            ),
        }
    )
    after = translate_scale(moved, default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE):
        assert _serialized(after, t) == _serialized(before, t), t
    old, new = _serialized(before, ROUTE), _serialized(after, ROUTE)
    changed = {name for name in new if new[name] != old[name]}
    names = ("example-mnist-isvc", "mnist-svm__isvc-6b2eb0b8bf", "xgb__isvc-1a2b3c4d5e")
    assert changed == {
        f"8008/{prefix}{shard_of(n, SHARDS)}" for n in names for prefix in ("", "rest/")
    }
    assert _routes(after)["xgb__isvc-1a2b3c4d5e"] == [_pod("7dd689-k2x9p"), _pod("7dd689-p3r7q")]


def test_an_unchanged_table_is_the_same_message_so_it_is_neither_serialized_nor_resent() -> None:
    placement = _placement()
    strategy = ScaleStrategy(SHARDS)  # what serve holds: the reuse is its own, no module state
    first = strategy(placement, default_policy(), OPTIONS)
    again = strategy(placement, default_policy(), OPTIONS)
    for name, table in first[ROUTE].items():
        if not name.endswith("/none"):
            assert again[ROUTE][name] is table, name
    for name, cluster in first[CLUSTER].items():
        if name not in (SERVICE, REST_SERVICE):
            assert again[CLUSTER][name] is cluster, name
    # a table whose shard changed is rebuilt, by value: an equal copy of a shard reuses
    moved = _placement({"xgb__isvc-1a2b3c4d5e": ModelRecord(instance_ids={"7dd689-k2x9p": 1})})
    after = strategy(moved, default_policy(), OPTIONS)
    moved_table = f"8008/{shard_of('xgb__isvc-1a2b3c4d5e', SHARDS)}"
    assert after[ROUTE][moved_table] is not again[ROUTE][moved_table]
    assert (
        translate_scale(placement, default_policy(), OPTIONS)[ROUTE][moved_table]
        is not (first[ROUTE][moved_table])
    )  # a one-off translation keeps nothing


def test_pod_load_statistics_change_nothing() -> None:
    before = translate_scale(_placement(), default_policy(), OPTIONS)
    mesh = _placement().meshes["modelmesh-serving"]
    busier = {
        iid: dataclasses.replace(pod, used=pod.used + 1000, rpm=500, model_count=9)
        for iid, pod in mesh.instances.items()
    }
    changed = dataclasses.replace(mesh, instances=MappingProxyType(busier))
    after = translate_scale(Placement({"modelmesh-serving": changed}), default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE):
        assert _serialized(after, t) == _serialized(before, t), t


def test_listener_keeps_the_subset_model_extraction_then_runs_the_lua_filter() -> None:
    scale = list(_hcm(translate_scale(_placement(), default_policy(), OPTIONS)).http_filters)
    subset = list(_hcm(translate_subset(_placement(), default_policy(), OPTIONS)).http_filters)
    assert [f.name for f in scale] == [
        "envoy.filters.http.header_to_metadata",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]
    assert scale[0] == subset[0]  # same precedence: ModelMesh headers, VS headers, REST path
    assert scale[2:] == subset[1:]


@pytest.mark.parametrize(
    ("fallback", "default_subset", "expected"),
    [
        ("ANY_ENDPOINT", "", [SERVICE]),
        # as the subset strategy's answers: a model no pod holds is not found (404);
        # without a model, "no healthy upstream" (503, in the /none tables)
        ("NO_FALLBACK", "", ["status 404"]),
        ("DEFAULT_SUBSET", "example-mnist-isvc", [_pod("7dd689-4zwqs"), _pod("7dd689-k2x9p")]),
        # no pod has the default subset: the subset load balancer finds no host either
        ("DEFAULT_SUBSET", "orphan", ["status 503"]),
    ],
)
def test_fallback_follows_the_destination_rule(
    fallback: str, default_subset: str, expected: list[str]
) -> None:
    resources = translate_scale(
        _placement(), parse_policy(_policy(fallback, default_subset)), OPTIONS
    )
    for name, table in resources[ROUTE].items():
        assert isinstance(table, route_pb2.RouteConfiguration)
        wanted = expected
        if name.endswith("/none") and expected == ["status 404"]:
            wanted = ["status 503"]
        if "/rest/" in name:  # the same, at the REST proxy
            wanted = [
                e.replace(":8033", ":8008/rest").replace(SERVICE, REST_SERVICE) for e in wanted
            ]
        assert _no_match(table) == wanted, name


def test_a_model_miss_and_a_request_without_model_can_fall_back_differently() -> None:
    # Envoy uses the selector's fallback when the request names a model, the rule's otherwise
    text = SEED_POLICY_YAML.replace(
        "        subsetSelectors:\n        - fallbackPolicy: ANY_ENDPOINT",
        "        fallbackPolicy: ANY_ENDPOINT\n"
        "        subsetSelectors:\n        - fallbackPolicy: NO_FALLBACK",
    )
    resources = translate_scale(_placement(), parse_policy(text), OPTIONS)
    for table in _model_tables(resources):
        assert _no_match(table) == ["status 404"]
    assert _no_match(_table(resources, "8008/none")) == [SERVICE]
    # retries leave the pod only where any pod may serve a model: not under NO_FALLBACK
    pod = _cluster(resources[CLUSTER][_pod("7dd689-k2x9p")])
    assert [g.priority for g in pod.load_assignment.endpoints] == [0]


def test_several_headers_and_ports() -> None:
    resources = translate_scale(_placement(), parse_policy(several_headers_and_ports()), OPTIONS)
    assert sorted(resources[LISTENER]) == ["0.0.0.0_8008", "0.0.0.0_9008"]
    # every listener takes every scope: the port in the key keeps the two apart
    assert {n.split("/")[0] for n in resources[SCOPED_ROUTE]} == {"8008", "9008"}
    assert _routes(resources, 8008) == _routes(resources, 9008)
    assert 'local prefix = "9008/"' in _lua(resources, "0.0.0.0_9008")
    # the model key first, then the VirtualService's other keys: the first present wins
    assert f'local KEYS = {{"{KEY}", "alias"}}' in _lua(resources)


def test_several_pod_ports_get_their_own_pod_clusters() -> None:
    # a second VirtualService: listener 9008 to the pods' port 8008
    rest = (
        SEED_POLICY_YAML.split("---\n")[1]
        .replace("vs-modelmesh-serving-service", "rest")
        .replace("port: 8008", "port: 9008")
        .replace("number: 8033", "number: 8008")
    )
    text = f"{SEED_POLICY_YAML}---\n{rest}"
    resources = translate_scale(_placement(), parse_policy(text), OPTIONS)
    # gRPC to the pods' 8008 and REST to their REST proxy on 8008 never share a cluster
    assert sorted(resources[CLUSTER]) == sorted(
        [SERVICE, f"outbound|8008||{FQDN}", REST_SERVICE]
        + [_pod(i) for i in PODS]
        + [_pod(i, 8008) for i in PODS]
        + [_rest_pod(i) for i in PODS]
    )
    assert _routes(resources)["xgb__isvc-1a2b3c4d5e"] == [_pod("7dd689-p3r7q")]
    assert _routes(resources, 9008)["xgb__isvc-1a2b3c4d5e"] == [_pod("7dd689-p3r7q", 8008)]


def test_empty_placement_sends_everything_to_the_fallback() -> None:
    resources = translate_scale(Placement(), default_policy(), OPTIONS)
    assert list(resources[CLUSTER]) == [SERVICE, REST_SERVICE]
    for service in (SERVICE, REST_SERVICE):
        cla = resources[ENDPOINT][service]
        assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
        assert list(cla.endpoints[0].lb_endpoints) == []
    for name, table in resources[ROUTE].items():
        assert isinstance(table, route_pb2.RouteConfiguration)
        # Envoy rejects an empty exact_match_map: no tree at all, only on_no_match
        assert not table.virtual_hosts[0].matcher.HasField("matcher_tree")
        assert _no_match(table) == [REST_SERVICE if "/rest/" in name else SERVICE]


def test_no_fallback_with_no_pod_at_all_answers_503_as_the_subset_strategy() -> None:
    resources = translate_scale(Placement(), parse_policy(_policy("NO_FALLBACK")), OPTIONS)
    for table in _model_tables(resources):
        assert _no_match(table) == ["status 503"]


def test_transcode_mode_has_no_rest_clusters_and_one_rest_table_that_refuses() -> None:
    options = dataclasses.replace(OPTIONS, rest=RestMode.TRANSCODE)
    resources = translate_scale(_placement(), default_policy(), options)
    assert not any("rest" in name for name in resources[CLUSTER])
    assert [name for name in resources[ROUTE] if "rest" in name] == ["8008/rest/none"]
    (refusal,) = _table(resources, "8008/rest/none").virtual_hosts[0].routes
    assert refusal.direct_response.status == 400


@pytest.mark.parametrize("seed", range(10))
def test_a_long_lived_strategy_builds_what_a_fresh_one_builds_under_churn(seed: int) -> None:
    """The strategy updates its shards by the names each snapshot says changed; the
    config must be the very bytes a translation from scratch gives, whatever came before."""
    history = History(seed)
    index = MeshIndex("ns", 3000)
    policy = parse_policy(SEED_POLICY_YAML.replace("namespace: modelmesh-serving", "namespace: ns"))
    strategy = ScaleStrategy(SHARDS)
    for step in range(120):
        for _ in range(history.rnd.randrange(1, 4)):
            history.step()
        h = history
        mesh = index.refresh(h.changes, h.registry, h.vmodels, h.instances, h.litelinks, h.now)
        if step % 40 == 39:  # a re-list: a fresh index, whose snapshot has no changes
            index = MeshIndex("ns", 3000)
            h.changes.all(h.registry, h.vmodels)
            h.changes.pods = True
            mesh = index.refresh(h.changes, h.registry, h.vmodels, h.instances, h.litelinks, h.now)
        placement = Placement({"ns": mesh})
        kept, fresh = (
            strategy(placement, policy, OPTIONS),
            translate_scale(placement, policy, OPTIONS),
        )
        for t in (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE):
            assert _serialized(kept, t) == _serialized(fresh, t), (step, t)


@pytest.mark.parametrize("strategy", [translate_subset, translate_scale])
def test_placement_never_changes_a_listener(strategy: Strategy) -> None:
    """A listener change drains every connection to the gateway: pods and models coming
    and going, the last pod leaving included, must touch only CDS, EDS and RDS."""
    history = History(3)
    index = MeshIndex("ns", 3000)
    policy = parse_policy(SEED_POLICY_YAML.replace("namespace: modelmesh-serving", "namespace: ns"))
    listeners = _serialized(strategy(Placement(), policy, OPTIONS), LISTENER)
    for _ in range(100):
        history.step()
        h = history
        mesh = index.refresh(h.changes, h.registry, h.vmodels, h.instances, h.litelinks, h.now)
        resources = strategy(Placement({"ns": mesh}), policy, OPTIONS)
        assert _serialized(resources, LISTENER) == listeners


@pytest.mark.parametrize("timeout_ms", [0, 500, 1500, 90_000, 2562047 * 3_600_000])
@pytest.mark.parametrize("clusters", [("a.ns:8033",), ("a.ns:8033", "b.ns:8033", "c.ns:8008/rest")])
def test_a_names_route_is_encoded_as_its_message_serializes(
    clusters: tuple[str, ...], timeout_ms: int
) -> None:
    route = scale._route_on_match(scale._any_path_route(scale._spread(clusters, timeout_ms)))
    assert scale._on_match(clusters, timeout_ms) == encode_field(
        2, route.SerializeToString(deterministic=True)
    )


def test_a_pod_lists_a_few_neighbours_for_retries_so_a_pod_joining_changes_only_theirs() -> None:
    def mesh(pods: int) -> Placement:
        ids = [f"pod-{i:02d}" for i in range(pods)]
        built = build_mesh(
            "modelmesh-serving",
            registry={"m": ModelRecord(instance_ids={ids[0]: NOW - 60_000})},
            vmodels={},
            instances={iid: InstanceRecord() for iid in ids},
            litelinks={
                iid: LitelinksRecord(hostname=f"10.0.0.{i}", instance_id=iid)
                for i, iid in enumerate(ids)
            },
            now_ms=NOW,
        )
        return Placement({"modelmesh-serving": built})

    def priority_1(resources: Resources, iid: str) -> list[str]:
        cla = _cluster(resources[CLUSTER][_pod(iid)]).load_assignment
        return [
            ep.endpoint.hostname for g in cla.endpoints if g.priority == 1 for ep in g.lb_endpoints
        ]

    ten = translate_scale(mesh(10), default_policy(), OPTIONS)
    assert priority_1(ten, "pod-03") == ["pod-04", "pod-05", "pod-06"]
    assert priority_1(ten, "pod-09") == ["pod-00", "pod-01", "pod-02"]  # round the ring
    eleven = translate_scale(mesh(11), default_policy(), OPTIONS)
    before, after = _serialized(ten, CLUSTER), _serialized(eleven, CLUSTER)
    changed = {n for n in before if before[n] != after[n]}
    # pod-10 joins after pod-09: only the three pods before it list it
    assert changed == {c(i) for i in ("pod-07", "pod-08", "pod-09") for c in (_pod, _rest_pod)}


# --- outlierDetection, timeout and retries: as the subset strategy translates them -------


def test_outlier_detection_reaches_the_service_and_every_pod_cluster() -> None:
    resources = translate_scale(_placement(), parse_policy(resilient_policy()), OPTIONS)
    assert len(resources[CLUSTER]) == 8
    for cluster in map(_cluster, resources[CLUSTER].values()):
        # a pod ejected from its own cluster leaves priority 0 empty: its requests go
        # to the other pods at once
        assert_resilient_cluster(cluster)


def test_the_timeout_reaches_every_names_route_and_the_fallback() -> None:
    resources = translate_scale(_placement(), parse_policy(resilient_policy()), OPTIONS)
    routes = 0
    for name, table in resources[ROUTE].items():
        assert isinstance(table, route_pb2.RouteConfiguration)
        vhost = table.virtual_hosts[0]
        actions = [_route(m) for m in _entries(table).values()]
        actions += [r for r in vhost.routes if not r.HasField("direct_response")]
        if not vhost.routes:
            actions.append(_route(vhost.matcher.on_no_match))
        for route in actions:
            assert route.route.timeout.ToMilliseconds() == 500, name
        routes += len(actions)
    assert routes == 16  # 3 names x 2 protocols, and the fallback of each of 10 tables


def test_retries_are_the_virtual_hosts_with_failover_to_the_other_pods() -> None:
    resources = translate_scale(_placement(), parse_policy(resilient_policy()), OPTIONS)
    for table in resources[ROUTE].values():
        assert isinstance(table, route_pb2.RouteConfiguration)
        retry = table.virtual_hosts[0].retry_policy
        assert retry.num_retries.value == 3
        assert retry.retry_on == "5xx,reset,retriable-status-codes"
        assert list(retry.retriable_status_codes) == [503]
        assert retry.per_try_timeout.ToMilliseconds() == 2000
        assert retry.retry_priority.name == "envoy.retry_priorities.previous_priorities"


@pytest.mark.parametrize("retries", ["{attempts: 0}", "{}"])
def test_attempts_0_removes_retries_and_their_failover(retries: str) -> None:
    policy = parse_policy(resilient_policy(retries))
    for table in translate_scale(_placement(), policy, OPTIONS)[ROUTE].values():
        assert isinstance(table, route_pb2.RouteConfiguration)
        assert not table.virtual_hosts[0].HasField("retry_policy")


@pytest.mark.parametrize(
    "text",
    [
        SEED_POLICY_YAML,
        resilient_policy(),
        resilient_policy("{attempts: 1, retryOn: '503,unavailable'}"),
        resilient_policy("{attempts: 0}"),
    ],
)
def test_both_strategies_time_out_retry_and_eject_alike(text: str) -> None:
    policy = parse_policy(text)
    subset, by_scale = (
        translate_subset(_placement(), policy, OPTIONS),
        translate_scale(_placement(), policy, OPTIONS),
    )
    table = subset[ROUTE]["8008"]
    assert isinstance(table, route_pb2.RouteConfiguration)
    grpc = table.virtual_hosts[0].routes[0].route
    expected_retry = route_components_pb2.RetryPolicy()
    expected_retry.CopyFrom(grpc.retry_policy)
    for name in ("8008/1", "8008/rest/2"):
        vhost = _table(by_scale, name).virtual_hosts[0]
        (on_match,) = _entries(_table(by_scale, name)).values()
        assert _route(on_match).route.timeout == grpc.timeout
        retry = route_components_pb2.RetryPolicy()
        retry.CopyFrom(vhost.retry_policy)
        retry.ClearField("retry_priority")  # the scale strategy's failover to other pods
        assert retry == expected_retry
        assert vhost.HasField("retry_policy") == grpc.HasField("retry_policy")
    if policy.destination_rules[0].outlier_detection is None:
        return
    service = _cluster(subset[CLUSTER][SERVICE])
    for name in (SERVICE, _pod("7dd689-k2x9p")):
        cluster = _cluster(by_scale[CLUSTER][name])
        assert cluster.outlier_detection == service.outlier_detection
        assert cluster.common_lb_config.healthy_panic_threshold == (
            service.common_lb_config.healthy_panic_threshold
        )
