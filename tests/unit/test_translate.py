"""The "subset" translator: the policy knobs that shape the config."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message

from modelxds.kserve import descriptor_set_bytes
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.model import Placement, build_mesh
from modelxds.policy import default_policy, parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.builders import REST_MODEL_PATH
from modelxds.xds.ir import Options, RestMode
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources
from modelxds.xds.subset import translate_subset

NOW = 1_715_003_600_000
OPTIONS = Options(descriptor_set=descriptor_set_bytes())
KEY = "modelmesh.asm.alibabacloud.com"


def _placement(registry: dict[str, ModelRecord] | None = None) -> Placement:
    """Three pods, a model on two, one loading, an orphan, an InferenceService mid-change.
    ``registry``: model records to add or replace."""
    pods = {
        "7dd689-4zwqs": "100.96.35.150",
        "7dd689-k2x9p": "100.96.35.151",
        "7dd689-p3r7q": "100.96.35.152",
    }
    mesh = build_mesh(
        "modelmesh-serving",
        registry={
            "mnist-svm__isvc-6b2eb0b8bf": ModelRecord(
                type="rt:mlserver-1.x",
                instance_ids={"7dd689-4zwqs": NOW - 60_000, "7dd689-k2x9p": NOW - 30_000},
            ),
            # loading on one pod only: still routed there rather than loaded twice
            "xgb__isvc-1a2b3c4d5e": ModelRecord(instance_ids={"7dd689-p3r7q": NOW - 1000}),
            # its only copy is on a pod that is gone, and one load failed
            "orphan": ModelRecord(
                instance_ids={"7dd689-gone00": NOW - 99_000}, failed_in={"7dd689-k2x9p": NOW - 5000}
            ),
            **(registry or {}),
        },
        vmodels={
            "example-mnist-isvc": VModelRecord(
                owner="isvc",
                active_model="mnist-svm__isvc-6b2eb0b8bf",
                target_model="xgb__isvc-1a2b3c4d5e",
            )
        },
        instances={iid: InstanceRecord(start_time=NOW - 86_400_000) for iid in pods},
        litelinks={
            f"{ip}_8080_1": LitelinksRecord(hostname=ip, instance_id=iid, port=8080)
            for iid, ip in pods.items()
        },
        now_ms=NOW,
    )
    return Placement({"modelmesh-serving": mesh}, revision=42)


def _cla(msg: Message) -> endpoint_pb2.ClusterLoadAssignment:
    assert isinstance(msg, endpoint_pb2.ClusterLoadAssignment)
    return msg


def _cluster(msg: Message) -> cluster_pb2.Cluster:
    assert isinstance(msg, cluster_pb2.Cluster)
    return msg


def test_translation_is_deterministic() -> None:
    a = translate_subset(_placement(), default_policy(), OPTIONS)
    b = translate_subset(_placement(), default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        assert {n: m.SerializeToString(deterministic=True) for n, m in a[t].items()} == {
            n: m.SerializeToString(deterministic=True) for n, m in b[t].items()
        }


GRPC_CLUSTER = "outbound|8033||modelmesh-serving.modelmesh-serving.svc.cluster.local"
REST_CLUSTER = "outbound|8008|rest|modelmesh-serving.modelmesh-serving.svc.cluster.local"


@pytest.mark.parametrize(("cluster", "port"), [(GRPC_CLUSTER, 8033), (REST_CLUSTER, 8008)])
def test_endpoint_metadata_lists_routable_models_and_vmodels(cluster: str, port: int) -> None:
    eds = translate_subset(_placement(), default_policy(), OPTIONS)[ENDPOINT]
    cla = _cla(eds[cluster])
    meta = {
        ep.endpoint.hostname: [
            v.string_value
            for v in ep.metadata.filter_metadata["envoy.lb"].fields[KEY].list_value.values
        ]
        for ep in cla.endpoints[0].lb_endpoints
    }
    assert meta == {
        # the vmodel follows its active model, not the target that is still loading
        "7dd689-4zwqs": ["example-mnist-isvc", "mnist-svm__isvc-6b2eb0b8bf"],
        "7dd689-k2x9p": ["example-mnist-isvc", "mnist-svm__isvc-6b2eb0b8bf"],
        "7dd689-p3r7q": ["xgb__isvc-1a2b3c4d5e"],
    }
    ports = {ep.endpoint.address.socket_address.port_value for ep in cla.endpoints[0].lb_endpoints}
    assert ports == {port}


@pytest.mark.parametrize(
    ("policy", "cluster_fallback"),
    [("ANY_ENDPOINT", "ANY_ENDPOINT"), ("NO_FALLBACK", "NO_FALLBACK")],
)
def test_fallback_policy_reaches_the_cluster(policy: str, cluster_fallback: str) -> None:
    text = SEED_POLICY_YAML.replace("fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {policy}")
    cds = translate_subset(_placement(), parse_policy(text), OPTIONS)[CLUSTER]
    assert sorted(cds) == [REST_CLUSTER, GRPC_CLUSTER]
    for cluster in map(_cluster, cds.values()):
        _assert_subset_fallback(cluster, cluster_fallback)


def _assert_subset_fallback(cluster: cluster_pb2.Cluster, cluster_fallback: str) -> None:
    subset = cluster.lb_subset_config
    assert (
        subset.DESCRIPTOR.fields_by_name["fallback_policy"]
        .enum_type.values_by_number[subset.fallback_policy]
        .name
        == cluster_fallback
    )
    selector = subset.subset_selectors[0]
    assert (
        selector.DESCRIPTOR.fields_by_name["fallback_policy"]
        .enum_type.values_by_number[selector.fallback_policy]
        .name
        == cluster_fallback
    )
    assert subset.list_as_any


def test_default_subset_is_configured() -> None:
    text = SEED_POLICY_YAML.replace(
        "fallbackPolicy: ANY_ENDPOINT", "fallbackPolicy: DEFAULT_SUBSET"
    ).replace(
        "        subsetSelectors:",
        "        defaultSubset: {" + KEY + ": example-mnist-isvc}\n        subsetSelectors:",
    )
    for cluster in map(
        _cluster, translate_subset(_placement(), parse_policy(text), OPTIONS)[CLUSTER].values()
    ):
        assert dict(cluster.lb_subset_config.default_subset) == {KEY: "example-mnist-isvc"}


def several_headers_and_ports() -> str:
    """The seed plus a second header (to a second key) and a second listener port."""
    return (
        SEED_POLICY_YAML.replace(
            "    - header: model\n      key: modelmesh.asm.alibabacloud.com",
            "    - header: model\n      key: modelmesh.asm.alibabacloud.com\n"
            "    - header: x-model\n      key: alias",
        )
        .replace("    - port: 8008", "    - port: 8008\n    - port: 9008")
        .replace(
            "          keys: [modelmesh.asm.alibabacloud.com]",
            "          keys: [modelmesh.asm.alibabacloud.com]\n        - keys: [alias]",
        )
    )


def test_several_headers_and_ports() -> None:
    resources = translate_subset(_placement(), parse_policy(several_headers_and_ports()), OPTIONS)
    assert sorted(resources[LISTENER]) == ["0.0.0.0_8008", "0.0.0.0_9008"]
    assert sorted(resources[ROUTE]) == ["8008", "9008"]
    listener = resources[LISTENER]["0.0.0.0_8008"]
    dumped = json.dumps(json_format.MessageToDict(listener))
    # ModelMesh headers first, the policy's headers next, the REST path last (later rules win)
    order = [
        dumped.index(h)
        for h in ('"mm-model-id"', '"mm-vmodel-id"', '"model"', '"x-model"', '":path"')
    ]
    assert order == sorted(order)


def test_namespace_without_placement_gets_a_cluster_without_endpoints() -> None:
    text = SEED_POLICY_YAML.replace("namespace: modelmesh-serving", "namespace: team-b")
    resources = translate_subset(_placement(), parse_policy(text), OPTIONS)
    assert sorted(resources[CLUSTER]) == [
        "outbound|8008|rest|modelmesh-serving.team-b.svc.cluster.local",
        "outbound|8033||modelmesh-serving.team-b.svc.cluster.local",
    ]
    for name in resources[CLUSTER]:
        assert list(_cla(resources[ENDPOINT][name]).endpoints[0].lb_endpoints) == []


def _routes(resources: Resources, name: str = "8008") -> list[route_components_pb2.Route]:
    config = resources[ROUTE][name]
    assert isinstance(config, route_pb2.RouteConfiguration)
    (vhost,) = config.virtual_hosts
    return list(vhost.routes)


def _added_headers(route: route_components_pb2.Route) -> dict[str, str]:
    return {h.header.key: h.header.value for h in route.request_headers_to_add}


def _hcm(resources: Resources, name: str = "0.0.0.0_8008") -> hcm_pb2.HttpConnectionManager:
    listener = resources[LISTENER][name]
    assert isinstance(listener, listener_pb2.Listener)
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_grpc_goes_to_the_grpc_port_and_rest_to_the_pods_rest_proxy() -> None:
    grpc, rest, other = _routes(translate_subset(_placement(), default_policy(), OPTIONS))
    assert grpc.match.HasField("grpc") and grpc.route.cluster == GRPC_CLUSTER
    assert _added_headers(grpc) == {"mm-balanced": "true"}
    assert rest.route.cluster == REST_CLUSTER
    # the REST proxy passes on only grpc-metadata- headers, prefix stripped
    assert _added_headers(rest) == {"grpc-metadata-mm-balanced": "true"}
    assert other.direct_response.status == 400
    error = json.loads(other.direct_response.body.inline_string)["error"]
    assert "/v2/models/{name}/infer" in error and "model, mm-model-id, mm-vmodel-id" in error
    rest_cluster = _cluster(
        translate_subset(_placement(), default_policy(), OPTIONS)[CLUSTER][REST_CLUSTER]
    )
    assert not rest_cluster.typed_extension_protocol_options  # HTTP/1.1, as the REST proxy
    filters = [
        f.name for f in _hcm(translate_subset(_placement(), default_policy(), OPTIONS)).http_filters
    ]
    assert "envoy.filters.http.grpc_json_transcoder" not in filters


def test_rest_port_comes_from_the_flag_or_the_virtual_services_annotation() -> None:
    by_flag = translate_subset(_placement(), default_policy(), replace(OPTIONS, rest_port=9000))
    assert (
        "outbound|9000|rest|modelmesh-serving.modelmesh-serving.svc.cluster.local"
        in by_flag[CLUSTER]
    )
    text = SEED_POLICY_YAML.replace(
        "metadata: {name: vs-modelmesh-serving-service, namespace: modelmesh-serving}",
        "metadata:\n  name: vs-modelmesh-serving-service\n  namespace: modelmesh-serving\n"
        "  annotations: {modelxds.io/rest-port: '18008'}",
    )
    by_annotation = translate_subset(
        _placement(), parse_policy(text), replace(OPTIONS, rest_port=9000)
    )
    _, rest, _ = _routes(by_annotation)
    assert (
        rest.route.cluster
        == "outbound|18008|rest|modelmesh-serving.modelmesh-serving.svc.cluster.local"
    )


def test_transcode_mode_sends_rest_as_grpc_and_refuses_the_data_form() -> None:
    resources = translate_subset(
        _placement(), default_policy(), replace(OPTIONS, rest=RestMode.TRANSCODE)
    )
    assert sorted(resources[CLUSTER]) == [GRPC_CLUSTER]
    _, rest, _ = _routes(resources)
    assert rest.route.cluster == GRPC_CLUSTER and _added_headers(rest) == {"mm-balanced": "true"}
    filters = [f.name for f in _hcm(resources).http_filters]
    # the guard reads the body before the transcoder drops the field it does not know
    assert filters.index("envoy.filters.http.lua") < filters.index(
        "envoy.filters.http.grpc_json_transcoder"
    )


@pytest.mark.parametrize("policy", ["ANY_ENDPOINT", "NO_FALLBACK"])
def test_no_fallback_turns_a_model_no_pod_holds_into_404(policy: str) -> None:
    text = SEED_POLICY_YAML.replace("fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {policy}")
    hcm = _hcm(translate_subset(_placement(), parse_policy(text), OPTIONS))
    if policy == "ANY_ENDPOINT":
        assert not hcm.HasField("local_reply_config")
        return
    (mapper,) = hcm.local_reply_config.mappers
    assert mapper.status_code.value == 404
    flags = mapper.filter.and_filter.filters[0].response_flag_filter.flags
    assert list(flags) == ["UH"]  # no healthy upstream: the subset LB found no pod
    body = json_format.MessageToDict(mapper.body_format_override.json_format)
    assert body["code"] == 5 and f"%DYNAMIC_METADATA(envoy.lb:{KEY})%" in body["error"]


def test_no_fallback_without_any_pod_stays_503_and_the_listener_stays_as_it_is() -> None:
    text = SEED_POLICY_YAML.replace("fallbackPolicy: ANY_ENDPOINT", "fallbackPolicy: NO_FALLBACK")
    policy = parse_policy(text)
    up, down = (
        translate_subset(_placement(), policy, OPTIONS),
        translate_subset(Placement({}), policy, OPTIONS),
    )
    # the last pod going (or the first coming) changes routes, never the listener
    assert up[LISTENER] == down[LISTENER]
    (mapper,) = _hcm(down).local_reply_config.mappers
    pods_up = mapper.filter.and_filter.filters[2].header_filter.header
    assert pods_up.name == "x-modelxds-no-pods" and pods_up.invert_match
    for route in _routes(down)[:2]:
        assert _added_headers(route)["x-modelxds-no-pods"] == "true"  # the mapper keeps 503
    for route in _routes(up)[:2]:
        assert "x-modelxds-no-pods" not in _added_headers(route)
        assert list(route.request_headers_to_remove) == ["x-modelxds-no-pods"]


def test_rest_path_rule_reads_query_strings_versions_metadata_and_ready() -> None:
    pattern = re.compile(REST_MODEL_PATH)
    for path in (
        "/v2/models/m-1/infer",
        "/v2/models/m-1/infer?x=1",
        "/v2/models/m-1/versions/3/infer",
        "/v2/models/m-1",
        "/v2/models/m-1/ready",
        "/v2/models/m-1/versions/3/ready?verbose",
    ):
        match = pattern.fullmatch(path)
        assert match is not None and match.group(1) == "m-1", path
    for path in ("/inference.GRPCInferenceService/ModelInfer", "/v2/health/ready", "/v2"):
        match = pattern.fullmatch(path)
        assert match is not None and not match.group(1), path


# --- outlierDetection, timeout and retries, translated as Istio translates them ----------

RETRIES = "{attempts: 3, perTryTimeout: 2s, retryOn: '5xx,reset,503'}"


def resilient_policy(retries: str = RETRIES) -> str:
    """The seed with outlier detection on its DestinationRule, and a timeout and
    ``retries`` on its route."""
    return SEED_POLICY_YAML.replace(
        "  trafficPolicy:\n",
        "  trafficPolicy:\n"
        "    outlierDetection:\n"
        "      consecutive5xxErrors: 3\n"
        "      consecutiveGatewayErrors: 0\n"
        "      interval: 1m30s\n"
        "      baseEjectionTime: 1.5s\n"
        "      maxEjectionPercent: 50\n"
        "      minHealthPercent: 20\n",
    ).replace(
        "    name: default\n", f"    name: default\n    timeout: 500ms\n    retries: {retries}\n"
    )


def assert_resilient_cluster(cluster: cluster_pb2.Cluster) -> None:
    """``cluster`` ejects as resilient_policy() says, in Istio's translation: each
    consecutive-errors field enforced at 100 % unless 0, success rate never."""
    assert json_format.MessageToDict(cluster.outlier_detection) == {
        "consecutive5xx": 3,
        "enforcingConsecutive5xx": 100,
        "consecutiveGatewayFailure": 0,
        "enforcingConsecutiveGatewayFailure": 0,
        "enforcingSuccessRate": 0,
        "interval": "90s",
        "baseEjectionTime": "1.500s",
        "maxEjectionPercent": 50,
    }
    assert cluster.common_lb_config.healthy_panic_threshold.value == 20


def test_outlier_detection_and_the_panic_threshold_reach_every_cluster() -> None:
    cds = translate_subset(_placement(), parse_policy(resilient_policy()), OPTIONS)[CLUSTER]
    assert sorted(cds) == [REST_CLUSTER, GRPC_CLUSTER]
    for cluster in map(_cluster, cds.values()):
        assert_resilient_cluster(cluster)
        assert cluster.HasField("lb_subset_config")


def test_an_empty_outlier_detection_keeps_envoys_defaults_and_turns_panic_off() -> None:
    text = SEED_POLICY_YAML.replace(
        "  trafficPolicy:\n", "  trafficPolicy:\n    outlierDetection: {}\n"
    )
    cluster = _cluster(
        translate_subset(_placement(), parse_policy(text), OPTIONS)[CLUSTER][GRPC_CLUSTER]
    )
    # consecutive 5xx at Envoy's 5, gateway errors off, 10 s sweeps, 30 s, 10 %: unset
    assert json_format.MessageToDict(cluster.outlier_detection) == {"enforcingSuccessRate": 0}
    # Istio's minHealthPercent 0 must be sent: absent is Envoy's 50 %
    assert cluster.common_lb_config.HasField("healthy_panic_threshold")
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0


def test_without_outlier_detection_no_answer_ejects_a_pod() -> None:
    cds = translate_subset(_placement(), default_policy(), OPTIONS)[CLUSTER]
    for cluster in map(_cluster, cds.values()):
        if cluster.HasField("outlier_detection"):  # else Envoy runs no outlier detection
            od = cluster.outlier_detection
            # Envoy enforces consecutive 5xx and success rate at 100 % unless sent 0
            assert (
                od.HasField("enforcing_consecutive_5xx") and not od.enforcing_consecutive_5xx.value
            )
            assert not od.enforcing_consecutive_gateway_failure.value  # Envoy's default 0
            assert od.HasField("enforcing_success_rate") and not od.enforcing_success_rate.value


def test_timeout_and_retries_reach_the_grpc_and_the_rest_route() -> None:
    resources = translate_subset(_placement(), parse_policy(resilient_policy()), OPTIONS)
    default = _routes(translate_subset(_placement(), default_policy(), OPTIONS))[0].route
    grpc, rest, _ = _routes(resources)
    for route in (grpc.route, rest.route):
        assert route.timeout.ToMilliseconds() == 500
        retry = route.retry_policy
        assert retry.num_retries.value == 3
        assert retry.retry_on == "5xx,reset,retriable-status-codes"
        assert list(retry.retriable_status_codes) == [503]
        assert retry.per_try_timeout.ToMilliseconds() == 2000
        # another pod for each retry, as without the VirtualService's retries
        assert list(retry.retry_host_predicate) == list(default.retry_policy.retry_host_predicate)


def test_without_timeout_and_retries_routes_never_time_out_and_keep_the_default_retries() -> None:
    grpc = _routes(translate_subset(_placement(), default_policy(), OPTIONS))[0].route
    assert grpc.HasField("timeout") and grpc.timeout.ToMilliseconds() == 0  # 0: none
    assert grpc.retry_policy.retry_on == "connect-failure,refused-stream,reset"
    assert grpc.retry_policy.num_retries.value == 4
    assert not grpc.retry_policy.HasField("per_try_timeout")


def test_retries_without_retry_on_keep_the_default_conditions() -> None:
    policy = parse_policy(resilient_policy("{attempts: 5}"))
    grpc = _routes(translate_subset(_placement(), policy, OPTIONS))[0].route
    assert grpc.retry_policy.num_retries.value == 5
    assert grpc.retry_policy.retry_on == "connect-failure,refused-stream,reset"


@pytest.mark.parametrize("retries", ["{attempts: 0}", "{}"])
def test_attempts_0_removes_the_retry_policy(retries: str) -> None:
    resources = translate_subset(_placement(), parse_policy(resilient_policy(retries)), OPTIONS)
    for route in _routes(resources)[:2]:
        assert not route.route.HasField("retry_policy")
        assert route.route.timeout.ToMilliseconds() == 500
