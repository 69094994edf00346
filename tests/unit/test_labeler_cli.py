"""`modelxds label`'s flags, as the Kubernetes manifests set them (flags or MODELXDS_* env)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelxds.cli import _layouts, build_parser
from modelxds.labeler.labels import LabelerConfigError
from modelxds.labeler.run import targets
from modelxds.labeler.sync import Target


def test_the_defaults() -> None:
    args = build_parser().parse_args(["label"])
    assert args.max_model_labels == 200
    assert args.patch_interval_ms == 1000
    assert args.leader_elect is True
    assert args.lease_name == "modelxds-labeler"
    assert args.lease_namespace is None
    assert args.metrics_address == "127.0.0.1:9092"
    assert args.kubeconfig is None
    assert targets(args, _layouts(args)) == [
        Target("modelmesh-serving", "modelmesh-serving", "modelmesh.asm.alibabacloud.com")
    ]


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELXDS_LEADER_ELECT", "false")
    monkeypatch.setenv("MODELXDS_MAX_MODEL_LABELS", "50")
    args = build_parser().parse_args(
        ["label", "--lease-namespace", "mm", "--patch-interval-ms", "250"]
    )
    assert (args.leader_elect, args.max_model_labels) == (False, 50)
    assert (args.lease_namespace, args.patch_interval_ms) == ("mm", 250)
    assert build_parser().parse_args(["label", "--leader-elect"]).leader_elect is True
    monkeypatch.delenv("MODELXDS_LEADER_ELECT")
    assert build_parser().parse_args(["label", "--no-leader-elect"]).leader_elect is False


def test_each_namespace_takes_the_key_of_its_own_destination_rule(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    rule = """apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: modelmesh-serving, namespace: {ns}}}
spec:
  host: modelmesh-serving
  trafficPolicy:
    loadBalancer:
      dynamicSubset:
        subsetSelectors:
        - keys: [{key}]
"""
    policy.write_text(
        rule.format(ns="team-a", key="a.example.com")
        + "---\n"
        + rule.format(ns="team-b", key="b.example.com")
    )
    args = build_parser().parse_args(
        [
            "label",
            "--policy",
            str(policy),
            "--root-prefix",
            "mm/mm_ns/team-a",
            "--root-prefix",
            "mm/mm_ns/team-b",
        ]
    )
    assert [(t.namespace, t.key) for t in targets(args, _layouts(args))] == [
        ("team-a", "a.example.com"),
        ("team-b", "b.example.com"),
    ]
    args = build_parser().parse_args(
        ["label", "--policy", str(policy), "--root-prefix", "mm/mm_ns/team-c"]
    )
    with pytest.raises(LabelerConfigError, match=r"namespace team-c.*2 subset keys"):
        targets(args, _layouts(args))
