from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelxds.policy import (
    DestinationRule,
    FallbackPolicy,
    HeaderToKey,
    HttpRoute,
    Policy,
    PolicyError,
    SubsetSelector,
    VirtualService,
    default_policy,
    load_policy,
    parse_policy,
)
from modelxds.policy.model import HttpRetry, OutlierDetection
from modelxds.policy.seed import SEED_POLICY_YAML

KEY = "modelmesh.asm.alibabacloud.com"
NS = "modelmesh-serving"
DR_AT = "policy.yaml document 1 (DestinationRule modelmesh-serving/modelmesh-serving)"
VS_AT = "policy.yaml document 2 (VirtualService modelmesh-serving/vs-modelmesh-serving-service)"
DYNAMIC = "spec.trafficPolicy.loadBalancer.dynamicSubset"

Doc = dict[str, Any]


def seed_docs() -> list[Doc]:
    """A fresh, mutable copy of the seed: [DestinationRule, VirtualService]."""
    return list(yaml.safe_load_all(SEED_POLICY_YAML))


def dump(docs: list[Doc]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def errors_of(text: str, source: str = "policy.yaml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def dynamic(docs: list[Doc]) -> Doc:
    result: Doc = docs[0]["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]
    return result


def http(docs: list[Doc]) -> Doc:
    result: Doc = docs[1]["spec"]["http"][0]
    return result


def test_seed_parses_to_exact_objects() -> None:
    expected = Policy(
        destination_rules=(
            DestinationRule(
                name="modelmesh-serving",
                namespace=NS,
                host="modelmesh-serving",
                selectors=(SubsetSelector((KEY,), FallbackPolicy.ANY_ENDPOINT),),
                fallback_policy=FallbackPolicy.ANY_ENDPOINT,
                default_subset=(),
                source="<built-in seed policy>#1",
            ),
        ),
        virtual_services=(
            VirtualService(
                name="vs-modelmesh-serving-service",
                namespace=NS,
                gateways=("grpc-gateway",),
                hosts=("*",),
                routes=(
                    HttpRoute(
                        name="default",
                        ports=(8008,),
                        header_keys=(HeaderToKey("model", KEY),),
                        destination_host="modelmesh-serving",
                        destination_port=8033,
                    ),
                ),
                source="<built-in seed policy>#2",
            ),
        ),
    )
    assert default_policy() == expected
    assert default_policy().ports() == (8008,)
    assert default_policy().destination_rules[0].subset_keys == (KEY,)


def test_source_names_file_and_document() -> None:
    policy = parse_policy("---\n" + SEED_POLICY_YAML, "conf/p.yaml")
    assert policy.destination_rules[0].source == "conf/p.yaml#1"
    assert policy.virtual_services[0].source == "conf/p.yaml#2"


def test_empty_documents_are_skipped_but_counted() -> None:
    docs = seed_docs()
    text = "---\n---\n" + dump(docs[:1]) + "---\n---\n" + dump(docs[1:])
    policy = parse_policy(text, "p.yaml")
    assert policy.destination_rules[0].source == "p.yaml#2"
    assert policy.virtual_services[0].source == "p.yaml#4"


def test_load_single_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(SEED_POLICY_YAML)
    policy = load_policy(path)
    assert policy.virtual_services[0].source == f"{path}#2"
    assert policy.destination_rules[0].host == "modelmesh-serving"
    assert load_policy(str(path)) == policy


def test_load_directory_reads_policy_files_in_name_order(tmp_path: Path) -> None:
    dr, vs = seed_docs()
    other_vs = json.loads(json.dumps(vs))
    other_vs["metadata"]["name"] = "vs-other"
    other_vs["spec"]["http"][0]["match"] = [{"port": 9000}]
    # The VirtualService comes first by name; the DestinationRule in a later file still counts.
    (tmp_path / "a-vs.yml").write_text(yaml.safe_dump(vs))
    (tmp_path / "b-dr.YAML").write_text(yaml.safe_dump(dr))
    (tmp_path / "c-vs.json").write_text(json.dumps(other_vs))
    (tmp_path / "notes.txt").write_text("not: [valid")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "broken.yaml").write_text("not: [valid")

    policy = load_policy(tmp_path)

    assert [d.source for d in policy.destination_rules] == [f"{tmp_path / 'b-dr.YAML'}#1"]
    assert [v.name for v in policy.virtual_services] == ["vs-modelmesh-serving-service", "vs-other"]
    assert policy.virtual_services[1].source == f"{tmp_path / 'c-vs.json'}#1"
    assert policy.ports() == (8008, 9000)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file or directory") as info:
        load_policy(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(info.value)


def test_directory_without_policy_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("hi")
    with pytest.raises(PolicyError, match=r"no \*\.yaml, \*\.yml or \*\.json files"):
        load_policy(tmp_path)


def test_invalid_yaml_names_file_document_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(SEED_POLICY_YAML + "---\nkind: [VirtualService\nspec: {}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    [error] = info.value.errors
    assert error.startswith(f"{path} document 3: invalid YAML at line 32, column 5")


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{\n  "kind": "DestinationRule",\n  oops\n}')
    with pytest.raises(PolicyError, match=r"policy\.json document 1: invalid JSON at line 3"):
        load_policy(path)


def test_port_error_message_format() -> None:
    docs = seed_docs()
    http(docs)["route"][0]["destination"]["port"]["number"] = "abc"
    assert errors_of(dump(docs)) == [
        f"{VS_AT}: spec.http[0].route[0].destination.port.number: "
        "expected an integer 1-65535, got 'abc'"
    ]


def _set(path: list[Any], value: Any) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        node: Any = docs
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        node: Any = docs
        for step in path[:-1]:
            node = node[step]
        del node[path[-1]]

    return mutate


_SELECTOR = [0, "spec", "trafficPolicy", "loadBalancer", "dynamicSubset", "subsetSelectors", 0]
_HTTP = [1, "spec", "http", 0]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            _delete([*_SELECTOR, "keys"]),
            f"{DR_AT}: {DYNAMIC}.subsetSelectors[0].keys: required",
            id="missing-keys",
        ),
        pytest.param(
            _set([*_SELECTOR, "keys"], []),
            f"{DR_AT}: {DYNAMIC}.subsetSelectors[0].keys: required",
            id="empty-keys",
        ),
        pytest.param(
            _set([*_SELECTOR, "keys"], KEY),
            f"{DR_AT}: {DYNAMIC}.subsetSelectors[0].keys: expected a list, got '{KEY}'",
            id="keys-not-a-list",
        ),
        pytest.param(
            _set([*_SELECTOR, "keys"], [KEY, ""]),
            f"{DR_AT}: {DYNAMIC}.subsetSelectors[0].keys[1]: expected a non-empty string",
            id="empty-key",
        ),
        pytest.param(
            _set([*_SELECTOR, "fallbackPolicy"], "SOMETIMES"),
            f"{DR_AT}: {DYNAMIC}.subsetSelectors[0].fallbackPolicy: "
            "expected one of ANY_ENDPOINT, NO_FALLBACK, DEFAULT_SUBSET, got 'SOMETIMES'",
            id="unknown-fallback",
        ),
        pytest.param(
            _set([*_SELECTOR, "fallbackPolicy"], "DEFAULT_SUBSET"),
            f"{DR_AT}: {DYNAMIC}.subsetSelectors[0].fallbackPolicy: "
            f"DEFAULT_SUBSET needs a non-empty {DYNAMIC}.defaultSubset",
            id="default-subset-without-defaults",
        ),
        pytest.param(
            _set(
                [0, "spec", "trafficPolicy", "loadBalancer", "dynamicSubset", "subsetSelectors"], []
            ),
            f"{DR_AT}: {DYNAMIC}.subsetSelectors: required",
            id="no-selectors",
        ),
        pytest.param(
            _set([0, "spec", "host"], 5),
            f"{DR_AT}: spec.host: expected a non-empty string, got 5",
            id="host-not-a-string",
        ),
        pytest.param(
            _set([0, "spec", "trafficPolicy"], ["x"]),
            f"{DR_AT}: spec.trafficPolicy: expected a mapping, got a list",
            id="traffic-policy-not-a-mapping",
        ),
        pytest.param(
            _delete([0, "metadata", "name"]),
            "policy.yaml document 1 (DestinationRule): metadata.name: required",
            id="missing-name",
        ),
        pytest.param(
            _set([0, "apiVersion"], "networking.istio.io/v2"),
            f"{DR_AT}: apiVersion: expected one of networking.istio.io/v1alpha3",
            id="bad-api-version",
        ),
        pytest.param(
            _delete([0, "kind"]),
            "policy.yaml document 1: kind: required",
            id="missing-kind",
        ),
        pytest.param(
            _set([*_HTTP, "match", 0, "port"], 70000),
            f"{VS_AT}: spec.http[0].match[0].port: expected an integer 1-65535, got 70000",
            id="port-out-of-range",
        ),
        pytest.param(
            _set([*_HTTP, "match"], [{"uri": {"prefix": "/"}}]),
            f"{VS_AT}: spec.http[0].match[0].port: required: modelxds opens one Envoy listener",
            id="match-without-port",
        ),
        pytest.param(
            _delete([*_HTTP, "match"]),
            f"{VS_AT}: spec.http[0].match: required",
            id="no-match",
        ),
        pytest.param(
            _set([*_HTTP, "route"], [{"destination": {"host": "a"}}] * 2),
            f"{VS_AT}: spec.http[0].route: 2 destinations (weighted routing) are not supported",
            id="weighted-routes",
        ),
        pytest.param(
            _delete([*_HTTP, "route", 0, "destination", "host"]),
            f"{VS_AT}: spec.http[0].route[0].destination.host: required",
            id="destination-without-host",
        ),
        pytest.param(
            _set([*_HTTP, "route", 0, "destination", "subset"], "v1"),
            f"{VS_AT}: spec.http[0].route[0].destination.subset: named subsets are not supported",
            id="named-subset",
        ),
        pytest.param(
            _delete([*_HTTP, "headerToDynamicSubsetKey", 0, "header"]),
            f"{VS_AT}: spec.http[0].headerToDynamicSubsetKey[0].header: required",
            id="header-missing",
        ),
        pytest.param(
            _delete([1, "spec", "http"]),
            f"{VS_AT}: spec.http: required",
            id="no-http",
        ),
    ],
)
def test_field_errors_name_document_and_path(
    mutate: Callable[[list[Doc]], None], expected: str
) -> None:
    docs = seed_docs()
    mutate(docs)
    errors = errors_of(dump(docs))
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_are_reported_at_once() -> None:
    docs = seed_docs()
    dynamic(docs)["subsetSelectors"][0]["fallbackPolicy"] = "NEVER"
    http(docs)["match"][0]["port"] = "8008"
    http(docs)["route"][0]["destination"]["port"]["number"] = 0
    errors = errors_of(dump(docs))
    assert [e.split(": ")[1] for e in errors] == [
        f"{DYNAMIC}.subsetSelectors[0].fallbackPolicy",
        "spec.http[0].match[0].port",
        "spec.http[0].route[0].destination.port.number",
    ]
    assert errors[0].startswith(DR_AT)
    assert errors[1].startswith(VS_AT)


def test_default_subset_and_no_fallback_parse() -> None:
    docs = seed_docs()
    dynamic(docs).update(
        fallbackPolicy="DEFAULT_SUBSET",
        defaultSubset={"tier": "cold", "pool": "b"},
        subsetSelectors=[
            {"keys": [KEY], "fallbackPolicy": "NO_FALLBACK"},
            {"keys": [KEY, "tier"]},
        ],
    )
    rule = parse_policy(dump(docs)).destination_rules[0]
    assert rule.fallback_policy is FallbackPolicy.DEFAULT_SUBSET
    assert rule.default_subset == (("pool", "b"), ("tier", "cold"))
    assert rule.selectors == (
        SubsetSelector((KEY,), FallbackPolicy.NO_FALLBACK),
        SubsetSelector((KEY, "tier"), FallbackPolicy.DEFAULT_SUBSET),
    )
    assert rule.subset_keys == (KEY, "tier")


def test_cluster_fallback_comes_from_first_selector_when_not_given() -> None:
    docs = seed_docs()
    dynamic(docs)["subsetSelectors"] = [
        {"keys": [KEY], "fallbackPolicy": "NO_FALLBACK"},
        {"keys": ["b"]},
    ]
    rule = parse_policy(dump(docs)).destination_rules[0]
    assert rule.fallback_policy is FallbackPolicy.NO_FALLBACK
    assert rule.selectors[1].fallback_policy is FallbackPolicy.NO_FALLBACK


def test_cluster_fallback_defaults_to_any_endpoint() -> None:
    docs = seed_docs()
    dynamic(docs)["subsetSelectors"] = [{"keys": [KEY]}]
    rule = parse_policy(dump(docs)).destination_rules[0]
    assert rule.fallback_policy is FallbackPolicy.ANY_ENDPOINT
    assert rule.selectors[0].fallback_policy is FallbackPolicy.ANY_ENDPOINT


def test_default_subset_values_must_be_strings() -> None:
    docs = seed_docs()
    dynamic(docs)["defaultSubset"] = {"version": 1}
    errors = errors_of(dump(docs))
    assert errors == [
        f"{DR_AT}: {DYNAMIC}.defaultSubset.version: expected a string (quote it), got 1"
    ]


def test_several_header_keys_and_header_names_are_lowercased() -> None:
    docs = seed_docs()
    dynamic(docs)["subsetSelectors"] = [{"keys": [KEY, "version"]}]
    http(docs)["headerToDynamicSubsetKey"] = [
        {"header": "Model", "key": KEY},
        {"header": "X-Model-Version", "key": "version"},
    ]
    route = parse_policy(dump(docs)).virtual_services[0].routes[0]
    assert route.header_keys == (
        HeaderToKey("model", KEY),
        HeaderToKey("x-model-version", "version"),
    )


def test_header_key_must_be_a_subset_key_of_the_destination_rule() -> None:
    docs = seed_docs()
    http(docs)["headerToDynamicSubsetKey"].append({"header": "version", "key": "version"})
    assert errors_of(dump(docs)) == [
        f"{VS_AT}: spec.http[0].headerToDynamicSubsetKey[1].key: 'version' is not a subset key "
        "of the DestinationRule for modelmesh-serving.modelmesh-serving.svc.cluster.local "
        f"({DR_AT}); its keys: {KEY}"
    ]


def test_ports_are_sorted_and_deduplicated() -> None:
    docs = seed_docs()
    http(docs)["match"] = [{"port": 9000}, {"port": 8008}, {"port": 9000}]
    policy = parse_policy(dump(docs))
    assert policy.virtual_services[0].routes[0].ports == (8008, 9000)
    assert policy.ports() == (8008, 9000)


def test_other_kinds_are_errors_and_a_typo_gets_a_hint() -> None:
    gateway = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "Gateway",
        "metadata": {"name": "grpc-gateway", "namespace": NS},
        "spec": {"servers": [{"port": {"number": 8008, "protocol": "GRPC"}}]},
    }
    dr, vs = seed_docs()
    vs["kind"] = "VirtualSevice"  # skipped, it would have left a policy without routes
    first, second = errors_of(dump([gateway, dr, vs]), "all.yaml")
    assert first.startswith("all.yaml document 1: kind: 'Gateway' is not a DestinationRule")
    assert second.startswith("all.yaml document 3: kind: 'VirtualSevice'")
    assert second.endswith("(did you mean VirtualService?)")


