"""Read DestinationRule and VirtualService documents (Istio / Alibaba ASM dynamic-subset
form) into a `Policy`.

Every problem found, in every document, is collected and reported in one `PolicyError`
so users can fix a whole file in one pass. Each message starts with the file, the
document number and the object, then the field path.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from http import HTTPStatus
from pathlib import Path
from typing import Any

import yaml

from modelxds.policy.model import (
    REST_PORT_ANNOTATION,
    DestinationRule,
    FallbackPolicy,
    HeaderToKey,
    HttpRetry,
    HttpRoute,
    OutlierDetection,
    Policy,
    SubsetSelector,
    VirtualService,
    resolve_host,
)
from modelxds.policy.seed import SEED_POLICY_YAML

SEED_SOURCE = "<built-in seed policy>"

_API_VERSIONS = (
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
    "modelxds.io/v1alpha1",
)
_KINDS = ("DestinationRule", "VirtualService")
_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_DYNAMIC = "spec.trafficPolicy.loadBalancer.dynamicSubset"
_PORT_WHY = "modelxds opens one Envoy listener per match port, so every match needs a port"
_NO_WILDCARD = "wildcard hosts are not supported; name one Service"
# RFC 9110 token (a pseudo-header such as :authority too): Envoy refuses the whole listener
# for a header name with a NUL, CR or LF, and no request carries one with a space
_HEADER_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Envoy refuses a route table whose domains hold a NUL, CR or LF; no Host has a space
_HOST_NAME = re.compile(r"[^\x00-\x20\x7f]+")
# what Kubernetes takes as a namespace (an RFC 1123 label) and as these objects' names (an
# RFC 1123 subdomain): a namespace with a dot would read as <service>.<namespace> in host
# names, and route one team's VirtualService to another team's pods
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_NAMESPACE = re.compile(_LABEL)
_OBJECT_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
# a code point Python strings can hold but UTF-8 (protobuf, Envoy) cannot
_SURROGATE = re.compile("[\ud800-\udfff]")
_OUTLIER = "spec.trafficPolicy.outlierDetection"
# the Istio fields modelxds reads there and in http[].retries; any other is a typo or an
# Istio feature that would silently not happen
_OUTLIER_FIELDS = (
    "consecutive5xxErrors",
    "consecutiveGatewayErrors",
    "interval",
    "baseEjectionTime",
    "maxEjectionPercent",
    "minHealthPercent",
)
_RETRY_FIELDS = ("attempts", "perTryTimeout", "retryOn")
# what Istio's validation takes in retryOn besides status codes: Envoy's router
# conditions (x-envoy-retry-on and x-envoy-retry-grpc-on), passed through as they are
_RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
# Istio's validation takes a status code in retryOn if Go's http.StatusText names it:
# the same codes as HTTPStatus
_STATUS_CODES = frozenset(int(code) for code in HTTPStatus)
# Istio's duration strings: 1h, 1m, 1s, 1ms, and sums of them such as 1m30s or 1.5s
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:h|ms|m|s))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|ms|m|s)")
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
# Istio reads a duration into a Go time.Duration (int64 nanoseconds) and refuses a longer
# one; it is also far below what an Envoy Duration holds
_DURATION_MAX_MS = (2**63 - 1) // 1_000_000
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


class PolicyError(ValueError):
    """Invalid policy; `errors` holds one message per problem, `str()` shows them one per line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def parse_policy(text: str, source: str = "<string>", *, allow_empty: bool = False) -> Policy:
    """Parse multi-document YAML; `source` names the text in messages and `source` fields.

    A policy with no route would remove every gateway listener: an error unless
    ``allow_empty``."""
    errors: list[str] = []
    return _assemble(_read_stream(text, source, errors, is_json=False), errors, source, allow_empty)


def load_policy(path: str | os.PathLike[str], *, allow_empty: bool = False) -> Policy:
    """Load one file, or every *.yaml, *.yml and *.json file directly inside a directory
    (``allow_empty`` as in ``parse_policy``)."""
    root = Path(path)
    if root.is_dir():
        files = sorted(
            (f for f in root.iterdir() if f.is_file() and f.suffix.lower() in _FILE_SUFFIXES),
            key=lambda f: f.name,
        )
        if not files:
            raise PolicyError([f"{root}: directory has no *.yaml, *.yml or *.json files"])
    elif root.exists():
        files = [root]
    else:
        raise PolicyError([f"{root}: no such file or directory"])

    errors: list[str] = []
    docs: list[_Doc] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{file}: cannot read: {exc}")
            docs.append(_UNKNOWN)
            continue
        docs += _read_stream(text, str(file), errors, is_json=file.suffix.lower() == ".json")
    return _assemble(docs, errors, str(root), allow_empty)


