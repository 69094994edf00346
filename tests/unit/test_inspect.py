"""`modelxds inspect` reads where a gateway sends each name from Envoy's config dump.

The dumps here are the golden configs (tests/golden) in the shape Envoy's
``/config_dump?include_eds`` gives them, so the reader is held against exactly what
each strategy sends; tests/e2e/test_inspect.py reads real Envoys.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from modelxds import cli
from modelxds.inspect import (
    AdminError,
    PortRoutes,
    add_counters,
    find_drift,
    format_report,
    holders_report,
    read_config_dump,
    read_gateway,
    report,
    strategy_of,
)
from modelxds.placement.model import Placement
from modelxds.policy import parse_policy
from tests.unit.test_golden import CASES, GOLDEN

STRATEGIES = ["subset", "scale"]
ADMIN = "type.googleapis.com/envoy.admin.v3."
SEED_PORT = 8008


def config_dump(golden: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A golden config as Envoy's admin API dumps it: each resource typed, in its
    ``*ConfigDump``; a STATIC cluster's endpoints listed with EDS's (``include_eds``)."""

    def typed(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
        return {"@type": f"type.googleapis.com/envoy.config.{kind}", **doc}

    clusters = list(golden.get("Cluster", {}).values())
    endpoints = [*golden.get("ClusterLoadAssignment", {}).values()]
    endpoints += [c["load_assignment"] for c in clusters if "load_assignment" in c]
    listeners = list(golden.get("Listener", {}).values())
    scopes = [
        typed("route.v3.ScopedRouteConfiguration", s)
        for s in golden.get("ScopedRouteConfiguration", {}).values()
    ]
    # a scoped routes config set per listener that names one: SRDS is wildcard, each gets all
    scope_sets = [
        {"name": hcm["scoped_routes"]["name"], "scoped_route_configs": scopes}
        for lis in listeners
        for hcm in [lis["filter_chains"][0]["filters"][0]["typed_config"]]
        if "scoped_routes" in hcm
    ]
    return {
        "configs": [
            {"@type": ADMIN + "BootstrapConfigDump", "bootstrap": {}},
            {
                "@type": ADMIN + "ClustersConfigDump",
                "dynamic_active_clusters": [
                    {"version_info": "1", "cluster": typed("cluster.v3.Cluster", c)}
                    for c in clusters
                ],
            },
            {
                "@type": ADMIN + "EndpointsConfigDump",
                "dynamic_endpoint_configs": [
                    {"endpoint_config": typed("endpoint.v3.ClusterLoadAssignment", e)}
                    for e in endpoints
                ],
            },
            {
                "@type": ADMIN + "ListenersConfigDump",
                "dynamic_listeners": [
                    {
                        "name": lis["name"],
                        "active_state": {"listener": typed("listener.v3.Listener", lis)},
                    }
                    for lis in listeners
                ],
            },
            {"@type": ADMIN + "ScopedRoutesConfigDump", "dynamic_scoped_route_configs": scope_sets},
            {
                "@type": ADMIN + "RoutesConfigDump",
                "dynamic_route_configs": [
                    {"route_config": typed("route.v3.RouteConfiguration", r)}
                    for r in golden.get("RouteConfiguration", {}).values()
                ],
            },
        ]
    }


def golden_dump(case: str, strategy: str) -> dict[str, Any]:
    return config_dump(json.loads((GOLDEN / f"{case}-{strategy}.json").read_text()))


def case_placement(case: str) -> Placement:
    return CASES[case][1]()


def holders(r: PortRoutes) -> dict[str, set[str]]:
    return {name: {p.instance for p in pods} for name, pods in r.names.items()}


def seed_routes(strategy: str, case: str = "seed") -> dict[str, PortRoutes]:
    return {r.protocol: r for r in read_config_dump(golden_dump(case, strategy))}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_name_goes_to_the_pods_placement_routes_it_to(case: str, strategy: str) -> None:
    """Per listener port and protocol, the names Envoy routes and their pods are the
    placement's routes, for every golden case of both strategies: no drift."""
    policy_text, placement_of, options = CASES[case]
    placement, policy = placement_of(), parse_policy(policy_text)
    routes = read_config_dump(golden_dump(case, strategy))
    assert routes, "no listener read"
    from modelxds.xds.ir import destinations

    namespace_of = {
        port: d.namespace
        for d in destinations(placement, policy, options)
        for port in d.listen_ports
    }
    for r in routes:
        mesh = placement.meshes.get(namespace_of[r.port])
        expected = {n: set(p) for n, p in mesh.routes.items()} if mesh else {}
        assert holders(r) == expected, (r.port, r.protocol)
        assert r.unreachable == []
    assert find_drift(routes, placement, policy) == []
    assert strategy_of(golden_dump(case, strategy)) == strategy


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rest_goes_to_the_rest_proxy_and_grpc_to_the_grpc_port(strategy: str) -> None:
    by_protocol = seed_routes(strategy)
    assert set(by_protocol) == {"grpc", "rest"}
    grpc = by_protocol["grpc"].names["example-mnist-isvc"]
    rest = by_protocol["rest"].names["example-mnist-isvc"]
    assert [p.address for p in grpc] == ["100.96.35.150:8033", "100.96.35.151:8033"]
    assert [p.address for p in rest] == ["100.96.35.150:8008", "100.96.35.151:8008"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transcoded_rest_shares_the_grpc_routes(strategy: str) -> None:
    routes = read_config_dump(golden_dump("rest-transcode", strategy))
    pods = {r.protocol: {p.address for p in r.names["example-mnist-isvc"]} for r in routes}
    # subset reads a REST route (to the gRPC cluster); scale has only the gRPC tables
    assert all(a.endswith(":8033") for addresses in pods.values() for a in addresses)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_fallback_is_the_destination_rules(strategy: str) -> None:
    any_pod = seed_routes(strategy)["grpc"].fallback
    assert any_pod.policy == "ANY_ENDPOINT"
    assert {p.instance for p in any_pod.pods} == {"7dd689-4zwqs", "7dd689-k2x9p", "7dd689-p3r7q"}

    none = seed_routes(strategy, "no-fallback")["grpc"].fallback
    assert (none.policy, none.pods) == ("NO_FALLBACK", ())
    if strategy == "scale":  # the gateway answers it itself
        assert none.status == 404

    default = seed_routes(strategy, "default-subset")["grpc"].fallback
    assert default.policy == "DEFAULT_SUBSET"
    # defaultSubset names the model on 4zwqs and k2x9p
    assert {p.instance for p in default.pods} == {"7dd689-4zwqs", "7dd689-k2x9p"}


def _drop_pod(dump: dict[str, Any], strategy: str, name: str, pod: str) -> None:
    """Take ``pod`` out of ``name``'s routes in the dump, as a stale gateway would hold."""
    for c in dump["configs"]:
        if strategy == "subset" and c["@type"].endswith(".EndpointsConfigDump"):
            for e in c["dynamic_endpoint_configs"]:
                for ep in e["endpoint_config"]["endpoints"][0]["lb_endpoints"]:
                    if ep["endpoint"]["hostname"] == pod:
                        lb = ep.get("metadata", {}).get("filter_metadata", {}).get("envoy.lb", {})
                        for names in lb.values():
                            names.remove(name)
        if strategy == "scale" and c["@type"].endswith(".RoutesConfigDump"):
            for r in c["dynamic_route_configs"]:
                entries = (
                    r["route_config"]["virtual_hosts"][0]
                    .get("matcher", {})
                    .get("matcher_tree", {})
                    .get("exact_match_map", {})
                    .get("map", {})
                )
                if name in entries:
                    action = entries[name]["action"]["typed_config"]["route"]
                    kept = [
                        w
                        for w in action.pop("weighted_clusters")["clusters"]
                        if pod not in w["name"]
                    ]
                    action["cluster"] = kept[0]["name"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_stale_gateway_shows_as_drift_both_ways(strategy: str) -> None:
    """The gateway misses a copy etcd has (in_etcd) and still routes to one etcd lost."""
    dump = golden_dump("seed", strategy)
    _drop_pod(dump, strategy, "mnist-svm__isvc-6b2eb0b8bf", "7dd689-k2x9p")
    routes = read_config_dump(dump)
    policy = parse_policy(CASES["seed"][0])
    got = {
        (d.name, d.pod, d.protocol, d.in_etcd)
        for d in find_drift(routes, case_placement("seed"), policy)
    }
    assert got == {
        ("mnist-svm__isvc-6b2eb0b8bf", "7dd689-k2x9p", protocol, True)
        for protocol in ("grpc", "rest")
    }

    # etcd lost every pod: the gateway still sends the model to the one it knew
    drift = find_drift(
        read_config_dump(golden_dump("seed", strategy)), Placement(), policy, "xgb__isvc-1a2b3c4d5e"
    )
    assert {(d.name, d.pod, d.in_etcd) for d in drift} == {
        ("xgb__isvc-1a2b3c4d5e", "7dd689-p3r7q", False)
    }


def test_a_name_in_another_shards_table_is_unreachable() -> None:
    """The gateway's Lua picks a name's table by its hash: a route in any other table
    is never taken."""
    name = "xgb__isvc-1a2b3c4d5e"
    dump = golden_dump("seed", "scale")
    (rds,) = [c for c in dump["configs"] if c["@type"].endswith(".RoutesConfigDump")]
    tables = {r["route_config"]["name"]: r["route_config"] for r in rds["dynamic_route_configs"]}
    matchers = {
        n: t["virtual_hosts"][0]["matcher"]
        for n, t in tables.items()
        if "matcher" in t["virtual_hosts"][0]
    }
    grpc_shards = [f"8008/{shard}" for shard in range(4)]
    (home,) = [n for n in grpc_shards if name in json.dumps(matchers[n])]
    away = next(n for n in grpc_shards if n != home)
    moved = matchers[home]["matcher_tree"]["exact_match_map"]["map"].pop(name)
    tree = matchers[away].setdefault(
        "matcher_tree", dict(matchers[home]["matcher_tree"], exact_match_map={"map": {}})
    )
    tree["exact_match_map"]["map"][name] = moved
    grpc = {r.protocol: r for r in read_config_dump(dump)}["grpc"]
    assert name not in grpc.names
    assert grpc.unreachable == [name]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_counters_come_from_envoy_stats(strategy: str) -> None:
    routes = read_config_dump(golden_dump("seed", strategy))
    grpc = next(r for r in routes if r.protocol == "grpc")
    stats = {
        # Envoy writes a cluster name's ':' as '_' in its stat names
        "stats": [
            {"name": f"cluster.{c.replace(':', '_')}.{k}", "value": 7}
            for c in grpc.counters
            for k in ("upstream_rq_total", "lb_subsets_selected", "lb_subsets_fallback")
        ]
    }
    add_counters(routes, stats)
    assert grpc.counters and all(v["upstream_rq_total"] == 7 for v in grpc.counters.values())
    if strategy == "subset":
        assert all(v["lb_subsets_fallback"] == 7 for v in grpc.counters.values())
    text = format_report("127.0.0.1:15000", report(strategy, routes))
    assert "upstream_rq_total=" in text


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_model_shows_its_holders_or_the_fallback(strategy: str) -> None:
    routes = read_config_dump(golden_dump("seed", strategy))
    held = report(strategy, routes, "xgb__isvc-1a2b3c4d5e")
    assert [list(r["names"]) for r in held["routes"]] == [["xgb__isvc-1a2b3c4d5e"]] * 2
    assert [p["instance"] for p in held["routes"][0]["names"]["xgb__isvc-1a2b3c4d5e"]] == [
        "7dd689-p3r7q"
    ]
    text = format_report("127.0.0.1:15000", report(strategy, routes, "nobody-has-it"))
    assert "nobody-has-it  no holder: ANY_ENDPOINT (3 pods)" in text


def test_placement_model_answers_from_etcd_alone() -> None:
    placement = case_placement("seed")
    isvc = holders_report(placement, "example-mnist-isvc")["modelmesh-serving"]
    assert isvc["inference_service"]["state"] == "InProgress"
    assert isvc["model"] == "mnist-svm__isvc-6b2eb0b8bf"
    assert isvc["routable"] == {"7dd689-4zwqs": "100.96.35.150", "7dd689-k2x9p": "100.96.35.151"}
    loading = holders_report(placement, "xgb__isvc-1a2b3c4d5e")["modelmesh-serving"]
    assert loading["copies"]["loading"] == ["7dd689-p3r7q"]
    orphan = holders_report(placement, "orphan")["modelmesh-serving"]
    assert orphan["routable"] == {} and orphan["copies"]["dead"] == ["7dd689-gone00"]
    assert holders_report(placement, "no-such-model") == {}


def test_an_unreachable_admin_is_an_error_that_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens
    with pytest.raises(AdminError, match=f"cannot reach Envoy admin at http://127.0.0.1:{port}"):
        read_gateway(f"127.0.0.1:{port}", timeout=2)
    assert cli.main(["inspect", "--admin", f"http://127.0.0.1:{port}"]) == 2
    assert f"cannot reach Envoy admin at http://127.0.0.1:{port}" in capsys.readouterr().err
