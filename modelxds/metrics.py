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
POLICY_OBJECTS = Gauge(
    "modelxds_policy_objects",
    "DestinationRule / VirtualService objects watched in Kubernetes (serve --kubernetes), "
    "by kind and whether accepted (false: invalid or colliding, see its status)",
    ["kind", "accepted"],
)
POLICY_WATCH_RESTARTS = Counter(
    "modelxds_policy_watch_restarts_total",
    "Watches of DestinationRule / VirtualService objects started again, by kind and reason "
    "(expired: 410 Gone, re-listed; error: retried with backoff)",
    ["kind", "reason"],
)
POLICY_STATUS_WRITES = Counter(
    "modelxds_policy_status_writes_total",
    "Status patches of DestinationRule / VirtualService objects, by result (written, failed)",
    ["result"],
)
LABELER_PATCHES = Counter(
    "modelxds_labeler_patches_total",
    "Pod label patches sent, by outcome: applied, conflict (409, retried), throttled (429, "
    "retried after Retry-After), gone (404, the pod is skipped), failed (retried)",
    ["outcome"],
)
LABELER_LAG_SECONDS = Histogram(
    "modelxds_labeler_lag_seconds",
    "From the placement snapshot that changed a pod's labels to the patch being applied",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
LABELER_PODS = Gauge(
    "modelxds_labeler_pods",
    "Runtime pods the labeler keeps labels on (matched to a live ModelMesh instance)",
    ["namespace"],
)
LABELER_OVERFLOWING_PODS = Gauge(
    "modelxds_labeler_overflowing_pods",
    "Pods with more routable names than --max-model-labels (labeled overflow)",
    ["namespace"],
)
LABELER_LEADER = Gauge(
    "modelxds_labeler_leader", "1 while this labeler holds the Lease and patches pods"
)
LABELER_POD_WATCH_RESTARTS = Counter(
    "modelxds_labeler_pod_watch_restarts_total",
    "Times the pod list was fetched again, by reason: gone (410), relist, error",
    ["reason"],
)
