"""Prometheus metrics: every counter an operator needs to see the control plane's health."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INVALID_RECORDS = Counter(
    "modelxds_etcd_invalid_records_total",
    "ModelMesh etcd values that could not be parsed and were skipped",
    ["table"],
)
IGNORED_FIELDS = Counter(
    "modelxds_etcd_ignored_fields_total",
    "Fields of ModelMesh etcd records with a value of the wrong type, read as their default "
    "(the record was kept); counted once per key until its problems change",
    ["table"],
)
WATCH_RESTARTS = Counter(
    "modelxds_etcd_watch_restarts_total",
    "Times the etcd watch was re-established (re-list), by reason",
    ["reason"],
)
ETCD_REVISION = Gauge("modelxds_etcd_revision", "etcd revision the placement reflects")
MODELS = Gauge("modelxds_models", "Models in the registry", ["namespace"])
INSTANCES = Gauge("modelxds_instances", "Live ModelMesh pods", ["namespace"])
SNAPSHOT_BUILD_SECONDS = Histogram(
    "modelxds_snapshot_build_seconds",
    "Time to build placement, translate and serialize one snapshot",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SNAPSHOTS = Counter("modelxds_snapshots_total", "Snapshots published to the cache")
SNAPSHOTS_REFUSED = Counter(
    "modelxds_snapshots_refused_total",
    "Translated configs not published: a route, listener or scope named what they lack",
)
CONNECTED_GATEWAYS = Gauge("modelxds_xds_connected_streams", "Open ADS streams")
XDS_RESPONSES = Counter("modelxds_xds_responses_total", "DiscoveryResponses sent", ["type"])
XDS_ACKS = Counter("modelxds_xds_acks_total", "ACKs received", ["type"])
XDS_NACKS = Counter("modelxds_xds_nacks_total", "NACKs received (config rejected)", ["type"])
POLICY_RELOADS = Counter(
    "modelxds_policy_reloads_total",
    "Policy reloads on SIGHUP, by result (applied, or rejected: the last good one serves)",
    ["result"],
)
