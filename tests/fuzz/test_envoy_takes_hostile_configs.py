"""Hostile names that the policy loader and the etcd watcher accept make a config a real
Envoy takes, under both strategies and both REST modes: header names, hosts, subset keys,
namespaces, object names, durations and default subsets in the policy; model, vmodel and
instance ids and pod addresses in etcd. Whatever the loader or watcher lets through goes
to every gateway, and one resource Envoy refuses (a NACK) freezes that gateway's config.

Fifty cases, drawn from a fixed seed, are translated one by one and judged together, a
bootstrap per strategy and REST mode (`envoy --mode validate`, tests/static_bootstrap):
each case has its own listener, destination and REST ports, so their resources never
share a name. When Envoy refuses a batch, each case is judged alone to name the culprits.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from modelxds.kserve import descriptor_set_bytes
from modelxds.modelmesh import (
    InstanceRecord,
    LitelinksRecord,
    ModelRecord,
    Table,
    VModelRecord,
    encode,
)
from modelxds.placement.model import Placement
from modelxds.policy import Policy, PolicyError, parse_policy
from modelxds.policy.model import REST_PORT_ANNOTATION, resolve_host
from modelxds.xds.ir import Options, RestMode
from modelxds.xds.resources import ENDPOINT, ROUTE, Resources
from modelxds.xds.scale import MODEL_HEADER, SHARD_HEADER, ScaleStrategy
from modelxds.xds.subset import NO_PODS_HEADER, SubsetStrategy
from tests.fuzz import checks
from tests.fuzz.checks import LAYOUT, TRICKY_NAMES
from tests.static_bootstrap import envoy_refusal, static_bootstrap

CASES = 50
SEED = 13
OPTIONS = Options(descriptor_set=descriptor_set_bytes())
STRATEGIES: dict[str, Callable[[], Callable[[Placement, Policy, Options], Resources]]] = {
    "subset": SubsetStrategy,
    "scale": lambda: ScaleStrategy(shards=4),
}

# Any text at all: what a name in a policy or an etcd key may hold (YAML and JSON
# escapes can even write a lone surrogate, which no UTF-8 encoder takes)
ODD_CHARS = "aZ09.-_/:*?[](){}|\\^$+%@!#&'\"`~,;= \t\r\n\x00\x01\x1b\x7fü\u0301\u202e😀\ufeff\ud800"
# Header names the loader takes (RFC 9110 tokens), the gateway's own among them
HEADERS = [
    "model",
    "Model",
    "x-tenant",
    "mm-model-id",
    "mm-vmodel-id",
    "mm-balanced",
    ":authority",
    "x-gateway-destination-endpoint",
    MODEL_HEADER,
    SHARD_HEADER,
    NO_PODS_HEADER,
    "!#$%&'*+-.^_`|~",
    "x-" + "h" * 5000,
]
# VirtualService hosts: wildcards anywhere, ports, IPv6, unicode, case twins, long
DOMAINS = [
    "*",
    "*.example.com",
    "example.*",
    "a*b",
    "**",
    "[::1]",
    "[::1]:8008",
    "example.com:80",
    "ü.example",
    "EXAMPLE.com",
    "example.com",
    "d" * 300,
    "%2F",
    "a/b?c#d",
]
DURATIONS = ["1ms", "1.5s", "1m30s", "100000h", "99999999999h"]
RETRY_ON = ["5xx", "connect-failure,refused-stream,503", "unavailable,cancelled", "reset,429"]
POD_IPS = ["10.0.0.1", "100.96.35.150", "fd00::3", "[FD00::0001]", "fe80::1%eth0", "::ffff:1.2.3.4"]


def hostile(rng: random.Random) -> str:
    """A name from the tricky list, or random text of odd characters."""
    if rng.random() < 0.5:
        return rng.choice(TRICKY_NAMES)
    return "".join(rng.choice(ODD_CHARS) for _ in range(rng.randint(1, 24)))


def kube_name(rng: random.Random, *, dots: bool) -> str:
    """A name Kubernetes (and the loader) takes, at the edges of its form: one character,
    the longest label, digits first, dashes inside, dots between labels."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

    def label(size: int) -> str:
        inner = "".join(rng.choice(alphabet + "-") for _ in range(max(0, size - 2)))
        return (rng.choice(alphabet) + inner + rng.choice(alphabet))[:size]

    labels = [label(rng.choice([1, 2, 5, 63])) for _ in range(rng.randint(1, 3) if dots else 1)]
    return ".".join(labels)[:253]