def test_a_kubectl_list_is_read_item_by_item() -> None:
    dr, vs = seed_docs()
    listed = {"apiVersion": "v1", "kind": "List", "items": [dr, vs]}
    policy = parse_policy(dump([listed]), "list.yaml")
    assert [r.source for r in policy.destination_rules] == ["list.yaml#1 item 0"]
    assert [v.source for v in policy.virtual_services] == ["list.yaml#1 item 1"]
    seed = parse_policy(SEED_POLICY_YAML)
    assert [v.routes for v in policy.virtual_services] == [v.routes for v in seed.virtual_services]
    vs["spec"]["http"][0]["match"][0]["port"] = "8008"
    (error,) = errors_of(dump([{"kind": "List", "items": [dr, vs]}]), "list.yaml")
    assert error.startswith("list.yaml document 1 item 1 (VirtualService")


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n---\n"])
def test_a_policy_that_would_remove_every_listener_is_refused(text: str) -> None:
    (error,) = errors_of(text)
    assert "every gateway listener would be removed" in error
    assert "--allow-empty-policy" in error
    assert parse_policy(text, allow_empty=True).ports() == ()


def test_a_route_must_name_its_model_key() -> None:
    docs = seed_docs()
    del http(docs)["headerToDynamicSubsetKey"]  # used to pass, then crash the translator
    (error,) = errors_of(dump(docs))
    assert error.startswith(f"{VS_AT}: spec.http[0].headerToDynamicSubsetKey: required")


