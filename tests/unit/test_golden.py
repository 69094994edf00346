"""Golden files: the whole config each strategy builds, for the policies and placements
that shape it. A change to any of them shows as a reviewable diff:

    UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py && git diff tests/golden

Each is also given to the Envoy the gateways run, in validate mode: Envoy accepts it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from modelxds.kserve import descriptor_set_bytes
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord
from modelxds.placement.model import Placement, build_mesh
from modelxds.policy import parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.ir import Options, RestMode, Strategy
from modelxds.xds.resources import Resources
from modelxds.xds.scale import ScaleStrategy
from modelxds.xds.subset import SubsetStrategy
from tests.static_bootstrap import envoy_refusal, static_bootstrap
from tests.unit.test_translate import (
    KEY,
    NOW,
    OPTIONS,
    resilient_policy,
    several_headers_and_ports,
)
from tests.unit.test_translate import _placement as seed_placement

GOLDEN = Path(__file__).parent.parent / "golden"
STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "subset": SubsetStrategy,
    # 4 shards: a readable file, and the seed's three names land in three of them
    "scale": lambda: ScaleStrategy(shards=4),
}

# A second team's ModelMesh in its own namespace, on its own listener and host.
TEAM_B = "---\n" + SEED_POLICY_YAML.replace(
    "namespace: modelmesh-serving", "namespace: team-b"
).replace("port: 8008", "port: 9008").replace("hosts: ['*']", "hosts: [team-b.example.com]")


def _two_namespaces() -> Placement:
    team_b = build_mesh(
        "team-b",
        registry={"sentiment": ModelRecord(instance_ids={"b-0": NOW - 60_000})},
        vmodels={},
        instances={"b-0": InstanceRecord(start_time=NOW - 86_400_000)},
        litelinks={"b": LitelinksRecord(hostname="100.96.36.10", instance_id="b-0")},
        now_ms=NOW,
    )
    seed = seed_placement()
    return dataclasses.replace(seed, meshes={**seed.meshes, "team-b": team_b})


def _fallback(policy: str) -> str:
    return SEED_POLICY_YAML.replace("fallbackPolicy: ANY_ENDPOINT", f"fallbackPolicy: {policy}")


def _default_subset() -> str:
    return _fallback("DEFAULT_SUBSET").replace(
        "        subsetSelectors:",
        f"        defaultSubset: {{{KEY}: mnist-svm__isvc-6b2eb0b8bf}}\n        subsetSelectors:",
    )


# case -> (policy, placement, options)
CASES: dict[str, tuple[str, Callable[[], Placement], Options]] = {
    "seed": (SEED_POLICY_YAML, seed_placement, OPTIONS),
    "headers-and-ports": (several_headers_and_ports(), seed_placement, OPTIONS),
    "two-namespaces": (SEED_POLICY_YAML + TEAM_B, _two_namespaces, OPTIONS),
    "no-fallback": (_fallback("NO_FALLBACK"), seed_placement, OPTIONS),
    "default-subset": (_default_subset(), seed_placement, OPTIONS),
    "empty-mesh": (SEED_POLICY_YAML, Placement, OPTIONS),
    "rest-transcode": (
        SEED_POLICY_YAML,
        seed_placement,
        dataclasses.replace(OPTIONS, rest=RestMode.TRANSCODE),
    ),
    # outlierDetection, timeout and retries, every field set
    "resilience": (resilient_policy(), seed_placement, OPTIONS),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", list(CASES))
def test_golden(case: str, strategy: str) -> None:
    policy, placement, options = CASES[case]
    resources = STRATEGIES[strategy]()(placement(), parse_policy(policy), options)
    path = GOLDEN / f"{case}-{strategy}.json"
    got = json.dumps(_dump(resources), indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(got)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 and review the diff"
    assert got == path.read_text(), f"{path.name} differs: UPDATE_GOLDEN=1 after reviewing"


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", list(CASES))
def test_envoy_accepts_the_config(case: str, strategy: str, tmp_path: Path) -> None:
    policy, placement, options = CASES[case]
    resources = STRATEGIES[strategy]()(placement(), parse_policy(policy), options)
    refusal = envoy_refusal(static_bootstrap(resources), tmp_path)
    assert refusal is None, refusal


def _dump(resources: Resources) -> dict[str, Any]:
    descriptor = base64.b64encode(descriptor_set_bytes()).decode()
    out: dict[str, Any] = {}
    for type_url, by_name in resources.items():
        docs = {}
        for name, msg in sorted(by_name.items()):
            doc = json_format.MessageToDict(msg, preserving_proto_field_name=True)
            # the descriptor is 20 KB of bytes with its own golden test (test_kserve_proto)
            docs[name] = json.loads(json.dumps(doc).replace(descriptor, "<kserve-v2>"))
        out[type_url.rsplit(".", 1)[-1]] = docs
    return out
