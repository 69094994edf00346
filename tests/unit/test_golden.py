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
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from modelxds.kserve import descriptor_set_bytes
from modelxds.localmesh import processes
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord
from modelxds.placement.model import Placement, build_mesh
from modelxds.policy import parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.builders import http_filter
from modelxds.xds.ir import Options, RestMode, Strategy
from modelxds.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources
from modelxds.xds.scale import ScaleStrategy
from modelxds.xds.subset import SubsetStrategy
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
    config = tmp_path / "envoy.json"
    config.write_text(json_format.MessageToJson(_static_bootstrap(resources)))
    check = subprocess.run(
        [processes.binary("envoy"), "--mode", "validate", "--disable-hot-restart", "-c", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def _static_bootstrap(resources: Resources) -> bootstrap_pb2.Bootstrap:
    """``resources`` as static config Envoy validates whole: EDS clusters with their
    endpoints inline, the listeners as they are (their routes over ADS, which validation
    does not fetch), and each route table inline in a listener of its own."""
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = boot.node.cluster = "validate"
    ads = boot.dynamic_resources.ads_config
    ads.api_type = config_source_pb2.ApiConfigSource.GRPC
    ads.transport_api_version = config_source_pb2.V3
    ads.grpc_services.add().envoy_grpc.cluster_name = "xds"
    static = boot.static_resources
    static.clusters.add().CopyFrom(_static_cluster("xds", ("127.0.0.1", 18000)))
    for name, msg in sorted(resources[CLUSTER].items()):
        cluster = static.clusters.add()
        cluster.CopyFrom(msg)
        if cluster.type == cluster_pb2.Cluster.EDS:
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.ClearField("eds_cluster_config")
            cluster.load_assignment.CopyFrom(resources[ENDPOINT][name])
    for msg in resources[LISTENER].values():
        static.listeners.add().CopyFrom(msg)
    for i, (name, table) in enumerate(sorted(resources[ROUTE].items())):
        assert isinstance(table, route_pb2.RouteConfiguration)
        hcm = hcm_pb2.HttpConnectionManager(
            stat_prefix=f"table_{i}",
            route_config=table,
            http_filters=[http_filter("envoy.filters.http.router", router_pb2.Router())],
        )
        listener = static.listeners.add(name=f"table {name}")
        listener.address.socket_address.address = "127.0.0.1"
        listener.address.socket_address.port_value = 20000 + i
        listener.filter_chains.add().filters.add(
            name="envoy.filters.network.http_connection_manager"
        ).typed_config.Pack(hcm)
    return boot


def _static_cluster(name: str, address: tuple[str, int]) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    cluster.load_assignment.cluster_name = name
    endpoint = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint
    endpoint.address.socket_address.address, endpoint.address.socket_address.port_value = address
    return cluster


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