def test_two_routes_to_one_service_must_map_the_same_model_keys() -> None:
    dr, vs = seed_docs()
    dr["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]["subsetSelectors"].append(
        {"keys": ["alias"]}
    )
    other = json.loads(json.dumps(vs))
    other["metadata"]["name"] = "vs-b"
    other["spec"]["http"][0]["match"][0]["port"] = 9008
    other["spec"]["http"][0]["headerToDynamicSubsetKey"][0]["key"] = "alias"
    (error,) = errors_of(dump([dr, vs, other]))
    assert "document 3 (VirtualService modelmesh-serving/vs-b)" in error
    assert "its pods carry one set of model keys" in error


def test_unused_istio_fields_are_tolerated() -> None:
    docs = seed_docs()
    docs[0]["spec"]["trafficPolicy"]["loadBalancer"]["simple"] = "ROUND_ROBIN"
    docs[0]["spec"]["trafficPolicy"]["connectionPool"] = {"http": {"http2MaxRequests": 10}}
    docs[0]["spec"]["exportTo"] = ["."]
    http(docs)["route"][0]["weight"] = 100
    http(docs)["mirrorPercentage"] = {"value": 1.0}
    assert parse_policy(dump(docs)) == parse_policy(SEED_POLICY_YAML)


def test_modelxds_crd_group_and_default_namespace() -> None:
    docs = seed_docs()
    for doc in docs:
        doc["apiVersion"] = "modelxds.io/v1alpha1"
        del doc["metadata"]["namespace"]
    policy = parse_policy(dump(docs))
    assert policy.destination_rules[0].namespace == "default"
    assert policy.virtual_services[0].namespace == "default"


