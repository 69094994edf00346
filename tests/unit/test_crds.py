"""The CRDs as the API server applies them: the seed's spec is accepted verbatim, a
misspelled or unknown field is an error (kubectl's strict field validation), and the
schemas say what the policy loader says, field for field.

`CrdSchema` turns a CRD's structural schema into JSON Schema with the API server's
semantics: null fields are dropped first (they are pruned unless ``nullable``), an
object field the schema does not declare is an error unless
``x-kubernetes-preserve-unknown-fields``, and ``x-kubernetes-int-or-string`` takes
either. The other tests check every custom object they apply with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from modelxds.policy import PolicyError, parse_policy
from modelxds.policy.loader import _RETRY_ON
from modelxds.policy.seed import SEED_POLICY_YAML

CRD_DIR = Path(__file__).resolve().parents[2] / "manifests" / "crds"
API_VERSION = "modelxds.io/v1alpha1"
KUBERNETES_VERSION = "1.32.0"

Doc = dict[str, Any]


def crds() -> dict[str, Doc]:
    """Every CRD in manifests/crds, by kind."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") == "CustomResourceDefinition":
            out[doc["spec"]["names"]["kind"]] = doc
    return out


class CrdSchema:
    """One CRD version's openAPIV3Schema, validating as the API server does with
    ``fieldValidation=Strict``."""

    def __init__(self, crd: Doc, version: str = "v1alpha1") -> None:
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        self.schema = served["schema"]["openAPIV3Schema"]
        self._validator = jsonschema.Draft4Validator(
            _to_json_schema(self.schema, root=True), format_checker=jsonschema.FormatChecker()
        )

    def errors(self, obj: Doc) -> list[str]:
        """What the API server would answer, one line per problem ("" path: the root)."""
        pruned = _drop_nulls(obj, self.schema)
        return sorted(
            f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in self._validator.iter_errors(pruned)
        )

    def prune(self, obj: Doc) -> Doc:
        """The object as stored by a server without strict validation: undeclared fields
        and nulls dropped."""
        pruned: Doc = _prune(_drop_nulls(obj, self.schema), self.schema, root=True)
        return pruned


def check_custom_object(obj: Doc) -> None:
    """Fail unless `obj` (a DestinationRule or VirtualService of modelxds.io) is what the
    API server accepts."""
    assert obj["apiVersion"] == API_VERSION, obj["apiVersion"]
    errors = CrdSchema(crds()[obj["kind"]]).errors(obj)
    assert not errors, errors