@dataclasses.dataclass
class Case:
    index: int
    policy_text: str
    namespace: str  # the mesh the destination names
    events: list[tuple[bytes, bytes | None]]

    def show(self) -> str:
        return f"case {self.index}:\n{self.policy_text}\netcd: {self.events!r}"[:6000]


def policy_docs(rng: random.Random, index: int) -> list[dict[str, Any]]:
    """A DestinationRule and a VirtualService, every name in them drawn hostile (but their
    own names and namespace, which Kubernetes and the loader hold to its form), on ports
    only this case uses."""
    namespace, host = kube_name(rng, dots=False), hostile(rng)
    keys = [hostile(rng) for _ in range(rng.randint(1, 2))]
    headers = rng.sample(HEADERS, len(keys))
    # the model key alone (its own fallback), and every key together
    selectors = [{"keys": [keys[0]], "fallbackPolicy": rng.choice(["ANY_ENDPOINT", "NO_FALLBACK"])}]
    if len(keys) > 1:
        selectors.append({"keys": keys})
    dynamic: dict[str, Any] = {"subsetSelectors": selectors}
    fallback = rng.choice(["ANY_ENDPOINT", "NO_FALLBACK", "DEFAULT_SUBSET"])
    dynamic["fallbackPolicy"] = fallback
    if fallback == "DEFAULT_SUBSET":
        dynamic["defaultSubset"] = {rng.choice(keys): hostile(rng)}
    traffic: dict[str, Any] = {"loadBalancer": {"dynamicSubset": dynamic}}
    if rng.random() < 0.3:
        traffic["outlierDetection"] = {
            "consecutive5xxErrors": rng.choice([0, 1, 2**32 - 1]),
            "interval": rng.choice(DURATIONS),
            "baseEjectionTime": rng.choice(DURATIONS),
            "maxEjectionPercent": rng.choice([0, 100]),
        }
    route: dict[str, Any] = {
        "name": hostile(rng),
        "match": [{"port": 20000 + index}],
        "headerToDynamicSubsetKey": [
            {"header": h, "key": k} for h, k in zip(headers, keys, strict=True)
        ],
        "route": [{"destination": {"host": host, "port": {"number": 30000 + index}}}],
    }
    if rng.random() < 0.3:
        route["timeout"] = rng.choice(DURATIONS)
    if rng.random() < 0.3:
        route["retries"] = {
            "attempts": rng.choice([0, 3, 2**31 - 1]),
            "perTryTimeout": rng.choice(DURATIONS),
            "retryOn": rng.choice(RETRY_ON),
        }
    meta = {"namespace": namespace}
    return [
        {
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "DestinationRule",
            "metadata": {**meta, "name": kube_name(rng, dots=True)},
            "spec": {"host": host, "trafficPolicy": traffic},
        },
        {
            "apiVersion": "networking.istio.io/v1beta1",
            "kind": "VirtualService",
            "metadata": {
                **meta,
                "name": kube_name(rng, dots=True),
                "annotations": {REST_PORT_ANNOTATION: str(40000 + index)},
            },
            "spec": {"hosts": rng.sample(DOMAINS, rng.randint(1, 3)), "http": [route]},
        },
    ]


def etcd_events(rng: random.Random, models: list[str]) -> list[tuple[bytes, bytes | None]]:
    """Pods with hostile instance ids at odd addresses, ``models`` and hostile ones on
    them, and an InferenceService (vmodel) of a hostile name, as etcd puts them."""
    pods = [hostile(rng) for _ in range(rng.randint(1, 3))]
    events: list[tuple[bytes, bytes | None]] = []
    for n, iid in enumerate(pods):
        record = LitelinksRecord(rng.choice(POD_IPS), iid, 8080)
        events += [
            (_key(Table.INSTANCES, iid), encode(InstanceRecord(start_time=1))),
            (_key(Table.LITELINKS, f"pod-{n}_8080_1"), encode(record)),
        ]
    names = [*models, *(hostile(rng) for _ in range(rng.randint(1, 4)))]
    for model in names:
        held = {iid: 1 for iid in rng.sample(pods, rng.randint(1, len(pods)))}
        events.append((_key(Table.REGISTRY, model), encode(ModelRecord(instance_ids=held))))
    vmodel = VModelRecord(active_model=names[-1], target_model=names[-1])
    events.append((_key(Table.VMODELS, hostile(rng)), encode(vmodel)))
    return events


