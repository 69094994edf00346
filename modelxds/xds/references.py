"""Dangling references in a config, found before it is published.

A gateway given a route to a cluster it lacks answers 503 (not retried); a listener or
scope naming a route table it never gets, or an EDS cluster without endpoints, never
leaves warming. A translation that would do so is a bug in modelxds: it is refused
whole, and the last good config keeps serving (go-control-plane's ``Consistent()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message
from xds.type.matcher.v3 import matcher_pb2

from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources


class ReferenceCheck:
    """Checks configs one after another. A route table's cluster names are read once
    while the table is the same message: the scale strategy hands on unchanged ones."""

    def __init__(self) -> None:
        self._clusters_of: dict[str, tuple[Message, frozenset[str]]] = {}

    def problems(self, resources: Resources) -> list[str]:
        """Every dangling reference, as "<kind> <name> names <kind> <name>, which ..."."""
        clusters = resources.get(CLUSTER, {})
        endpoints = resources.get(ENDPOINT, {})
        routes = resources.get(ROUTE, {})
        out = []
        for name, cluster in clusters.items():
            assert isinstance(cluster, cluster_pb2.Cluster)
            if cluster.type == cluster_pb2.Cluster.EDS:
                wanted = cluster.eds_cluster_config.service_name or name
                if wanted not in endpoints:
                    out.append(f"cluster {name} takes endpoints {wanted}, which EDS lacks")
        for name, listener in resources.get(LISTENER, {}).items():
            assert isinstance(listener, listener_pb2.Listener)
            for table_name in _route_tables(listener):
                if table_name not in routes:
                    out.append(f"listener {name} names route table {table_name}, which RDS lacks")
        for name, scope in resources.get(SCOPED_ROUTE, {}).items():
            assert isinstance(scope, scoped_route_pb2.ScopedRouteConfiguration)
            if scope.route_configuration_name not in routes:
                out.append(
                    f"scope {name} names route table {scope.route_configuration_name}, "
                    "which RDS lacks"
                )
        seen: dict[str, tuple[Message, frozenset[str]]] = {}
        for name, table in routes.items():
            known = self._clusters_of.get(name)
            if known is None or known[0] is not table:
                assert isinstance(table, route_pb2.RouteConfiguration)
                known = (table, frozenset(_clusters_in(table)))
            seen[name] = known
            out.extend(
                f"route table {name} names cluster {c}, which CDS lacks"
                for c in sorted(known[1] - clusters.keys())
            )
        self._clusters_of = seen
        return out


def _route_tables(listener: listener_pb2.Listener) -> Iterator[str]:
    for chain in listener.filter_chains:
        for f in chain.filters:
            hcm = hcm_pb2.HttpConnectionManager()
            if f.typed_config.Unpack(hcm) and hcm.HasField("rds"):
                yield hcm.rds.route_config_name


def _clusters_in(table: route_pb2.RouteConfiguration) -> Iterator[str]:
    for vhost in table.virtual_hosts:
        for route in vhost.routes:
            yield from _route_clusters(route)
        if vhost.HasField("matcher"):
            yield from _matcher_clusters(vhost.matcher)


def _matcher_clusters(matcher: matcher_pb2.Matcher) -> Iterator[str]:
    on_matches: list[matcher_pb2.Matcher.OnMatch] = []
    if matcher.HasField("on_no_match"):
        on_matches.append(matcher.on_no_match)
    tree: Mapping[str, matcher_pb2.Matcher.OnMatch] = matcher.matcher_tree.exact_match_map.map
    on_matches.extend(tree.values())
    on_matches.extend(m.on_match for m in matcher.matcher_list.matchers)
    for on_match in on_matches:
        if on_match.HasField("matcher"):
            yield from _matcher_clusters(on_match.matcher)
            continue
        route = route_components_pb2.Route()
        if on_match.action.typed_config.Unpack(route):
            yield from _route_clusters(route)


def _route_clusters(route: route_components_pb2.Route) -> Iterator[str]:
    if route.route.cluster:
        yield route.route.cluster
    for weighted in route.route.weighted_clusters.clusters:
        yield weighted.name