def default_policy() -> Policy:
    """The built-in seed policy, used when the user gives none."""
    return parse_policy(SEED_POLICY_YAML, SEED_SOURCE)


# (kind, namespace, name): a Kubernetes object's identity
ObjectKey = tuple[str, str, str]

KUBERNETES_SOURCE = "kubernetes"


def object_key(data: Mapping[str, Any]) -> ObjectKey:
    metadata = data.get("metadata")
    meta: Mapping[str, Any] = metadata if isinstance(metadata, Mapping) else {}
    return (
        str(data.get("kind") or ""),
        str(meta.get("namespace") or "default"),
        str(meta.get("name") or ""),
    )


def read_objects(
    objects: Iterable[Mapping[str, Any]], *, base: Policy | None = None
) -> tuple[Policy, dict[ObjectKey, list[str]]]:
    """Kubernetes objects read one at a time into a policy beside ``base`` (the policy
    files', already checked whole); returns the policy and, for every object given, its
    problems ([]: it is in the policy).

    Each object is checked alone, as a document of a file is, then against ``base`` and
    the objects taken before it: DestinationRules first, then VirtualServices, each kind
    oldest first (creationTimestamp, then namespace/name). So of two objects that collide
    the older one wins, whatever order they arrived in. An invalid or colliding object is
    left out; the others still form the policy, which may route no port.
    """
    taken = [
        _Doc(kind, _where_in_file(obj, kind), obj)
        for kind, objs in (
            ("DestinationRule", base.destination_rules if base else ()),
            ("VirtualService", base.virtual_services if base else ()),
        )
        for obj in objs
    ]
    problems: dict[ObjectKey, list[str]] = {}
    readable: list[tuple[tuple[int, str, str, str], ObjectKey, _Doc]] = []
    for data in objects:
        key = object_key(data)
        errors: list[str] = []
        doc = _read_document(dict(data), KUBERNETES_SOURCE, "", errors)
        problems[key] = errors
        if doc.obj is not None:
            created = data["metadata"].get("creationTimestamp") or ""
            # RFC 3339 in UTC, as the API server writes it, sorts as text
            order = (_KINDS.index(doc.kind), str(created), key[1], key[2])
            readable.append((order, key, doc))
    readable.sort(key=lambda item: item[0])
    for _, key, doc in readable:
        # taken is free of conflicts, so whatever the check finds is about this object
        conflicts = _cross_check([*taken, doc])
        if conflicts:
            problems[key] = conflicts
        else:
            taken.append(doc)
    policy = Policy(
        destination_rules=tuple(d.obj for d in taken if isinstance(d.obj, DestinationRule)),
        virtual_services=tuple(d.obj for d in taken if isinstance(d.obj, VirtualService)),
    )
    return policy, problems


def _where_in_file(obj: DestinationRule | VirtualService, kind: str) -> str:
    file, _, index = obj.source.rpartition("#")
    return f"{file} document {index} ({kind} {obj.namespace}/{obj.name})"


@dataclass(frozen=True, slots=True)
class _Doc:
    kind: str
    where: str  # message prefix: "file document N (Kind namespace/name)"
    obj: DestinationRule | VirtualService | None  # None when the document had errors


# Stands for documents that could not be read at all: they might have held anything.
_UNKNOWN = _Doc("", "", None)


def _assemble(docs: list[_Doc], errors: list[str], source: str, allow_empty: bool) -> Policy:
    # A broken or unreadable document may have been the DestinationRule that the
    # VirtualServices point at; cross-checking without it would only report noise.
    if all(doc.obj is not None or doc.kind == "VirtualService" for doc in docs):
        errors = errors + _cross_check(docs)
    policy = Policy(
        destination_rules=tuple(d.obj for d in docs if isinstance(d.obj, DestinationRule)),
        virtual_services=tuple(d.obj for d in docs if isinstance(d.obj, VirtualService)),
    )
    if not errors and not policy.ports() and not allow_empty:
        errors.append(
            f"{source}: no VirtualService routes any port: every gateway listener would be "
            "removed (serve --allow-empty-policy if that is what you want)"
        )
    if errors:
        raise PolicyError(errors)
    return policy