def test_route_name_is_optional() -> None:
    docs = seed_docs()
    del http(docs)["name"]
    assert parse_policy(dump(docs)).virtual_services[0].routes[0].name == "http-0"


def test_destination_port_is_optional() -> None:
    docs = seed_docs()
    del http(docs)["route"][0]["destination"]["port"]
    assert parse_policy(dump(docs)).virtual_services[0].routes[0].destination_port is None


@pytest.mark.parametrize(
    "host",
    [
        "modelmesh-serving",
        "modelmesh-serving.modelmesh-serving",
        "modelmesh-serving.modelmesh-serving.svc",
        "modelmesh-serving.modelmesh-serving.svc.cluster.local",
    ],
)
def test_host_resolution_matches_istio_short_names(host: str) -> None:
    policy = default_policy()
    rule = policy.destination_rules[0]
    assert policy.destination_rule_for(host, NS) == rule
    assert policy.destination_rule_for(host.upper() + ".", NS) == rule

    docs = seed_docs()
    http(docs)["route"][0]["destination"]["host"] = host
    assert parse_policy(dump(docs)).virtual_services[0].routes[0].destination_host == host


def test_short_host_is_relative_to_the_asking_namespace() -> None:
    policy = default_policy()
    assert policy.destination_rule_for("modelmesh-serving", "other") is None
    assert policy.destination_rule_for("modelmesh-serving.modelmesh-serving", "other") is not None
    assert policy.destination_rule_for("modelmesh-serving.other.svc.cluster.local", NS) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("namespace", "team.a"),  # would read as service "team" in namespace "a"
        ("namespace", "Team-A"),
        ("namespace", "a" * 64),
        ("name", "vs_modelmesh"),
        ("name", "-vs"),
    ],
)
def test_a_name_or_namespace_kubernetes_would_refuse_is_refused(field: str, value: str) -> None:
    docs = seed_docs()
    docs[1]["metadata"][field] = value
    errors = errors_of(dump(docs))
    assert any(f"metadata.{field}: {value!r} is not" in e for e in errors), errors


