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
SKIPPED_RECORDS = Gauge(
    "modelxds_etcd_skipped_records",
    "ModelMesh etcd records skipped as malformed right now, by table",
    ["namespace", "table"],
)
ETCD_EVENTS = Counter(
    "modelxds_etcd_events_total", "etcd watch events received, by type (put, delete)", ["type"]
)
ETCD_COMPACTIONS = Counter(
    "modelxds_etcd_compactions_total",
    "Times the watch found its next revision compacted away (then re-listed)",
)
MODELS = Gauge("modelxds_models", "Models in the registry", ["namespace"])
VMODELS = Gauge("modelxds_vmodels", "VModels (InferenceServices) in etcd", ["namespace"])
INSTANCES = Gauge("modelxds_instances", "Live ModelMesh pods", ["namespace"])
MODEL_COPIES = Gauge(
    "modelxds_model_copies",
    "Copies of models listed in the registry, by state: loaded, loading, failed, dead "
    "(on a pod that is gone)",
    ["namespace", "state"],
)
ROUTABLE_COPIES = Gauge(
    "modelxds_routable_copies",
    "Copies requests are routed to: each model's loaded copies, or its loading ones while "
    "none has loaded",
    ["namespace"],
)
SNAPSHOT_BUILD_SECONDS = Histogram(
    "modelxds_snapshot_build_seconds",
    "Time to build placement, translate and serialize one snapshot",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SNAPSHOT_STAGE_SECONDS = Histogram(
    "modelxds_snapshot_stage_seconds",
    "Time of each stage of building one snapshot: placement, translate, check (references), "
    "serialize",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DEBOUNCE_WAIT_SECONDS = Histogram(
    "modelxds_debounce_wait_seconds",
    "Time a change waited for a quiet period before its push began (0: the leading edge)",
    buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SNAPSHOTS = Counter("modelxds_snapshots_total", "Snapshots published to the cache")
SNAPSHOTS_REFUSED = Counter(
    "modelxds_snapshots_refused_total",
    "Translated configs not published: a route, listener or scope named what they lack",
)
CONNECTED_GATEWAYS = Gauge("modelxds_xds_connected_streams", "Open ADS streams")
XDS_RESPONSES = Counter(
    "modelxds_xds_responses_total", "DiscoveryResponses sent (pushes), by type", ["type"]
)
XDS_SENT_BYTES = Counter(
    "modelxds_xds_sent_bytes_total", "Bytes of DiscoveryResponses sent, by type", ["type"]
)
XDS_ACKS = Counter("modelxds_xds_acks_total", "ACKs received", ["type"])
XDS_NACKS = Counter(
    "modelxds_xds_nacks_total",
    "NACKs received (config rejected), once per rejected version and stream; the gateway's "
    "error is logged",
    ["type"],
)
XDS_NACKED_STREAMS = Gauge(
    "modelxds_xds_nacked_streams",
    "ADS streams whose last answer for the type was a NACK (`modelxds status` shows the error)",
    ["type"],
)
XDS_IDENTITY_REFUSALS = Counter(
    "modelxds_xds_identity_refusals_total",
    "ADS streams refused with PERMISSION_DENIED for the node they name, by reason: "
    "not_in_certificate (the node id is none of the client certificate's identities), "
    "no_node_id (the first request names none, with --xds-client-ca), node_id_changed "
    "(a later request names another node)",
    ["reason"],
)
XDS_BEHIND_STREAMS = Gauge(
    "modelxds_xds_behind_streams",
    "ADS streams that have not ACKed the current config of every type they asked for",
)
XDS_MAX_BEHIND_SECONDS = Gauge(
    "modelxds_xds_max_behind_seconds",
    "The longest any connected gateway has been behind: since the oldest version it has "
    "not ACKed was published (0: all in sync)",
)
CONVERGENCE_SECONDS = Histogram(
    "modelxds_xds_convergence_seconds",
    "From the etcd event to every gateway connected at publication ACKing the first "
    "version containing it (or a later one); one observation per version",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CONVERGENCE_UNOBSERVED = Counter(
    "modelxds_xds_convergence_unobserved_total",
    "Versions with an etcd event whose convergence was not observed, by reason: nacked, "
    "disconnected (a gateway left first), no_gateways, too_many_pending",
    ["reason"],
)
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
EPP_PICKS = Counter(
    "modelxds_epp_picks_total",
    "Endpoint picks (modelxds epp), by outcome: holder, loading (only copies still loading), "
    "fallback (no copy: the policy's fallback), no_model, not_found (NO_FALLBACK, 404), "
    "unavailable (no live pod, 503)",
    ["outcome"],
)
EPP_PICK_SECONDS = Histogram(
    "modelxds_epp_pick_seconds",
    "Time the endpoint picker takes to pick once it knows the model",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
EPP_BODY_PARSES = Counter(
    "modelxds_epp_body_parses_total",
    "gRPC request bodies the endpoint picker read for model_name, by result: found, absent, "
    "unreadable (compressed), malformed (answered INVALID_ARGUMENT)",
    ["result"],
)
EPP_INVALID_MESSAGES = Counter(
    "modelxds_epp_invalid_messages_total",
    "ext_proc messages out of protocol order or that failed to process, by kind "
    "(the stream goes on, or ends with INTERNAL on an error)",
    ["kind"],
)