def _read_stream(text: str, file: str, errors: list[str], *, is_json: bool) -> list[_Doc]:
    documents, complete = _split_documents(text, file, errors, is_json=is_json)
    docs: list[_Doc] = []
    # Numbering counts empty documents too, so "document N" is the Nth one in the file.
    for index, data in enumerate(documents, start=1):
        if isinstance(data, dict) and data.get("kind") == "List":
            # what `kubectl get -o yaml` prints: the objects are its items
            items = data.get("items")
            if not isinstance(items, list):
                errors.append(
                    f"{file} document {index} (List): items: expected a list, got "
                    f"{_describe(items)}"
                )
                continue
            for i, item in enumerate(items):
                docs.append(_read_document(item, file, f"{index} item {i}", errors))
        elif data is not None:
            docs.append(_read_document(data, file, str(index), errors))
    if not complete:
        docs.append(_UNKNOWN)
    return docs


def _split_documents(
    text: str, file: str, errors: list[str], *, is_json: bool
) -> tuple[list[object], bool]:
    """The raw documents, and whether the whole text could be parsed."""
    if is_json:
        try:
            return [json.loads(text)], True
        except json.JSONDecodeError as exc:
            errors.append(
                f"{file} document 1: invalid JSON at line {exc.lineno}, "
                f"column {exc.colno}: {exc.msg}"
            )
            return [], False
        except (ValueError, RecursionError) as exc:  # an int over 4300 digits, deep nesting
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            errors.append(f"{file} document 1: invalid JSON: {why}")
            return [], False
    documents: list[object] = []
    try:
        for data in yaml.safe_load_all(text):
            documents.append(data)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # PyYAML lets ValueError out of its constructors (2024-13-45 as a date, an int of
        # more than 4300 digits) and RecursionError out of deep nesting
        errors.append(f"{file} document {len(documents) + 1}: {_yaml_problem(exc)}")
        return documents, False
    return documents, True


def _yaml_problem(exc: Exception) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"
    if isinstance(exc, RecursionError):
        return "invalid YAML: nested too deeply"
    return f"invalid YAML: {exc}"