def test_destination_rule_in_another_namespace_does_not_match() -> None:
    docs = seed_docs()
    docs[0]["metadata"]["namespace"] = "elsewhere"
    [error] = errors_of(dump(docs))
    assert error == (
        f"{VS_AT}: spec.http[0].route[0].destination.host: no DestinationRule for "
        "'modelmesh-serving' (modelmesh-serving.modelmesh-serving.svc.cluster.local); "
        f"add one with {DYNAMIC}"
    )


def test_destination_rule_in_another_namespace_matches_when_fully_qualified() -> None:
    docs = seed_docs()
    docs[0]["metadata"]["namespace"] = "elsewhere"
    docs[0]["spec"]["host"] = "modelmesh-serving.modelmesh-serving.svc.cluster.local"
    policy = parse_policy(dump(docs))
    assert policy.destination_rule_for("modelmesh-serving", NS) == policy.destination_rules[0]


def test_destination_rule_without_dynamic_subset_cannot_be_routed_to() -> None:
    docs = seed_docs()
    del docs[0]["spec"]["trafficPolicy"]
    [error] = errors_of(dump(docs))
    assert error.startswith(f"{VS_AT}: spec.http[0].route[0].destination.host: ")
    assert f"({DR_AT}) has no {DYNAMIC}" in error


def test_destination_rule_without_dynamic_subset_is_fine_on_its_own() -> None:
    docs = seed_docs()
    del docs[0]["spec"]["trafficPolicy"]
    rule = parse_policy(dump(docs[:1]), allow_empty=True).destination_rules[0]
    assert rule.selectors == ()
    assert rule.subset_keys == ()


def test_two_virtual_services_on_one_port_need_the_same_destination() -> None:
    dr, vs = seed_docs()
    other = json.loads(json.dumps(vs))
    other["metadata"]["name"] = "vs-b"
    other["spec"]["http"][0]["route"][0]["destination"]["port"]["number"] = 9999
    same = json.loads(json.dumps(vs))
    same["metadata"]["name"] = "vs-c"
    same["spec"]["hosts"] = ["models.example.com"]  # would have overwritten vs's route table
    error, same_error = errors_of(dump([dr, vs, other, same]))
    assert error.startswith(
        "policy.yaml document 3 (VirtualService modelmesh-serving/vs-b): spec.http[0].match: "
        "port 8008 is already routed to modelmesh-serving.modelmesh-serving.svc.cluster.local:8033"
        f" by {VS_AT}: spec.http[0]"
    )
    assert same_error.startswith("policy.yaml document 4 (VirtualService modelmesh-serving/vs-c)")
    assert "one listener port takes the hosts of one VirtualService" in same_error


