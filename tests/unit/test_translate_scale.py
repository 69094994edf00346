"""The "scale" translator: golden file for the seed policy, routes per model, fallbacks,
and which xDS types a change touches."""

from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message
from xds.type.matcher.v3 import matcher_pb2

from modelxds.placement.model import Copies, Placement
from modelxds.policy import default_policy, parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources
from modelxds.xds.scale import MODEL_HEADER, translate_scale
from modelxds.xds.translate import translate
from tests.unit.test_translate import (
    KEY,
    OPTIONS,
    _check_golden,
    _placement,
    several_headers_and_ports,
)

FQDN = "modelmesh-serving.modelmesh-serving.svc.cluster.local"
SERVICE = f"outbound|8033||{FQDN}"
PODS = ("7dd689-4zwqs", "7dd689-k2x9p", "7dd689-p3r7q")


def _pod(iid: str, port: int = 8033) -> str:
    return f"{iid}.modelmesh-serving:{port}"


def _policy(fallback: str = "ANY_ENDPOINT", default_subset: str = "") -> str:
    text = SEED_POLICY_YAML.replace("fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {fallback}")
    if default_subset:
        text = text.replace(
            "        subsetSelectors:",
            f"        defaultSubset: {{{KEY}: {default_subset}}}\n        subsetSelectors:",
        )
    return text


def _route_config(resources: Resources, name: str = "8008") -> route_pb2.RouteConfiguration:
    msg = resources[ROUTE][name]
    assert isinstance(msg, route_pb2.RouteConfiguration)
    return msg


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


def _routes(resources: Resources, config: str = "8008") -> dict[str, list[str]]:
    matcher = _route_config(resources, config).virtual_hosts[0].matcher
    return {
        name: _targets(_route(on_match))
        for name, on_match in matcher.matcher_tree.exact_match_map.map.items()
    }


def _no_match(resources: Resources) -> list[str]:
    return _targets(_route(_route_config(resources).virtual_hosts[0].matcher.on_no_match))


def _serialized(resources: Resources, type_url: str) -> dict[str, bytes]:
    return {n: m.SerializeToString(deterministic=True) for n, m in resources[type_url].items()}


def _http_filters(resources: Resources, name: str = "0.0.0.0_8008") -> list[hcm_pb2.HttpFilter]:
    listener = resources[LISTENER][name]
    assert isinstance(listener, listener_pb2.Listener)
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return list(hcm.http_filters)


def test_seed_policy_golden() -> None:
    _check_golden("seed_scale.json", translate_scale(_placement(), default_policy(), OPTIONS))


