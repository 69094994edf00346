"""Translator: golden files for the seed policy, and the policy knobs that shape the config."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from modelxds.kserve import descriptor_set_bytes
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.model import ROUTE_BUCKETS, Placement, build_mesh
from modelxds.policy import default_policy, parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources
from modelxds.xds.translate import Options, translate

GOLDEN = Path(__file__).parent.parent / "golden"
NOW = 1_715_003_600_000
OPTIONS = Options(descriptor_set=descriptor_set_bytes())
KEY = "modelmesh.asm.alibabacloud.com"


def _placement(
    buckets: int = ROUTE_BUCKETS, registry: dict[str, ModelRecord] | None = None
) -> Placement:
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
        buckets=buckets,
    )
    return Placement({"modelmesh-serving": mesh}, revision=42)


def _cla(msg: Message) -> endpoint_pb2.ClusterLoadAssignment:
    assert isinstance(msg, endpoint_pb2.ClusterLoadAssignment)
    return msg


def _cluster(msg: Message) -> cluster_pb2.Cluster:
    assert isinstance(msg, cluster_pb2.Cluster)
    return msg


def _dump(resources: Resources) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for type_url, by_name in resources.items():
        docs = {}
        for name, msg in sorted(by_name.items()):
            doc = json_format.MessageToDict(msg, preserving_proto_field_name=True)
            docs[name] = json.loads(
                # the descriptor is 20 KB of bytes with its own golden test (test_kserve_proto)
                json.dumps(doc).replace(
                    base64.b64encode(descriptor_set_bytes()).decode(), "<kserve-v2>"
                )
            )
        out[type_url.rsplit(".", 1)[-1]] = docs
    return out


def _check_golden(name: str, resources: Resources) -> None:
    path = GOLDEN / name
    got = json.dumps(_dump(resources), indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(got)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 and review the diff"
    assert got == path.read_text(), f"{name} differs: UPDATE_GOLDEN=1 after reviewing"


def test_seed_policy_golden() -> None:
    _check_golden("seed_subset.json", translate(_placement(), default_policy(), OPTIONS))


def test_translation_is_deterministic() -> None:
    a = translate(_placement(), default_policy(), OPTIONS)
    b = translate(_placement(), default_policy(), OPTIONS)
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        assert {n: m.SerializeToString(deterministic=True) for n, m in a[t].items()} == {
            n: m.SerializeToString(deterministic=True) for n, m in b[t].items()
        }


def test_endpoint_metadata_lists_routable_models_and_vmodels() -> None:
    eds = translate(_placement(), default_policy(), OPTIONS)[ENDPOINT]
    (cla,) = map(_cla, eds.values())
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
    assert ports == {8033}


@pytest.mark.parametrize(
    ("policy", "cluster_fallback"),
    [("ANY_ENDPOINT", "ANY_ENDPOINT"), ("NO_FALLBACK", "NO_FALLBACK")],
)
def test_fallback_policy_reaches_the_cluster(policy: str, cluster_fallback: str) -> None:
    text = SEED_POLICY_YAML.replace("fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {policy}")
    cds = translate(_placement(), parse_policy(text), OPTIONS)[CLUSTER]
    (cluster,) = map(_cluster, cds.values())
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
    (cluster,) = map(
        _cluster, translate(_placement(), parse_policy(text), OPTIONS)[CLUSTER].values()
    )
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
    resources = translate(_placement(), parse_policy(several_headers_and_ports()), OPTIONS)
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
    resources = translate(_placement(), parse_policy(text), OPTIONS)
    (name,) = resources[CLUSTER]
    assert name == "outbound|8033||modelmesh-serving.team-b.svc.cluster.local"
    assert list(_cla(resources[ENDPOINT][name]).endpoints[0].lb_endpoints) == []