def test_duplicate_objects_are_errors() -> None:
    dr, vs = seed_docs()
    [error] = errors_of(dump([dr, vs, dr]))
    assert error == (
        "policy.yaml document 3 (DestinationRule modelmesh-serving/modelmesh-serving): "
        f"metadata.name: duplicate DestinationRule modelmesh-serving/modelmesh-serving, "
        f"first defined in {DR_AT}"
    )


def test_two_rules_for_one_host_are_an_error() -> None:
    dr, vs = seed_docs()
    twin = json.loads(json.dumps(dr))
    twin["metadata"]["name"] = "twin"
    twin["spec"]["host"] = "modelmesh-serving.modelmesh-serving.svc"
    [error] = errors_of(dump([dr, vs, twin]))
    assert error.startswith("policy.yaml document 3 (DestinationRule modelmesh-serving/twin): ")
    assert "already has a DestinationRule" in error


def test_cross_checks_wait_for_a_readable_destination_rule() -> None:
    # A VirtualService pointing at a broken rule must not also report "no DestinationRule".
    docs = seed_docs()
    dynamic(docs)["subsetSelectors"][0]["keys"] = []
    [error] = errors_of(dump(docs))
    assert error.startswith(f"{DR_AT}: {DYNAMIC}.subsetSelectors[0].keys")


def test_policy_error_is_a_value_error_listing_every_problem() -> None:
    error = PolicyError(["a: one", "b: two"])
    assert isinstance(error, ValueError)
    assert error.errors == ["a: one", "b: two"]
    assert str(error) == "a: one\nb: two"


# --- outlierDetection, timeout and retries: Istio's fields, read as Istio reads them -----

OUTLIER = "spec.trafficPolicy.outlierDetection"


def outlier(docs: list[Doc]) -> Doc:
    """The DestinationRule's outlierDetection, created empty."""
    result: Doc = docs[0]["spec"]["trafficPolicy"].setdefault("outlierDetection", {})
    return result