def test_translation_is_deterministic() -> None:
    a = translate_scale(_placement(), default_policy(), OPTIONS)
    b = translate_scale(_placement(), default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        assert _serialized(a, t) == _serialized(b, t)


def test_each_name_routes_to_exactly_its_routable_pods() -> None:
    placement = _placement()
    mesh = placement.meshes["modelmesh-serving"]
    routes = _routes(translate_scale(placement, default_policy(), OPTIONS))
    assert routes == {
        # the vmodel follows its active model, not the target that is still loading
        "example-mnist-isvc": [_pod("7dd689-4zwqs"), _pod("7dd689-k2x9p")],
        "mnist-svm__isvc-6b2eb0b8bf": [_pod("7dd689-4zwqs"), _pod("7dd689-k2x9p")],
        # a copy that is still loading takes traffic when it is the only one
        "xgb__isvc-1a2b3c4d5e": [_pod("7dd689-p3r7q")],
        # "orphan" (a dead pod's copy and a failed load) has no route: fallback
    }
    for name, clusters in routes.items():
        assert clusters == [_pod(iid) for iid in mesh.routable(name)]


def test_per_model_routes_split_equally_and_never_time_out() -> None:
    matcher = _route_config(translate_scale(_placement(), default_policy(), OPTIONS))
    on_match = matcher.virtual_hosts[0].matcher.matcher_tree.exact_match_map.map
    action = _route(on_match["example-mnist-isvc"]).route
    assert [c.weight.value for c in action.weighted_clusters.clusters] == [1, 1]
    assert action.timeout.ToSeconds() == 0  # ModelMesh may hold a request while it loads
    one_copy = _route(on_match["xgb__isvc-1a2b3c4d5e"]).route
    assert one_copy.cluster == _pod("7dd689-p3r7q")  # cheaper for Envoy than a 1-way split
    assert one_copy.HasField("timeout") and one_copy.timeout.ToSeconds() == 0


def test_retries_and_mm_balanced_are_set_once_on_the_virtual_host() -> None:
    vhost = _route_config(translate_scale(_placement(), default_policy(), OPTIONS)).virtual_hosts[0]
    subset = _route_config(translate(_placement(), default_policy(), OPTIONS))
    subset_route = subset.virtual_hosts[0].routes[0]
    assert list(vhost.request_headers_to_add) == list(subset_route.request_headers_to_add)
    retry = vhost.retry_policy
    assert retry.retry_on == subset_route.route.retry_policy.retry_on
    assert retry.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert not vhost.routes  # a matcher and a route list are exclusive


def test_pod_clusters_are_static_with_the_other_pods_for_retries() -> None:
    resources = translate_scale(_placement(), default_policy(), OPTIONS)
    assert sorted(resources[CLUSTER]) == sorted([SERVICE, *map(_pod, PODS)])
    assert list(resources[ENDPOINT]) == [SERVICE]  # only the all-pods cluster uses EDS
    pod = _cluster(resources[CLUSTER][_pod("7dd689-k2x9p")])
    assert pod.type == cluster_pb2.Cluster.STATIC
    assert not pod.HasField("lb_subset_config")
    by_priority = {
        group.priority: [ep.endpoint.hostname for ep in group.lb_endpoints]
        for group in pod.load_assignment.endpoints
    }
    assert by_priority == {0: ["7dd689-k2x9p"], 1: ["7dd689-4zwqs", "7dd689-p3r7q"]}
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


def test_placement_change_touches_only_routes() -> None:
    before = translate_scale(_placement(), default_policy(), OPTIONS)
    mesh = _placement().meshes["modelmesh-serving"]
    # mnist unloads from one pod, xgb finishes loading and loads on a second pod
    models = dict(mesh.models)
    models["mnist-svm__isvc-6b2eb0b8bf"] = Copies(("7dd689-4zwqs",))
    models["xgb__isvc-1a2b3c4d5e"] = Copies(("7dd689-k2x9p", "7dd689-p3r7q"))
    moved = dataclasses.replace(mesh, models=MappingProxyType(models))
    after = translate_scale(Placement({"modelmesh-serving": moved}), default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER):
        assert _serialized(after, t) == _serialized(before, t), t
    assert _serialized(after, ROUTE) != _serialized(before, ROUTE)
    assert _routes(after)["xgb__isvc-1a2b3c4d5e"] == [_pod("7dd689-k2x9p"), _pod("7dd689-p3r7q")]


def test_pod_load_statistics_change_nothing() -> None:
    before = translate_scale(_placement(), default_policy(), OPTIONS)
    mesh = _placement().meshes["modelmesh-serving"]
    busier = {
        iid: dataclasses.replace(pod, used=pod.used + 1000, rpm=500, model_count=9)
        for iid, pod in mesh.instances.items()
    }
    changed = dataclasses.replace(mesh, instances=MappingProxyType(busier))
    after = translate_scale(Placement({"modelmesh-serving": changed}), default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        assert _serialized(after, t) == _serialized(before, t), t


def test_listener_keeps_the_subset_model_extraction_then_copies_it_into_a_header() -> None:
    scale = _http_filters(translate_scale(_placement(), default_policy(), OPTIONS))
    subset = _http_filters(translate(_placement(), default_policy(), OPTIONS))
    assert [f.name for f in scale] == [
        "envoy.filters.http.header_to_metadata",
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    assert scale[0] == subset[0]  # same precedence: ModelMesh headers, VS headers, REST path
    assert scale[3:] == subset[1:]
    mutation = header_mutation_pb2.HeaderMutation()
    assert scale[1].typed_config.Unpack(mutation)
    steps = [
        json_format.MessageToDict(m, preserving_proto_field_name=True)
        for m in mutation.mutations.request_mutations
    ]
    assert steps == [
        {"remove": MODEL_HEADER},  # a client cannot pick the route itself
        {
            "append": {
                "header": {"key": MODEL_HEADER, "value": f"%DYNAMIC_METADATA(envoy.lb:{KEY})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        },
    ]
    assert "clearRouteCache()" in json.dumps(json_format.MessageToDict(scale[2]))


@pytest.mark.parametrize(
    ("fallback", "default_subset", "expected"),
    [
        ("ANY_ENDPOINT", "", [SERVICE]),
        ("NO_FALLBACK", "", ["status 503"]),
        ("DEFAULT_SUBSET", "example-mnist-isvc", [_pod("7dd689-4zwqs"), _pod("7dd689-k2x9p")]),
        # no pod has the default subset: the subset load balancer finds no host either
        ("DEFAULT_SUBSET", "orphan", ["status 503"]),
    ],
)
def test_fallback_follows_the_destination_rule(
    fallback: str, default_subset: str, expected: list[str]
) -> None:
    policy = parse_policy(_policy(fallback, default_subset))
    assert _no_match(translate_scale(_placement(), policy, OPTIONS)) == expected


def test_a_model_miss_and_a_request_without_model_can_fall_back_differently() -> None:
    # Envoy uses the selector's fallback when the request names a model, the rule's otherwise
    text = SEED_POLICY_YAML.replace(
        "        subsetSelectors:\n        - fallbackPolicy: ANY_ENDPOINT",
        "        fallbackPolicy: ANY_ENDPOINT\n"
        "        subsetSelectors:\n        - fallbackPolicy: NO_FALLBACK",
    )
    resources = translate_scale(_placement(), parse_policy(text), OPTIONS)
    nested = _route_config(resources).virtual_hosts[0].matcher.on_no_match.matcher
    (model_named,) = nested.matcher_list.matchers
    assert model_named.predicate.single_predicate.input.name == "model"
    assert _targets(_route(model_named.on_match)) == ["status 503"]
    assert _targets(_route(nested.on_no_match)) == [SERVICE]
    # retries leave the pod only where any pod may serve a model: not under NO_FALLBACK
    pod = _cluster(resources[CLUSTER][_pod("7dd689-k2x9p")])
    assert [g.priority for g in pod.load_assignment.endpoints] == [0]


def test_several_headers_and_ports() -> None:
    text = several_headers_and_ports()
    resources = translate_scale(_placement(), parse_policy(text), OPTIONS)
    assert sorted(resources[LISTENER]) == ["0.0.0.0_8008", "0.0.0.0_9008"]
    assert sorted(resources[ROUTE]) == ["8008", "9008"]
    assert (
        _route_config(resources, "8008").virtual_hosts[0]
        == _route_config(resources, "9008").virtual_hosts[0]
    )
    mutation = header_mutation_pb2.HeaderMutation()
    assert _http_filters(resources, "0.0.0.0_9008")[1].typed_config.Unpack(mutation)
    # a later mutation overwrites an earlier one: the model key wins over the alias
    values = [m.append.header.value for m in mutation.mutations.request_mutations[1:]]
    assert values == ["%DYNAMIC_METADATA(envoy.lb:alias)%", f"%DYNAMIC_METADATA(envoy.lb:{KEY})%"]


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
    assert sorted(resources[CLUSTER]) == sorted(
        [SERVICE, f"outbound|8008||{FQDN}"]
        + [_pod(i) for i in PODS]
        + [_pod(i, 8008) for i in PODS]
    )
    assert _routes(resources)["xgb__isvc-1a2b3c4d5e"] == [_pod("7dd689-p3r7q")]
    assert _routes(resources, "9008")["xgb__isvc-1a2b3c4d5e"] == [_pod("7dd689-p3r7q", 8008)]


def test_empty_placement_sends_everything_to_the_fallback() -> None:
    resources = translate_scale(Placement(), default_policy(), OPTIONS)
    assert list(resources[CLUSTER]) == [SERVICE]
    cla = resources[ENDPOINT][SERVICE]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    assert list(cla.endpoints[0].lb_endpoints) == []
    matcher = _route_config(resources).virtual_hosts[0].matcher
    # Envoy rejects an empty exact_match_map: no tree at all, only on_no_match
    assert not matcher.HasField("matcher_tree")
    assert _no_match(resources) == [SERVICE]
