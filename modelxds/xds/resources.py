"""xDS type URLs and the shape of a translated config."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# The order a gateway must receive changes in: a cluster before its endpoints, a
# listener before its route scopes and those before their routes (and CDS/EDS before
# the LDS/SRDS/RDS that use them).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", SCOPED_ROUTE: "srds", ROUTE: "rds"}

# Wildcard types send every resource (one left out is removed); the others send what
# the gateway names, and it keeps what a response leaves out.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER, SCOPED_ROUTE})

Resources = Mapping[str, Mapping[str, Message]]
