"""Small Envoy resources for cache and ADS tests."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import duration_pb2


def cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(seconds=timeout_s),
    )


def assignment(
    name: str, *ports: int, host: str = "10.0.0.1"
) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    lb_endpoints = cla.endpoints.add().lb_endpoints
    for port in ports:
        ep = lb_endpoints.add()
        ep.endpoint.address.socket_address.address = host
        ep.endpoint.address.socket_address.port_value = port
    return cla


def route_table(name: str, routes: dict[str, str]) -> route_pb2.RouteConfiguration:
    """One virtual host for every domain; routes: path prefix -> cluster."""
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=prefix),
                        route=route_components_pb2.RouteAction(cluster=target),
                    )
                    for prefix, target in routes.items()
                ],
            )
        ],
    )
