"""Both translators' configs have no dangling references; one that has is named exactly."""

from __future__ import annotations

import dataclasses

import pytest
from envoy.config.route.v3 import route_components_pb2, route_pb2

from modelxds.placement.model import Placement
from modelxds.policy import parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.ir import RestMode
from modelxds.xds.references import ReferenceCheck
from modelxds.xds.resources import ENDPOINT, ROUTE
from modelxds.xds.scale import ScaleStrategy, translate_scale
from modelxds.xds.subset import translate_subset
from tests.unit.test_translate import OPTIONS, several_headers_and_ports
from tests.unit.test_translate import _placement as seed_placement

POLICIES = {
    "seed": SEED_POLICY_YAML,
    "several headers and ports": several_headers_and_ports(),
    "no fallback": SEED_POLICY_YAML.replace("ANY_ENDPOINT", "NO_FALLBACK"),
}


@pytest.mark.parametrize("translator", [translate_subset, translate_scale])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("rest", list(RestMode))
@pytest.mark.parametrize("empty", [False, True])
def test_every_translated_config_is_consistent(
    translator: object, policy: str, rest: RestMode, empty: bool
) -> None:
    placement = Placement() if empty else seed_placement()
    options = dataclasses.replace(OPTIONS, rest=rest)
    resources = translator(placement, parse_policy(POLICIES[policy]), options)  # type: ignore[operator]
    assert ReferenceCheck().problems(resources) == []


def test_each_dangling_reference_is_named() -> None:
    resources = {
        k: dict(v)
        for k, v in ScaleStrategy(shards=4)(
            seed_placement(), parse_policy(SEED_POLICY_YAML), OPTIONS
        ).items()
    }
    table = route_pb2.RouteConfiguration()
    table.CopyFrom(resources[ROUTE]["8008/1"])
    table.virtual_hosts[0].matcher.on_no_match.action.typed_config.Pack(
        route_components_pb2.Route(route=route_components_pb2.RouteAction(cluster="pod-gone"))
    )
    resources[ROUTE]["8008/1"] = table
    del resources[ROUTE]["8008/rest/2"]
    del resources[ENDPOINT]["outbound|8033||modelmesh-serving.modelmesh-serving.svc.cluster.local"]
    assert sorted(ReferenceCheck().problems(resources)) == [
        "cluster outbound|8033||modelmesh-serving.modelmesh-serving.svc.cluster.local takes "
        "endpoints outbound|8033||modelmesh-serving.modelmesh-serving.svc.cluster.local, "
        "which EDS lacks",
        "route table 8008/1 names cluster pod-gone, which CDS lacks",
        "scope 8008/rest/2 names route table 8008/rest/2, which RDS lacks",
    ]