def _to_json_schema(node: Doc, *, root: bool = False) -> Doc:
    out: Doc = {}
    for key in ("type", "enum", "pattern", "format", "minimum", "maximum", "required"):
        if key in node:
            out[key] = node[key]
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties"):
        if key in node:
            out[key] = node[key]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "items" in node:
        out["items"] = _to_json_schema(node["items"])
    if node.get("type") == "object":
        props = {
            name: _to_json_schema(child)
            for name, child in node.get("properties", {}).items()
            # The server checks ObjectMeta itself; the CRD may only narrow name/generateName.
            if not (root and name == "metadata")
        }
        if root:
            props["metadata"] = {"type": "object"}
        if props:
            out["properties"] = props
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = _to_json_schema(node["additionalProperties"])
        elif not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _drop_nulls(value: Any, node: Doc) -> Any:
    """Null object fields are pruned before validation unless the schema says nullable."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            child = _child(node, k)
            if v is None and not (child or {}).get("nullable"):
                continue
            out[k] = _drop_nulls(v, child or {})
        return out
    if isinstance(value, list):
        return [_drop_nulls(v, node.get("items", {})) for v in value]
    return value


def _prune(value: Any, node: Doc, *, root: bool = False) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if root and k == "metadata":
                out[k] = v
                continue
            child = _child(node, k)
            if child is not None:
                out[k] = _prune(v, child)
            elif node.get("x-kubernetes-preserve-unknown-fields"):
                out[k] = v
        return out
    if isinstance(value, list):
        return [_prune(v, node.get("items", {})) for v in value]
    return value


def _child(node: Doc, key: str) -> Doc | None:
    if key in node.get("properties", {}):
        child: Doc = node["properties"][key]
        return child
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def _nodes(node: Doc, path: str = "") -> Iterator[tuple[str, Doc]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


def seed_objects() -> list[Doc]:
    """The seed's DestinationRule and VirtualService as modelxds.io objects: only
    apiVersion changed."""
    docs = list(yaml.safe_load_all(SEED_POLICY_YAML))
    for doc in docs:
        doc["apiVersion"] = API_VERSION
    return docs


def schema_of(kind: str) -> CrdSchema:
    return CrdSchema(crds()[kind])


# --- the CRD objects themselves --------------------------------------------------------


def test_both_crds_are_valid_kubernetes_objects() -> None:
    found = crds()
    assert set(found) == {"DestinationRule", "VirtualService"}
    for crd in found.values():
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("kind", "plural", "short"),
    [("DestinationRule", "destinationrules", "mdr"), ("VirtualService", "virtualservices", "mvs")],
)
def test_names_do_not_clash_with_istio(kind: str, plural: str, short: str) -> None:
    crd = crds()[kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{plural}.modelxds.io"
    assert spec["group"] == "modelxds.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == plural
    assert spec["names"]["shortNames"] == [short]  # Istio's are dr / vs
    assert spec["names"]["categories"] == ["modelxds"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Accepted"] == '.status.conditions[?(@.type=="Accepted")].status'
    assert columns["Programmed"] == '.status.conditions[?(@.type=="Programmed")].status'
    assert columns["Age"] == ".metadata.creationTimestamp"


@pytest.mark.parametrize("kind", ["DestinationRule", "VirtualService"])
def test_schemas_are_structural(kind: str) -> None:
    """The rules apiextensions.k8s.io/v1 enforces: a type on every node, no logical
    junctors, properties and additionalProperties never together, and metadata left to
    the server."""
    schema = schema_of(kind).schema
    assert schema["properties"]["metadata"] == {"type": "object"}
    for path, node in _nodes(schema):
        assert node.get("type") or node.get("x-kubernetes-int-or-string"), path
        assert not {"allOf", "anyOf", "oneOf", "not"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array":
            assert "items" in node, path
        for required in node.get("required", []):
            assert required in node.get("properties", {}), f"{path}: {required}"


@pytest.mark.parametrize("kind", ["DestinationRule", "VirtualService"])
def test_status_conditions_have_the_metav1_condition_shape(kind: str) -> None:
    status = schema_of(kind).schema["properties"]["status"]
    assert status["properties"]["observedGeneration"]["type"] == "integer"
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    good = {
        "type": "Accepted",
        "status": "False",
        "reason": "Invalid",
        "message": "spec.host: required",
        "lastTransitionTime": "2025-01-02T03:04:05Z",
        "observedGeneration": 2,
    }
    obj = {**seed_objects()[0 if kind == "DestinationRule" else 1], "kind": kind}
    obj["status"] = {"observedGeneration": 2, "conditions": [good]}
    assert schema_of(kind).errors(obj) == []
    obj["status"]["conditions"] = [{**good, "reason": "not camel case"}]
    assert schema_of(kind).errors(obj)


# --- the seed, verbatim -----------------------------------------------------------------


def test_the_seeds_spec_validates_verbatim() -> None:
    for obj in seed_objects():
        assert schema_of(obj["kind"]).errors(obj) == []
    # and the loader reads those objects as it reads the seed's files
    text = yaml.safe_dump_all(seed_objects())
    assert parse_policy(text).ports() == parse_policy(SEED_POLICY_YAML).ports() == (8008,)


def test_every_rule_object_in_the_manifests_validates() -> None:
    objects = [
        doc
        for path in sorted(CRD_DIR.parent.rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION
    ]
    for obj in objects:
        check_custom_object(obj)
    if objects:  # the examples, when they are there, are the seed's rules verbatim
        assert parse_policy(yaml.safe_dump_all(objects)).ports() == (8008,)


def test_the_examples_in_the_docs_validate() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "crds.md"
    blocks = docs.read_text().split("```yaml\n")[1:]
    objects = [
        doc
        for block in blocks
        for doc in yaml.safe_load_all(block.split("```", 1)[0])
        if isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION
    ]
    assert len(objects) >= 2
    for obj in objects:
        check_custom_object(obj)


# --- what the schema rejects -------------------------------------------------------------

_DR, _VS = 0, 1
_DYN = ["spec", "trafficPolicy", "loadBalancer", "dynamicSubset"]
_SEL = [*_DYN, "subsetSelectors", 0]
_HTTP = ["spec", "http", 0]
_OUTLIER = ["spec", "trafficPolicy", "outlierDetection"]


def _set(doc: int, path: list[Any], value: Any) -> Callable[[list[Doc]], Doc]:
    def mutate(objs: list[Doc]) -> Doc:
        node: Any = objs[doc]
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
        return objs[doc]

    return mutate


def _rename(doc: int, path: list[Any], new: str) -> Callable[[list[Doc]], Doc]:
    def mutate(objs: list[Doc]) -> Doc:
        node: Any = objs[doc]
        for step in path[:-1]:
            node = node[step]
        node[new] = node.pop(path[-1])
        return objs[doc]

    return mutate


def _delete(doc: int, path: list[Any]) -> Callable[[list[Doc]], Doc]:
    def mutate(objs: list[Doc]) -> Doc:
        node: Any = objs[doc]
        for step in path[:-1]:
            node = node[step]
        del node[path[-1]]
        return objs[doc]

    return mutate


MISSPELLED = [
    pytest.param(
        _rename(_VS, [*_HTTP, "headerToDynamicSubsetKey"], "headerToDynamicSubsetKeys"),
        "spec.http.0: Additional properties are not allowed ('headerToDynamicSubsetKeys'",
        id="headerToDynamicSubsetKeys",
    ),
    pytest.param(
        _rename(_DR, [*_SEL, "fallbackPolicy"], "fallbackPolicys"),
        "subsetSelectors.0: Additional properties are not allowed ('fallbackPolicys'",
        id="fallbackPolicys",
    ),
    pytest.param(
        _rename(_DR, _DYN, "dynamicSubsets"),
        "spec.trafficPolicy.loadBalancer: Additional properties are not allowed",
        id="dynamicSubsets",
    ),
    pytest.param(
        _rename(_VS, [*_HTTP, "route", 0, "destination", "port", "number"], "numbr"),
        "destination.port: 'number' is a required property",
        id="numbr",
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "match", 0, "uri"], {"prefix": "/"}),
        "match.0: Additional properties are not allowed ('uri'",
        id="istio-field-modelxds-ignores",
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "route", 0, "destination", "subset"], "v1"),
        "destination: Additional properties are not allowed ('subset'",
        id="named-subset",
    ),
    pytest.param(
        _set(_VS, ["spec", "tcp"], []),
        "spec: Additional properties are not allowed ('tcp'",
        id="tcp-routes",
    ),
    pytest.param(
        _set(_DR, _OUTLIER, {"consecutive5xxError": 5}),
        "outlierDetection: Additional properties are not allowed ('consecutive5xxError'",
        id="consecutive5xxError",
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "retries"], {"attempts": 2, "perTryTimout": "2s"}),
        "retries: Additional properties are not allowed ('perTryTimout'",
        id="perTryTimout",
    ),
    pytest.param(
        _set(_DR, _OUTLIER, {"splitExternalLocalOriginErrors": True}),
        "outlierDetection: Additional properties are not allowed ('splitExternalLocalOrigin",
        id="istio-outlier-field-modelxds-ignores",
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "retries"], {"attempts": 2, "retryRemoteLocalities": True}),
        "retries: Additional properties are not allowed ('retryRemoteLocalities'",
        id="istio-retry-field-modelxds-ignores",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), MISSPELLED)
def test_a_misspelled_or_unread_field_is_rejected(
    mutate: Callable[[list[Doc]], Doc], expected: str
) -> None:
    obj = mutate(seed_objects())
    errors = schema_of(obj["kind"]).errors(obj)
    assert any(expected in e for e in errors), errors


# Field values the loader rejects (each is also a case of tests/unit/test_policy.py);
# the schema must reject them as well, so `kubectl apply` says so before modelxds does.
LOADER_REJECTS = [
    pytest.param(_delete(_DR, ["spec", "host"]), id="no-host"),
    pytest.param(_set(_DR, ["spec", "host"], ""), id="empty-host"),
    pytest.param(_set(_DR, ["spec", "host"], 5), id="host-not-a-string"),
    pytest.param(_set(_DR, ["spec", "host"], "*.example.com"), id="wildcard-host"),
    pytest.param(_set(_DR, ["spec", "trafficPolicy"], ["x"]), id="traffic-policy-a-list"),
    pytest.param(_delete(_DR, [*_DYN, "subsetSelectors"]), id="no-selectors"),
    pytest.param(_set(_DR, [*_DYN, "subsetSelectors"], []), id="empty-selectors"),
    pytest.param(_delete(_DR, [*_SEL, "keys"]), id="missing-keys"),
    pytest.param(_set(_DR, [*_SEL, "keys"], []), id="empty-keys"),
    pytest.param(_set(_DR, [*_SEL, "keys"], "k"), id="keys-not-a-list"),
    pytest.param(_set(_DR, [*_SEL, "keys"], ["k", ""]), id="empty-key"),
    pytest.param(_set(_DR, [*_SEL, "fallbackPolicy"], "SOMETIMES"), id="unknown-fallback"),
    pytest.param(_set(_DR, [*_DYN, "fallbackPolicy"], "any_endpoint"), id="fallback-case"),
    pytest.param(_set(_DR, [*_DYN, "defaultSubset"], {"k": 1}), id="default-subset-int"),
    pytest.param(_delete(_VS, ["spec", "http"]), id="no-http"),
    pytest.param(_set(_VS, ["spec", "http"], []), id="empty-http"),
    pytest.param(_set(_VS, ["spec", "hosts"], [""]), id="empty-vs-host"),
    pytest.param(_set(_VS, ["spec", "gateways"], "grpc-gateway"), id="gateways-not-a-list"),
    pytest.param(_set(_VS, [*_HTTP, "name"], ""), id="empty-route-name"),
    pytest.param(_delete(_VS, [*_HTTP, "match"]), id="no-match"),
    pytest.param(_set(_VS, [*_HTTP, "match"], [{}]), id="match-without-port"),
    pytest.param(_set(_VS, [*_HTTP, "match", 0, "port"], 70000), id="port-out-of-range"),
    pytest.param(_set(_VS, [*_HTTP, "match", 0, "port"], 0), id="port-zero"),
    pytest.param(_set(_VS, [*_HTTP, "match", 0, "port"], "8008"), id="port-a-string"),
    pytest.param(_set(_VS, [*_HTTP, "match", 0, "port"], True), id="port-a-bool"),
    pytest.param(_delete(_VS, [*_HTTP, "headerToDynamicSubsetKey"]), id="no-header-keys"),
    pytest.param(_delete(_VS, [*_HTTP, "headerToDynamicSubsetKey", 0, "header"]), id="no-header"),
    pytest.param(
        _set(_VS, [*_HTTP, "headerToDynamicSubsetKey", 0, "key"], ""), id="empty-model-key"
    ),
    pytest.param(_delete(_VS, [*_HTTP, "route"]), id="no-route"),
    pytest.param(_set(_VS, [*_HTTP, "route"], [{"destination": {"host": "a"}}] * 2), id="weighted"),
    pytest.param(_delete(_VS, [*_HTTP, "route", 0, "destination"]), id="no-destination"),
    pytest.param(_set(_VS, [*_HTTP, "route", 0, "destination", "host"], "*"), id="wildcard"),
    pytest.param(
        _set(_VS, [*_HTTP, "route", 0, "destination", "port", "number"], "abc"), id="port-abc"
    ),
    pytest.param(_set(_DR, _OUTLIER, ["x"]), id="outlier-a-list"),
    pytest.param(_set(_DR, _OUTLIER, {"maxEjectionPercent": 101}), id="max-ejection-over-100"),
    pytest.param(_set(_DR, _OUTLIER, {"minHealthPercent": -1}), id="min-health-negative"),
    pytest.param(_set(_DR, _OUTLIER, {"consecutive5xxErrors": "5"}), id="consecutive-a-string"),
    pytest.param(_set(_DR, _OUTLIER, {"consecutiveGatewayErrors": -1}), id="consecutive-below-0"),
    pytest.param(_set(_DR, _OUTLIER, {"interval": "10"}), id="interval-without-unit"),
    pytest.param(_set(_DR, _OUTLIER, {"baseEjectionTime": 30}), id="base-ejection-a-number"),
    pytest.param(_set(_VS, [*_HTTP, "timeout"], "5 s"), id="timeout-with-a-space"),
    pytest.param(_set(_VS, [*_HTTP, "timeout"], "1d"), id="timeout-in-days"),
    pytest.param(_set(_VS, [*_HTTP, "timeout"], "-1s"), id="timeout-negative"),
    pytest.param(_set(_VS, [*_HTTP, "timeout"], 5), id="timeout-a-number"),
    pytest.param(_set(_VS, [*_HTTP, "timeout"], "9" * 5000 + "s"), id="timeout-of-5000-digits"),
    pytest.param(_set(_VS, [*_HTTP, "retries"], 3), id="retries-a-number"),
    pytest.param(_set(_VS, [*_HTTP, "retries"], {"attempts": -1}), id="attempts-negative"),
    pytest.param(_set(_VS, [*_HTTP, "retries"], {"attempts": "3"}), id="attempts-a-string"),
    pytest.param(_set(_VS, [*_HTTP, "retries"], {"attempts": 2**31}), id="attempts-past-int32"),
    pytest.param(
        _set(_VS, [*_HTTP, "retries"], {"attempts": 2, "perTryTimeout": "2"}),
        id="per-try-timeout-without-unit",
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "retries"], {"attempts": 2, "retryOn": "5xx, reset"}),
        id="retry-on-with-a-space",
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "retries"], {"attempts": 2, "retryOn": "5xxx"}), id="retry-on-typo"
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "retries"], {"attempts": 2, "retryOn": "5xx,"}),
        id="retry-on-trailing-comma",
    ),
    pytest.param(
        _set(_VS, [*_HTTP, "retries"], {"attempts": 2, "retryOn": 503}), id="retry-on-a-number"
    ),
]
# What the loader also rejects but a schema cannot say, reported in the object's status:
# a duration under 1 ms or of a fraction of one (the API server's CEL rule refuses 0s),
# status codes Istio does not know (299), and perTryTimeout or retryOn with attempts 0.


@pytest.mark.parametrize("mutate", LOADER_REJECTS)
def test_what_the_loader_rejects_the_schema_rejects(mutate: Callable[[list[Doc]], Doc]) -> None:
    objs = seed_objects()
    obj = mutate(objs)
    with pytest.raises(PolicyError):
        parse_policy(yaml.safe_dump_all(objs))
    assert schema_of(obj["kind"]).errors(obj)


def _every_field() -> list[Doc]:
    """The seed with every optional field the loader reads filled in."""
    dr, vs = seed_objects()
    dynamic = dr["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]
    dynamic["fallbackPolicy"] = "DEFAULT_SUBSET"
    dynamic["defaultSubset"] = {"modelmesh.asm.alibabacloud.com": "default-model"}
    dynamic["subsetSelectors"].append({"keys": ["other.example.com"]})
    vs["metadata"]["annotations"] = {"modelxds.io/rest-port": "8008"}
    vs["spec"]["http"][0]["headerToDynamicSubsetKey"].append(
        {"header": "other", "key": "other.example.com"}
    )
    vs["spec"]["http"][0]["match"].append({"port": 9000})
    vs["spec"]["http"][0]["route"][0]["destination"]["port"] = {"number": 9033}
    dr["spec"]["trafficPolicy"]["outlierDetection"] = {
        "consecutive5xxErrors": 3,
        "consecutiveGatewayErrors": 0,
        "interval": "1m30s",
        "baseEjectionTime": "1.5s",
        "maxEjectionPercent": 50,
        "minHealthPercent": 20,
    }
    vs["spec"]["http"][0]["timeout"] = "500ms"
    vs["spec"]["http"][0]["retries"] = {
        "attempts": 3,
        "perTryTimeout": "2s",
        "retryOn": "5xx,reset,503",
    }
    return [dr, vs]


def test_nothing_the_loader_reads_is_pruned() -> None:
    """A server without strict validation drops undeclared fields: the pruned objects
    must read as the same policy."""
    objs = _every_field()
    for obj in objs:
        assert schema_of(obj["kind"]).errors(obj) == []
    pruned = [schema_of(o["kind"]).prune(copy.deepcopy(o)) for o in objs]
    assert pruned == objs
    assert parse_policy(yaml.safe_dump_all(pruned)) == parse_policy(yaml.safe_dump_all(objs))


def test_null_fields_are_dropped_as_the_server_prunes_them() -> None:
    dr, _ = seed_objects()
    dr["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]["fallbackPolicy"] = None
    assert schema_of("DestinationRule").errors(dr) == []


def _retry_on_schema() -> Doc:
    http = schema_of("VirtualService").schema["properties"]["spec"]["properties"]["http"]
    retry_on: Doc = http["items"]["properties"]["retries"]["properties"]["retryOn"]
    return retry_on


def test_retry_on_takes_exactly_the_conditions_the_loader_reads() -> None:
    pattern = _retry_on_schema()["pattern"]
    first = pattern.removeprefix("^((").split(")", 1)[0]
    assert first.split("|") == [*_RETRY_ON, "[0-9]{3}"]
    assert pattern == f"^(({first})(,({first}))*)?$"


@pytest.mark.parametrize(
    "retry_on", ["5xx", "5xx,reset,503", "retriable-status-codes,429", "unavailable", ""]
)
def test_what_the_loader_reads_in_retry_on_the_schema_takes(retry_on: str) -> None:
    dr, vs = seed_objects()
    vs["spec"]["http"][0]["retries"] = {"attempts": 2, "retryOn": retry_on}
    assert schema_of("VirtualService").errors(vs) == []
    parse_policy(yaml.safe_dump_all([dr, vs]))


@pytest.mark.parametrize("duration", ["500ms", "1.5s", "1m30s", "2h", "1h0m0.001s", "0.25s"])
def test_every_duration_the_loader_reads_the_schema_takes(duration: str) -> None:
    objs = _every_field()
    dr, vs = objs
    dr["spec"]["trafficPolicy"]["outlierDetection"]["interval"] = duration
    vs["spec"]["http"][0]["timeout"] = duration
    vs["spec"]["http"][0]["retries"]["perTryTimeout"] = duration
    for obj in objs:
        assert schema_of(obj["kind"]).errors(obj) == []
    parse_policy(yaml.safe_dump_all(objs))


def test_durations_are_refused_under_1ms_as_istios_crds_do() -> None:
    """The API server's own rule (CEL, which this test's validator does not run): the one
    Istio's CRDs put on every duration."""
    rule = {
        "rule": "duration(self) >= duration('1ms')",
        "message": "must be a duration of at least 1ms",
    }
    dr, vs = (
        schema_of(kind).schema["properties"]["spec"]
        for kind in ("DestinationRule", "VirtualService")
    )
    outlier = dr["properties"]["trafficPolicy"]["properties"]["outlierDetection"]["properties"]
    http = vs["properties"]["http"]["items"]["properties"]
    for node in (
        outlier["interval"],
        outlier["baseEjectionTime"],
        http["timeout"],
        http["retries"]["properties"]["perTryTimeout"],
    ):
        assert node["x-kubernetes-validations"] == [rule]
