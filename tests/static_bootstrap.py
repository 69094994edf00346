"""A translated config as one Envoy bootstrap of static resources, for a real Envoy to judge
with ``envoy --mode validate`` (no network, no xDS: in validate mode Envoy never fetches
what a listener or cluster subscribes to, so each such resource is put in its place).

EDS clusters become STATIC with their ClusterLoadAssignment inline, an RDS listener
carries its RouteConfiguration inline, and a scoped-routes listener lists its scopes each
with its route table inline. The resources themselves are the very messages the ADS
server would send; Envoy runs the same constructors on them either way.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from modelxds.localmesh import processes
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, Resources


def static_bootstrap(resources: Resources) -> bootstrap_pb2.Bootstrap:
    """Every cluster and listener of ``resources``, with what they discover inline."""
    out = bootstrap_pb2.Bootstrap()
    endpoints = resources.get(ENDPOINT, {})
    routes = resources.get(ROUTE, {})
    for name, msg in resources.get(CLUSTER, {}).items():
        cluster = out.static_resources.clusters.add()
        cluster.CopyFrom(msg)
        if cluster.type == cluster_pb2.Cluster.EDS:
            # a cluster without its EDS would only warm; a missing one is a test error
            cla = endpoints[cluster.eds_cluster_config.service_name or name]
            assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.ClearField("eds_cluster_config")
            cluster.load_assignment.CopyFrom(cla)
    scopes = resources.get(SCOPED_ROUTE, {})
    for msg in resources.get(LISTENER, {}).values():
        listener = out.static_resources.listeners.add()
        listener.CopyFrom(msg)
        for chain in _chains(listener):
            for network_filter in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                if not network_filter.typed_config.Unpack(hcm):
                    continue
                if hcm.HasField("rds"):
                    table = routes[hcm.rds.route_config_name]
                    assert isinstance(table, route_pb2.RouteConfiguration)
                    hcm.route_config.CopyFrom(table)
                elif hcm.scoped_routes.HasField("scoped_rds"):
                    _inline_scopes(hcm.scoped_routes, scopes, routes)
                network_filter.typed_config.Pack(hcm)
    return out


def _chains(listener: listener_pb2.Listener) -> list[listener_pb2.FilterChain]:
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    return chains


def _inline_scopes(
    scoped: hcm_pb2.ScopedRoutes, scopes: Mapping[str, Message], routes: Mapping[str, Message]
) -> None:
    """SRDS sends every scope to every listener; a listener's own scopes are those named
    by its port (scale.shard_prefix), the only keys its Lua filter can produce. Listing
    only those keeps a batch of many cases' listeners small."""
    scoped.ClearField("scoped_rds")
    configs = scoped.scoped_route_configurations_list.scoped_route_configurations
    for name, msg in scopes.items():
        assert isinstance(msg, scoped_route_pb2.ScopedRouteConfiguration)
        if not name.startswith(f"{scoped.name}/"):
            continue
        scope = configs.add()
        scope.CopyFrom(msg)
        table = routes[scope.route_configuration_name]
        assert isinstance(table, route_pb2.RouteConfiguration)
        scope.ClearField("route_configuration_name")
        scope.route_configuration.CopyFrom(table)


def envoy_refusal(bootstrap: bootstrap_pb2.Bootstrap, workdir: Path) -> str | None:
    """What a real Envoy says is wrong with ``bootstrap``, or None when it takes it."""
    path = workdir / "bootstrap.pb"  # binary: the exact bytes, whatever the strings hold
    path.write_bytes(bootstrap.SerializeToString())
    check = subprocess.run(
        [
            processes.binary("envoy"),
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "critical",
            "-c",
            str(path),
        ],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
    )
    if check.returncode == 0:
        return None
    output = (check.stderr + check.stdout).strip()
    # "[time][pid][critical][main] [file:line] error initializing configuration 'path': why"
    _, found, why = output.partition(f"{path}': ")
    return (why if found else output) or f"envoy exited {check.returncode}"