def test_outlier_detection_timeout_and_retries_read_into_exact_values() -> None:
    docs = seed_docs()
    outlier(docs).update(
        consecutive5xxErrors=3,
        consecutiveGatewayErrors=0,
        interval="1m30s",
        baseEjectionTime="1.5s",
        maxEjectionPercent=50,
        minHealthPercent=20,
    )
    http(docs)["timeout"] = "500ms"
    http(docs)["retries"] = {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,503,reset"}
    policy = parse_policy(dump(docs))
    assert policy.destination_rules[0].outlier_detection == OutlierDetection(
        consecutive_5xx_errors=3,
        consecutive_gateway_errors=0,
        interval_ms=90_000,
        base_ejection_time_ms=1500,
        max_ejection_percent=50,
        min_health_percent=20,
    )
    route = policy.virtual_services[0].routes[0]
    assert route.timeout_ms == 500
    # a status code is retried through retriable-status-codes, added after the conditions
    assert route.retries == HttpRetry(
        attempts=3,
        per_try_timeout_ms=2000,
        retry_on=("5xx", "reset", "retriable-status-codes"),
        retriable_status_codes=(503,),
    )


def test_without_the_fields_nothing_is_set() -> None:
    policy = parse_policy(SEED_POLICY_YAML)
    assert policy.destination_rules[0].outlier_detection is None
    route = policy.virtual_services[0].routes[0]
    assert (route.timeout_ms, route.retries) == (None, None)


def test_an_empty_outlier_detection_turns_it_on_with_envoys_defaults() -> None:
    docs = seed_docs()
    outlier(docs)
    assert parse_policy(dump(docs)).destination_rules[0].outlier_detection == OutlierDetection()


@pytest.mark.parametrize(
    ("duration", "ms"),
    [
        ("500ms", 500),
        ("1.5s", 1500),
        ("1m30s", 90_000),
        ("2h", 7_200_000),
        ("1h0m0.001s", 3_600_001),
        ("0.25s", 250),
        ("1ms", 1),
        ("2562047h", 2562047 * 3_600_000),
    ],
)
def test_durations_in_istios_format(duration: str, ms: int) -> None:
    docs = seed_docs()
    http(docs)["timeout"] = duration
    outlier(docs)["interval"] = duration
    policy = parse_policy(dump(docs))
    assert policy.virtual_services[0].routes[0].timeout_ms == ms
    assert policy.destination_rules[0].outlier_detection is not None
    assert policy.destination_rules[0].outlier_detection.interval_ms == ms


def _retries(**fields: object) -> Callable[[list[Doc]], None]:
    return _set([*_HTTP, "retries"], fields)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            _set([*_HTTP, "timeout"], "0s"),
            f"{VS_AT}: spec.http[0].timeout: '0s' is under 1ms, which Istio refuses: "
            "leave timeout out",
            id="timeout-0s",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "0.5ms"),
            f"{VS_AT}: spec.http[0].timeout: '0.5ms' is under 1ms",
            id="timeout-under-1ms",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "1.5ms"),
            f"{VS_AT}: spec.http[0].timeout: '1.5ms' is not a whole number of milliseconds",
            id="timeout-fraction-of-ms",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], 5),
            f"{VS_AT}: spec.http[0].timeout: expected a duration such as 500ms, 2s or 1m30s, got 5",
            id="timeout-a-number",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "5 s"),
            f"{VS_AT}: spec.http[0].timeout: expected a duration",
            id="timeout-with-a-space",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "1d"),
            f"{VS_AT}: spec.http[0].timeout: expected a duration",
            id="timeout-in-days",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "-1s"),
            f"{VS_AT}: spec.http[0].timeout: expected a duration",
            id="timeout-negative",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "2562048h"),
            f"{VS_AT}: spec.http[0].timeout: '2562048h' is longer than Istio takes",
            id="timeout-past-gos-duration",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "9" * 5000 + "s"),
            f"{VS_AT}: spec.http[0].timeout: expected a duration",
            id="timeout-of-5000-digits",
        ),
        pytest.param(
            _set([*_HTTP, "timeout"], "\u0663s"),
            f"{VS_AT}: spec.http[0].timeout: expected a duration",
            id="timeout-in-arabic-digits",
        ),
        pytest.param(
            _set([0, "spec", "trafficPolicy", "outlierDetection"], ["x"]),
            f"{DR_AT}: {OUTLIER}: expected a mapping, got a list",
            id="outlier-a-list",
        ),
        pytest.param(
            _set([0, "spec", "trafficPolicy", "outlierDetection"], {"maxEjectionPercent": 101}),
            f"{DR_AT}: {OUTLIER}.maxEjectionPercent: expected an integer percentage 0-100, got 101",
            id="max-ejection-over-100",
        ),
        pytest.param(
            _set([0, "spec", "trafficPolicy", "outlierDetection"], {"minHealthPercent": -1}),
            f"{DR_AT}: {OUTLIER}.minHealthPercent: expected an integer percentage 0-100, got -1",
            id="min-health-negative",
        ),
        pytest.param(
            _set([0, "spec", "trafficPolicy", "outlierDetection"], {"consecutive5xxErrors": "5"}),
            f"{DR_AT}: {OUTLIER}.consecutive5xxErrors: expected an integer 0-4294967295, got '5'",
            id="consecutive-a-string",
        ),
        pytest.param(
            _set(
                [0, "spec", "trafficPolicy", "outlierDetection"], {"consecutiveGatewayErrors": True}
            ),
            f"{DR_AT}: {OUTLIER}.consecutiveGatewayErrors: expected an integer",
            id="consecutive-a-bool",
        ),
        pytest.param(
            _set([0, "spec", "trafficPolicy", "outlierDetection"], {"interval": "10"}),
            f"{DR_AT}: {OUTLIER}.interval: expected a duration such as 500ms, 2s or 1m30s, "
            "got '10'",
            id="interval-without-unit",
        ),
        pytest.param(
            _set([0, "spec", "trafficPolicy", "outlierDetection"], {"baseEjectionTime": "0ms"}),
            f"{DR_AT}: {OUTLIER}.baseEjectionTime: '0ms' is under 1ms",
            id="base-ejection-0",
        ),
        pytest.param(
            _set([*_HTTP, "retries"], 3),
            f"{VS_AT}: spec.http[0].retries: expected a mapping, got 3",
            id="retries-a-number",
        ),
        pytest.param(
            _retries(attempts=-1),
            f"{VS_AT}: spec.http[0].retries.attempts: expected an integer 0-2147483647, got -1",
            id="attempts-negative",
        ),
        pytest.param(
            _retries(attempts=2**31),
            f"{VS_AT}: spec.http[0].retries.attempts: expected an integer 0-2147483647",
            id="attempts-past-int32",
        ),
        pytest.param(
            _retries(attempts="3"),
            f"{VS_AT}: spec.http[0].retries.attempts: expected an integer 0-2147483647, got '3'",
            id="attempts-a-string",
        ),
        pytest.param(
            _retries(perTryTimeout="2s"),
            f"{VS_AT}: spec.http[0].retries.attempts: 0 (or absent) turns retries off; "
            "perTryTimeout and retryOn need attempts of 1 or more",
            id="per-try-timeout-without-attempts",
        ),
        pytest.param(
            _retries(attempts=0, retryOn="5xx"),
            f"{VS_AT}: spec.http[0].retries.attempts: 0 (or absent) turns retries off",
            id="retry-on-with-attempts-0",
        ),
        pytest.param(
            _retries(attempts=2, perTryTimeout="0s"),
            f"{VS_AT}: spec.http[0].retries.perTryTimeout: '0s' is under 1ms",
            id="per-try-timeout-0s",
        ),
        pytest.param(
            _retries(attempts=2, retryOn="5xx, reset"),
            f"{VS_AT}: spec.http[0].retries.retryOn: ' reset' is not a retry condition "
            "(did you mean reset?)",
            id="retry-on-with-a-space",
        ),
        pytest.param(
            _retries(attempts=2, retryOn="5xxx"),
            f"{VS_AT}: spec.http[0].retries.retryOn: '5xxx' is not a retry condition "
            "(did you mean 5xx?)",
            id="retry-on-typo",
        ),
        pytest.param(
            _retries(attempts=2, retryOn="5xx,"),
            f"{VS_AT}: spec.http[0].retries.retryOn: '' is not a retry condition",
            id="retry-on-trailing-comma",
        ),
        pytest.param(
            _retries(attempts=2, retryOn="299"),
            f"{VS_AT}: spec.http[0].retries.retryOn: 299 is not an HTTP status code",
            id="retry-on-unnamed-status",
        ),
        pytest.param(
            _retries(attempts=2, retryOn="9" * 5000),
            f"{VS_AT}: spec.http[0].retries.retryOn: {'9' * 100} is not an HTTP status code",
            id="retry-on-of-5000-digits",
        ),
        pytest.param(
            _retries(attempts=2, retryOn="\u00b2"),
            f"{VS_AT}: spec.http[0].retries.retryOn: '\u00b2' is not a retry condition",
            id="retry-on-superscript-digit",
        ),
        pytest.param(
            _retries(attempts=2, retryOn=503),
            f"{VS_AT}: spec.http[0].retries.retryOn: expected a string such as 5xx,reset,503, "
            "got 503",
            id="retry-on-a-number",
        ),
    ],
)
def test_rejected_values_name_the_field(mutate: Callable[[list[Doc]], None], expected: str) -> None:
    docs = seed_docs()
    mutate(docs)
    errors = errors_of(dump(docs))
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize(
    ("section", "field", "expected"),
    [
        (OUTLIER, "consecutive5xxError", "did you mean consecutive5xxErrors? "),
        (OUTLIER, "baseEjectionTimes", "did you mean baseEjectionTime? "),
        (OUTLIER, "splitExternalLocalOriginErrors", "it reads consecutive5xxErrors, "),
        ("spec.http[0].retries", "perTryTimout", "did you mean perTryTimeout? "),
        ("spec.http[0].retries", "retryRemoteLocalities", "it reads attempts, "),
    ],
)
def test_an_unknown_field_is_an_error_with_a_did_you_mean(
    section: str, field: str, expected: str
) -> None:
    docs = seed_docs()
    if section == OUTLIER:
        outlier(docs)[field] = 1
        at = DR_AT
    else:
        http(docs)["retries"] = {"attempts": 2, field: 1}
        at = VS_AT
    [error] = errors_of(dump(docs))
    assert error.startswith(f"{at}: {section}.{field}: not a field modelxds reads; "), error
    assert expected in error