def _key(table: Table, item: str) -> bytes:
    return LAYOUT.key(table, item).encode("utf-8", "surrogatepass")


def accepted_cases(seed: int, count: int) -> Iterator[tuple[Case, Policy, Placement]]:
    """``count`` cases the loader accepts (it refuses most hostile drafts, with an error)."""
    rng = random.Random(seed)
    index = 0
    for _ in range(100 * count):
        docs = policy_docs(rng, index)
        text = yaml.safe_dump_all(docs)
        try:
            policy = parse_policy(text, checks.SOURCE)
        except PolicyError:
            continue
        (rule,) = policy.destination_rules
        namespace = resolve_host(rule.host, rule.namespace).split(".")[1]
        default = [v for _, v in rule.default_subset]
        events = etcd_events(rng, default)
        case = Case(index, text, namespace, events)
        yield case, policy, checks.check_etcd_events(events, namespace)
        index += 1
        if index == count:
            return
    raise AssertionError(f"the loader accepted only {index} of {100 * count} drafts")


def translated(
    cases: list[tuple[Case, Policy, Placement]], strategy: str, rest: RestMode
) -> Iterator[tuple[Case, Resources]]:
    options = dataclasses.replace(OPTIONS, rest=rest)
    for case, policy, placement in cases:
        yield case, STRATEGIES[strategy]()(placement, policy, options)


def merged(parts: list[Resources]) -> Resources:
    out: dict[str, dict[str, Any]] = {}
    for resources in parts:
        for type_url, named in resources.items():
            into = out.setdefault(type_url, {})
            clash = set(into) & set(named)
            assert not clash, f"two cases share resource names {clash}"
            into.update(named)
    return out


@pytest.fixture(scope="module")
def cases() -> list[tuple[Case, Policy, Placement]]:
    drawn = list(accepted_cases(SEED, CASES))
    for _, policy, placement in drawn:
        # the translations' own promises first: pods' addresses only, the gateway's
        # headers set over the client's
        checks.check_translations(placement, policy)
    return drawn


@pytest.mark.parametrize("rest", list(RestMode), ids=lambda r: r.value)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_envoy_takes_every_config_made_from_hostile_names_the_loader_accepts(
    cases: list[tuple[Case, Policy, Placement]], strategy: str, rest: RestMode, tmp_path: Path
) -> None:
    each = list(translated(cases, strategy, rest))
    refusal = envoy_refusal(static_bootstrap(merged([r for _, r in each])), tmp_path)
    if refusal is None:
        return
    # name the cases Envoy refuses, one Envoy each
    culprits = [
        f"{case.show()}\nenvoy: {why}"
        for case, resources in each
        if (why := envoy_refusal(static_bootstrap(resources), tmp_path)) is not None
    ]
    raise AssertionError("\n\n".join(culprits) or f"only the batch is refused: {refusal}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_the_envoy_check_sees_every_route_table_and_endpoint(
    cases: list[tuple[Case, Policy, Placement]], strategy: str, tmp_path: Path
) -> None:
    """What validate mode would never fetch is inline, so Envoy judges it: a route table
    (RDS, or SRDS and RDS) naming a domain twice, an endpoint (EDS) by host name."""
    _, policy, placement = cases[0]
    resources = STRATEGIES[strategy]()(placement, policy, OPTIONS)
    for table in resources[ROUTE].values():
        assert isinstance(table, route_pb2.RouteConfiguration)
        table.virtual_hosts[0].domains.extend(["twice.example", "twice.example"])
    refusal = envoy_refusal(static_bootstrap(resources), tmp_path)
    assert refusal is not None and "twice.example" in refusal, refusal

    resources = STRATEGIES[strategy]()(placement, policy, OPTIONS)
    for cla in resources[ENDPOINT].values():
        assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
        cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address.address = "pod.local"
    refusal = envoy_refusal(static_bootstrap(resources), tmp_path)
    assert refusal is not None and "pod.local" in refusal, refusal
