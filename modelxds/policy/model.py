"""The routing policy as plain values: what modelxds reads from DestinationRule and
VirtualService documents.

Every object keeps a `source` (``file#document``) so that later stages can point users
back at the YAML that produced it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# A VirtualService annotation: the port of the REST proxy beside each pod's gRPC port
# (ModelMesh Serving's rest-proxy listens on 8008). Istio has no field for it, and the
# seed's `spec` must stay as ASM users write it.
REST_PORT_ANNOTATION = "modelxds.io/rest-port"


class FallbackPolicy(enum.Enum):
    """What Envoy does when no endpoint carries the requested subset values."""

    ANY_ENDPOINT = "ANY_ENDPOINT"
    NO_FALLBACK = "NO_FALLBACK"
    DEFAULT_SUBSET = "DEFAULT_SUBSET"


@dataclass(frozen=True, slots=True)
class SubsetSelector:
    keys: tuple[str, ...]
    fallback_policy: FallbackPolicy


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """``trafficPolicy.outlierDetection`` in Istio's fields: a pod answering errors (or
    not at all, past the per-try timeout) is ejected from the load balancer for a while.
    None: Envoy's default for that field."""

    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    interval_ms: int | None = None
    base_ejection_time_ms: int | None = None
    max_ejection_percent: int | None = None
    # below this share of healthy pods the balancer ignores health (Envoy's panic
    # threshold); Istio's default 0 never does
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class DestinationRule:
    name: str
    namespace: str
    host: str
    # Empty when the rule has no dynamicSubset: such a rule is valid on its own, but no
    # VirtualService may route to it.
    selectors: tuple[SubsetSelector, ...]
    fallback_policy: FallbackPolicy
    default_subset: tuple[tuple[str, str], ...]
    source: str
    outlier_detection: OutlierDetection | None = None

    @property
    def subset_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(key for s in self.selectors for key in s.keys))


@dataclass(frozen=True, slots=True)
class HeaderToKey:
    header: str
    key: str


@dataclass(frozen=True, slots=True)
class HttpRetry:
    """``http[].retries`` in Istio's fields. ``attempts`` 0 turns retries off; no
    ``retryOn`` keeps the gateway's default conditions."""

    attempts: int
    per_try_timeout_ms: int | None = None
    # Envoy retry_on conditions; status codes given in retryOn go to retriable_status_codes
    retry_on: tuple[str, ...] | None = None
    retriable_status_codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str
    ports: tuple[int, ...]
    header_keys: tuple[HeaderToKey, ...]
    destination_host: str
    destination_port: int | None
    timeout_ms: int | None = None  # ``http[].timeout``; None: no timeout (model loads take minutes)
    retries: HttpRetry | None = None  # None: the gateway's default retries


@dataclass(frozen=True, slots=True)
class VirtualService:
    name: str
    namespace: str
    gateways: tuple[str, ...]
    hosts: tuple[str, ...]
    routes: tuple[HttpRoute, ...]
    source: str
    # the pods' REST proxy port (annotation REST_PORT_ANNOTATION); None: the gateway's default
    rest_port: int | None = None


def resolve_host(host: str, namespace: str) -> str:
    """Fully qualify a Kubernetes service host the way Istio users write them.

    ``svc``, ``svc.ns``, ``svc.ns.svc`` and ``svc.ns.svc.cluster.local`` all name the same
    Service; a bare ``svc`` is relative to `namespace`. Only the default cluster domain
    is known.
    """
    host = host.lower().rstrip(".")
    labels = host.split(".")
    if len(labels) == 1:
        return f"{host}.{namespace}.svc.cluster.local"
    if len(labels) == 2:
        return f"{host}.svc.cluster.local"
    if len(labels) == 3 and labels[2] == "svc":
        return f"{host}.cluster.local"
    return host


@dataclass(frozen=True, slots=True)
class Policy:
    destination_rules: tuple[DestinationRule, ...]
    virtual_services: tuple[VirtualService, ...]

    def destination_rule_for(self, host: str, namespace: str) -> DestinationRule | None:
        """The rule for `host` as written in a resource living in `namespace`."""
        wanted = resolve_host(host, namespace)
        for rule in self.destination_rules:
            if resolve_host(rule.host, rule.namespace) == wanted:
                return rule
        return None

    def ports(self) -> tuple[int, ...]:
        """Every listener port the gateway must open."""
        return tuple(
            sorted({p for vs in self.virtual_services for r in vs.routes for p in r.ports})
        )
