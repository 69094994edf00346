"""xDS type URLs and the shape of a translated config."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# The order a gateway must receive changes in: a cluster before its endpoints,
# a listener before its routes (and CDS/EDS before the LDS/RDS that use them).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}

# Wildcard types send every resource; the others send what the gateway names.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

Resources = Mapping[str, Mapping[str, Message]]