def test_retries_as_istio_reads_them() -> None:
    def retries(section: Doc) -> HttpRetry | None:
        docs = seed_docs()
        http(docs)["retries"] = section
        return parse_policy(dump(docs)).virtual_services[0].routes[0].retries

    # attempts is a plain int32 in Istio: absent is 0, and 0 turns retries off
    assert retries({}) == HttpRetry(attempts=0)
    assert retries({"attempts": 0}) == HttpRetry(attempts=0)
    # an empty retryOn keeps the default conditions, as no retryOn does
    assert retries({"attempts": 4, "retryOn": ""}) == HttpRetry(attempts=4)
    # status codes alone: retriable-status-codes is added for them
    assert retries({"attempts": 1, "retryOn": "503,504,503"}) == HttpRetry(
        attempts=1, retry_on=("retriable-status-codes",), retriable_status_codes=(503, 504)
    )
    assert retries(
        {"attempts": 1, "retryOn": "retriable-status-codes,unavailable,429,cancelled"}
    ) == HttpRetry(
        attempts=1,
        retry_on=("retriable-status-codes", "unavailable", "cancelled"),
        retriable_status_codes=(429,),
    )


def test_the_example_in_the_docs_reads_as_it_says() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "resilience.md").read_text()
    policy = parse_policy(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert policy.destination_rules[0].outlier_detection == OutlierDetection(
        consecutive_5xx_errors=3,
        interval_ms=10_000,
        base_ejection_time_ms=30_000,
        max_ejection_percent=50,
    )
    route = policy.virtual_services[0].routes[0]
    assert route.timeout_ms == 300_000
    assert route.retries == HttpRetry(
        attempts=3,
        per_try_timeout_ms=120_000,
        retry_on=("connect-failure", "refused-stream", "reset", "unavailable"),
    )