def _read_document(data: object, file: str, index: str, errors: list[str]) -> _Doc:
    """Read one document (``index``: its place in the file, e.g. "2" or "1 item 3"; empty
    for an object that is not in a file, `file` then names where it came from)."""
    at = f"{file} document {index}" if index else file
    if not isinstance(data, dict):
        errors.append(
            f"{at}: expected a Kubernetes object (a mapping with apiVersion, kind, metadata "
            f"and spec), got {_describe(data)}"
        )
        return _Doc("", at, None)
    kind = data.get("kind")
    if kind is None:
        errors.append(f"{at}: kind: required")
        return _Doc("", at, None)
    if not isinstance(kind, str) or not kind:
        errors.append(f"{at}: kind: expected a non-empty string, got {_describe(kind)}")
        return _Doc("", at, None)
    if kind not in _KINDS:
        # Skipping it would turn a typo (VirtualSevice) into a policy without that object.
        close = difflib.get_close_matches(kind, _KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else "; keep other objects in other files"
        errors.append(
            f"{at}: kind: {kind!r} is not a DestinationRule or VirtualService, the only kinds "
            f"modelxds reads{hint}"
        )
        return _Doc(kind, at, None)

    r = _Reader(f"{at} ({kind})")
    metadata = r.section(data, "metadata", "metadata", required=True)
    name, namespace = None, "default"
    annotations: dict[str, Any] = {}
    if metadata is not None:
        name = r.string(metadata, "name", "metadata.name", required=True)
        namespace = r.string(metadata, "namespace", "metadata.namespace") or namespace
        for field, value, form, what in (
            ("name", name, _OBJECT_NAME, "an object name"),
            ("namespace", namespace, _NAMESPACE, "a namespace name"),
        ):
            if value is not None and not form.fullmatch(value):
                r.error(
                    f"metadata.{field}",
                    f"{value[:100]!r} is not {what} Kubernetes takes (lower case letters, "
                    f"digits and '-'{', and dots between them' if form is _OBJECT_NAME else ''})",
                )
        annotations = r.section(metadata, "annotations", "metadata.annotations") or {}
    if name is not None:
        r.where = f"{at} ({kind} {namespace}/{name})"
    api_version = data.get("apiVersion")
    if api_version not in _API_VERSIONS:
        r.error(
            "apiVersion",
            f"expected one of {', '.join(_API_VERSIONS)}, got {_describe(api_version)}",
        )
    spec = r.section(data, "spec", "spec", required=True)
    obj: DestinationRule | VirtualService | None = None
    if spec is not None:
        source = f"{file}#{index}" if index else r.where
        if kind == "DestinationRule":
            obj = _destination_rule(r, spec, name or "", namespace, source)
        else:
            rest_port = _rest_port(r, annotations)
            obj = _virtual_service(r, spec, name or "", namespace, source, rest_port)
    errors += r.errors
    return _Doc(kind, r.where, None if r.errors else obj)


def _destination_rule(
    r: _Reader, spec: dict[str, Any], name: str, namespace: str, source: str
) -> DestinationRule:
    host = r.string(spec, "host", "spec.host", required=True) or ""
    if "*" in host:
        r.error("spec.host", _NO_WILDCARD)
    traffic = r.section(spec, "trafficPolicy", "spec.trafficPolicy") or {}
    outlier = _outlier_detection(r, traffic)
    balancer = r.section(traffic, "loadBalancer", "spec.trafficPolicy.loadBalancer") or {}
    dynamic = r.section(balancer, "dynamicSubset", _DYNAMIC)
    if dynamic is None:
        return DestinationRule(
            name, namespace, host, (), FallbackPolicy.ANY_ENDPOINT, (), source, outlier
        )

    default_subset = r.string_map(dynamic, "defaultSubset", f"{_DYNAMIC}.defaultSubset")
    declared = r.fallback(dynamic, "fallbackPolicy", f"{_DYNAMIC}.fallbackPolicy")
    given: list[tuple[str, FallbackPolicy | None]] = [(f"{_DYNAMIC}.fallbackPolicy", declared)]
    selectors: list[tuple[tuple[str, ...], FallbackPolicy | None]] = []
    items = r.items(
        dynamic,
        "subsetSelectors",
        f"{_DYNAMIC}.subsetSelectors",
        required_because="a dynamicSubset needs at least one selector",
    )
    for i, item in enumerate(items):
        path = f"{_DYNAMIC}.subsetSelectors[{i}]"
        selector = r.mapping(item, path)
        if selector is None:
            continue
        keys = r.strings(
            selector, "keys", f"{path}.keys", required_because="list the endpoint label keys"
        )
        fallback = r.fallback(selector, "fallbackPolicy", f"{path}.fallbackPolicy")
        given.append((f"{path}.fallbackPolicy", fallback))
        selectors.append((keys, fallback))

    if not default_subset:
        for path, policy in given:
            if policy is FallbackPolicy.DEFAULT_SUBSET:
                r.error(path, f"DEFAULT_SUBSET needs a non-empty {_DYNAMIC}.defaultSubset")

    cluster_fallback = declared
    if cluster_fallback is None and selectors:
        cluster_fallback = selectors[0][1]
    if cluster_fallback is None:
        cluster_fallback = FallbackPolicy.ANY_ENDPOINT
    return DestinationRule(
        name=name,
        namespace=namespace,
        host=host,
        selectors=tuple(
            SubsetSelector(keys, cluster_fallback if fb is None else fb) for keys, fb in selectors
        ),
        fallback_policy=cluster_fallback,
        default_subset=default_subset,
        source=source,
        outlier_detection=outlier,
    )


def _outlier_detection(r: _Reader, traffic: dict[str, Any]) -> OutlierDetection | None:
    section = r.section(traffic, "outlierDetection", _OUTLIER)
    if section is None:
        return None
    r.known_fields(section, _OUTLIER_FIELDS, _OUTLIER)
    return OutlierDetection(
        consecutive_5xx_errors=r.count(
            section, "consecutive5xxErrors", f"{_OUTLIER}.consecutive5xxErrors"
        ),
        consecutive_gateway_errors=r.count(
            section, "consecutiveGatewayErrors", f"{_OUTLIER}.consecutiveGatewayErrors"
        ),
        interval_ms=r.duration_ms(section, "interval", f"{_OUTLIER}.interval"),
        base_ejection_time_ms=r.duration_ms(
            section, "baseEjectionTime", f"{_OUTLIER}.baseEjectionTime"
        ),
        max_ejection_percent=r.percent(
            section, "maxEjectionPercent", f"{_OUTLIER}.maxEjectionPercent"
        ),
        min_health_percent=r.percent(section, "minHealthPercent", f"{_OUTLIER}.minHealthPercent")
        or 0,
    )


def _rest_port(r: _Reader, annotations: dict[str, Any]) -> int | None:
    value = annotations.get(REST_PORT_ANNOTATION)
    if value is None:
        return None
    # Kubernetes annotation values are strings; a bare YAML number is accepted too
    text = value if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    if text is not None and text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    r.error(
        f"metadata.annotations[{REST_PORT_ANNOTATION}]",
        f'expected a port number 1-65535 as a string (e.g. "8008"), got {_describe(value)}',
    )
    return None


def _virtual_service(
    r: _Reader,
    spec: dict[str, Any],
    name: str,
    namespace: str,
    source: str,
    rest_port: int | None = None,
) -> VirtualService:
    gateways = r.strings(spec, "gateways", "spec.gateways")
    hosts = r.strings(spec, "hosts", "spec.hosts")
    for host in hosts:
        if not _HOST_NAME.fullmatch(host):
            r.error(
                "spec.hosts",
                f"{host[:100]!r} is not a host name: it has a space or control character",
            )
    # Envoy matches hosts ignoring case, and refuses a virtual host naming one twice
    hosts = tuple(dict.fromkeys(host.lower() for host in hosts))
    routes: list[HttpRoute] = []
    items = r.items(
        spec, "http", "spec.http", required_because="modelxds serves only spec.http routes"
    )
    for i, item in enumerate(items):
        route = _http_route(r, item, f"spec.http[{i}]", default_name=f"http-{i}")
        if route is not None:
            routes.append(route)
    for i, route in enumerate(routes):
        if rest_port is not None and rest_port == route.destination_port:
            r.error(
                f"metadata.annotations[{REST_PORT_ANNOTATION}]",
                f"the REST port {rest_port} is spec.http[{i}]'s gRPC destination port; "
                "ModelMesh serves REST and gRPC on different ports",
            )
    return VirtualService(name, namespace, gateways, hosts, tuple(routes), source, rest_port)


def _http_route(r: _Reader, item: object, path: str, *, default_name: str) -> HttpRoute | None:
    route = r.mapping(item, path)
    if route is None:
        return None
    name = r.string(route, "name", f"{path}.name") or default_name

    ports: set[int] = set()
    for j, match_item in enumerate(
        r.items(route, "match", f"{path}.match", required_because=_PORT_WHY)
    ):
        match = r.mapping(match_item, f"{path}.match[{j}]")
        if match is not None:
            port = r.port(match, "port", f"{path}.match[{j}].port", required_because=_PORT_WHY)
            if port is not None:
                ports.add(port)

    header_keys: list[HeaderToKey] = []
    for j, entry_item in enumerate(
        r.items(
            route,
            "headerToDynamicSubsetKey",
            f"{path}.headerToDynamicSubsetKey",
            required_because="its first entry names the model key, which routing selects by "
            "(e.g. {header: model, key: modelmesh.asm.alibabacloud.com})",
        )
    ):
        entry_path = f"{path}.headerToDynamicSubsetKey[{j}]"
        entry = r.mapping(entry_item, entry_path)
        if entry is None:
            continue
        header = r.string(entry, "header", f"{entry_path}.header", required=True)
        key = r.string(entry, "key", f"{entry_path}.key", required=True)
        if header is None or key is None:
            continue
        if not _HEADER_NAME.fullmatch(header):
            r.error(
                f"{entry_path}.header",
                f"{header[:100]!r} is not an HTTP header name "
                "(letters, digits and !#$%&'*+-.^_`|~)",
            )
        taken = next((hk.header for hk in header_keys if hk.key == key), None)
        if taken is not None:
            r.error(f"{entry_path}.key", f"{key!r} is already taken from header {taken!r}")
        # HTTP/2 header names are lowercase on the wire.
        header_keys.append(HeaderToKey(header.lower(), key))

    host, port = "", None
    destinations = r.items(
        route, "route", f"{path}.route", required_because="give exactly one destination"
    )
    if len(destinations) > 1:
        r.error(
            f"{path}.route",
            f"{len(destinations)} destinations (weighted routing) are not supported; "
            "give exactly one",
        )
    elif destinations:
        host, port = _destination(r, destinations[0], f"{path}.route[0]")
    timeout = r.duration_ms(route, "timeout", f"{path}.timeout")
    retries = _retries(r, route, f"{path}.retries")
    return HttpRoute(name, tuple(sorted(ports)), tuple(header_keys), host, port, timeout, retries)


def _retries(r: _Reader, route: dict[str, Any], path: str) -> HttpRetry | None:
    section = r.section(route, "retries", path)
    if section is None:
        return None
    r.known_fields(section, _RETRY_FIELDS, path)
    attempts = r.count(section, "attempts", f"{path}.attempts", maximum=_INT32_MAX)
    if section.get("attempts") is None:
        attempts = 0  # Istio's attempts is a plain int32: absent is 0, no retries
    per_try = r.duration_ms(section, "perTryTimeout", f"{path}.perTryTimeout")
    # Istio keeps its default conditions for an empty retryOn as for none
    retry_on = None
    if section.get("retryOn") not in (None, ""):
        retry_on = _retry_on(r, section["retryOn"], f"{path}.retryOn")
    if attempts == 0 and (per_try is not None or retry_on is not None):
        # Istio's validation refuses this too: the other fields would silently not apply
        r.error(
            f"{path}.attempts",
            "0 (or absent) turns retries off; perTryTimeout and retryOn need attempts of 1 or more",
        )
    return HttpRetry(
        attempts=attempts or 0,
        per_try_timeout_ms=per_try,
        retry_on=None if retry_on is None else retry_on[0],
        retriable_status_codes=() if retry_on is None else retry_on[1],
    )


def _retry_on(
    r: _Reader, value: object, path: str
) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """``retryOn`` as Istio validates and translates it: comma-separated Envoy retry
    conditions and HTTP status codes; a status code is retried through
    ``retriable-status-codes``, which is added when only codes are given."""
    if not isinstance(value, str):
        r.error(path, f"expected a string such as 5xx,reset,503, got {_describe(value)}")
        return None
    conditions: list[str] = []
    codes: list[int] = []
    for token in value.split(","):
        if token.isascii() and token.isdigit():
            code = int(token) if len(token) <= 3 else 0
            if code in _STATUS_CODES:
                codes.append(code)
            else:
                r.error(path, f"{token[:100]} is not an HTTP status code")
        elif token in _RETRY_ON:
            conditions.append(token)
        else:
            # Istio splits at commas only: " reset" is no condition
            close = difflib.get_close_matches(token.strip(), _RETRY_ON, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            r.error(
                path,
                f"{token[:100]!r} is not a retry condition{hint}; Envoy's are "
                f"{', '.join(_RETRY_ON)}, or an HTTP status code, comma-separated without spaces",
            )
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return tuple(dict.fromkeys(conditions)), tuple(dict.fromkeys(codes))


def _destination(r: _Reader, item: object, path: str) -> tuple[str, int | None]:
    entry = r.mapping(item, path)
    destination = (
        r.section(entry, "destination", f"{path}.destination", required=True)
        if entry is not None
        else None
    )
    if destination is None:
        return "", None
    host = r.string(destination, "host", f"{path}.destination.host", required=True) or ""
    if "*" in host:
        r.error(f"{path}.destination.host", _NO_WILDCARD)
    if destination.get("subset") is not None:
        # Silently ignoring it would send traffic somewhere the user did not ask for.
        r.error(
            f"{path}.destination.subset",
            "named subsets are not supported; the subset is chosen per request "
            "from headerToDynamicSubsetKey",
        )
    port_spec = r.section(destination, "port", f"{path}.destination.port")
    port = None
    if port_spec is not None:
        port = r.port(
            port_spec,
            "number",
            f"{path}.destination.port.number",
            required_because="the Service port to send to",
        )
    return host, port


def _cross_check(docs: list[_Doc]) -> list[str]:
    """Problems that only show when documents are read together."""
    errors: list[str] = []
    first: dict[tuple[str, str, str], _Doc] = {}
    rules: dict[str, tuple[DestinationRule, str]] = {}
    services: list[tuple[VirtualService, str]] = []
    for doc in docs:
        obj = doc.obj
        if obj is None:
            continue
        identity = (doc.kind, obj.namespace, obj.name)
        if identity in first:
            errors.append(
                f"{doc.where}: metadata.name: duplicate {doc.kind} {obj.namespace}/{obj.name}, "
                f"first defined in {first[identity].where}"
            )
            continue
        first[identity] = doc
        if isinstance(obj, VirtualService):
            services.append((obj, doc.where))
            continue
        fqdn = resolve_host(obj.host, obj.namespace)
        if fqdn in rules:
            other_where = rules[fqdn][1]
            errors.append(
                f"{doc.where}: spec.host: {fqdn} already has a DestinationRule "
                f"({other_where}); give each host one rule"
            )
        else:
            rules[fqdn] = (obj, doc.where)

    # A listener port is one route table of one VirtualService, and a destination's
    # endpoints carry one set of model keys: anything else would overwrite silently.
    claims: dict[int, tuple[tuple[str, int | None, tuple[HeaderToKey, ...]], str, str]] = {}
    keys_of: dict[tuple[str, int | None], tuple[tuple[str, ...], str]] = {}
    for vs, where in services:
        for i, route in enumerate(vs.routes):
            at = f"{where}: spec.http[{i}]"
            fqdn = resolve_host(route.destination_host, vs.namespace)
            errors += _check_route_rule(at, route, fqdn, rules.get(fqdn))
            target = (fqdn, route.destination_port, route.header_keys)
            for port in route.ports:
                claimed, claimed_at, claimed_by = claims.setdefault(port, (target, at, where))
                if claimed[:2] != target[:2]:
                    errors.append(
                        f"{at}.match: port {port} is already routed to {_show(claimed)} by "
                        f"{claimed_at}; a listener port can have only one destination"
                    )
                elif claimed != target:
                    errors.append(
                        f"{at}.headerToDynamicSubsetKey: port {port} is already routed by "
                        f"{claimed_at} with a different headerToDynamicSubsetKey"
                    )
                elif claimed_by != where:
                    errors.append(
                        f"{at}.match: port {port} is already routed by {claimed_at}; one "
                        "listener port takes the hosts of one VirtualService"
                    )
            keys = tuple(dict.fromkeys(h.key for h in route.header_keys))
            seen, seen_at = keys_of.setdefault((fqdn, route.destination_port), (keys, at))
            if seen != keys:
                errors.append(
                    f"{at}.headerToDynamicSubsetKey: {_show(target)} is already routed by "
                    f"{seen_at} with the keys {', '.join(seen)}; its pods carry one set of "
                    "model keys, so every route to it must map to the same keys"
                )
    return errors


def _check_route_rule(
    at: str, route: HttpRoute, fqdn: str, found: tuple[DestinationRule, str] | None
) -> list[str]:
    if found is None:
        return [
            f"{at}.route[0].destination.host: no DestinationRule for "
            f"{route.destination_host!r} ({fqdn}); add one with {_DYNAMIC}"
        ]
    rule, rule_where = found
    if not rule.selectors:
        return [
            f"{at}.route[0].destination.host: the DestinationRule for {fqdn} ({rule_where}) "
            f"has no {_DYNAMIC}"
        ]
    return [
        f"{at}.headerToDynamicSubsetKey[{j}].key: {hk.key!r} is not a subset key of the "
        f"DestinationRule for {fqdn} ({rule_where}); its keys: {', '.join(rule.subset_keys)}"
        for j, hk in enumerate(route.header_keys)
        if hk.key not in rule.subset_keys
    ]


def _show(target: tuple[str, int | None, tuple[HeaderToKey, ...]]) -> str:
    host, port, _ = target
    return host if port is None else f"{host}:{port}"


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return repr(value)


class _Reader:
    """Reads the fields of one document, recording every bad one instead of stopping.

    Absent and null fields are the same thing: YAML writes ``key:`` for both.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{self.where}: {path}: {message}")

    def mapping(self, value: object, path: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.error(path, f"expected a mapping, got {_describe(value)}")
        return None

    def section(
        self, parent: dict[str, Any], key: str, path: str, *, required: bool = False
    ) -> dict[str, Any] | None:
        value = parent.get(key)
        if value is None:
            if required:
                self.error(path, "required")
            return None
        return self.mapping(value, path)

    def items(
        self, parent: dict[str, Any], key: str, path: str, *, required_because: str = ""
    ) -> list[Any]:
        """A list field; absent means empty unless `required_because` says why it may not be."""
        value = parent.get(key)
        if value is None or value == []:
            if required_because:
                self.error(path, f"required (a non-empty list): {required_because}")
            return []
        if isinstance(value, list):
            return value
        self.error(path, f"expected a list, got {_describe(value)}")
        return []

    def string(
        self, parent: dict[str, Any], key: str, path: str, *, required: bool = False
    ) -> str | None:
        value = parent.get(key)
        if value is None:
            if required:
                self.error(path, "required")
            return None
        return self._string(value, path)

    def strings(
        self, parent: dict[str, Any], key: str, path: str, *, required_because: str = ""
    ) -> tuple[str, ...]:
        """A list of non-empty strings, deduplicated in order."""
        values = [
            self._string(value, f"{path}[{i}]")
            for i, value in enumerate(
                self.items(parent, key, path, required_because=required_because)
            )
        ]
        return tuple(dict.fromkeys(v for v in values if v is not None))

    def string_map(
        self, parent: dict[str, Any], key: str, path: str
    ) -> tuple[tuple[str, str], ...]:
        """A mapping of string to string, as sorted pairs."""
        pairs: list[tuple[str, str]] = []
        for k, v in (self.section(parent, key, path) or {}).items():
            if not isinstance(k, str) or not k:
                self.error(path, f"keys must be non-empty strings, got {_describe(k)}")
            elif not isinstance(v, str):
                self.error(f"{path}.{k}", f"expected a string (quote it), got {_describe(v)}")
            elif self._encodable(k, path) and self._encodable(v, f"{path}.{k}"):
                pairs.append((k, v))
        return tuple(sorted(pairs))

    def fallback(self, parent: dict[str, Any], key: str, path: str) -> FallbackPolicy | None:
        value = parent.get(key)
        if value is None:
            return None
        if isinstance(value, str) and value in FallbackPolicy.__members__:
            return FallbackPolicy(value)
        allowed = ", ".join(p.value for p in FallbackPolicy)
        self.error(path, f"expected one of {allowed}, got {_describe(value)}")
        return None

    def known_fields(self, section: dict[str, Any], known: tuple[str, ...], path: str) -> None:
        for key in section:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                self.error(
                    f"{path}.{key}",
                    f"not a field modelxds reads; {hint}it reads {', '.join(known)}",
                )

    def count(
        self, parent: dict[str, Any], key: str, path: str, *, maximum: int = _UINT32_MAX
    ) -> int | None:
        """A non-negative integer, at most ``maximum`` (a protobuf uint32 by default)."""
        value = parent.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
            return value
        self.error(path, f"expected an integer 0-{maximum}, got {_describe(value)}")
        return None

    def percent(self, parent: dict[str, Any], key: str, path: str) -> int | None:
        value = parent.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
            return value
        self.error(path, f"expected an integer percentage 0-100, got {_describe(value)}")
        return None

    def duration_ms(self, parent: dict[str, Any], key: str, path: str) -> int | None:
        """An Istio duration (``500ms``, ``1.5s``, ``1m30s``), in milliseconds: Istio's
        validation takes whole milliseconds, at least 1 ms (``0s`` too is refused)."""
        value = parent.get(key)
        if value is None:
            return None
        # the length bound keeps numbers short enough for int() to parse
        if not (isinstance(value, str) and len(value) <= 40 and _DURATION.fullmatch(value)):
            self.error(
                path, f"expected a duration such as 500ms, 2s or 1m30s, got {_describe(value)}"
            )
            return None
        total = sum(
            Fraction(number) * _UNIT_MS[unit] for number, unit in _DURATION_PART.findall(value)
        )
        if total < 1:
            self.error(path, f"{value!r} is under 1ms, which Istio refuses: leave {key} out")
        elif total.denominator != 1:
            self.error(path, f"{value!r} is not a whole number of milliseconds")
        elif total > _DURATION_MAX_MS:
            self.error(path, f"{value!r} is longer than Istio takes (2562047h)")
        else:
            return int(total)
        return None

    def port(
        self, parent: dict[str, Any], key: str, path: str, *, required_because: str
    ) -> int | None:
        value = parent.get(key)
        if value is None:
            self.error(path, f"required: {required_because}")
            return None
        # bool is an int in Python, but `port: true` is certainly a mistake.
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
            return value
        self.error(path, f"expected an integer 1-65535, got {_describe(value)}")
        return None

    def _string(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and value:
            return value if self._encodable(value, path) else None
        self.error(path, f"expected a non-empty string, got {_describe(value)}")
        return None

    def _encodable(self, value: str, path: str) -> bool:
        """YAML and JSON escapes can write half of a surrogate pair (``"\\ud800"``),
        which no UTF-8 encoder takes: every push would fail on it."""
        if _SURROGATE.search(value) is None:
            return True
        self.error(path, f"{value[:100]!r} is not valid Unicode (a lone \\u surrogate escape)")
        return False
