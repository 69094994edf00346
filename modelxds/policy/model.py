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

    @property
    def subset_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(key for s in self.selectors for key in s.keys))


@dataclass(frozen=True, slots=True)
class HeaderToKey:
    header: str
    key: str


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str
    ports: tuple[int, ...]
    header_keys: tuple[HeaderToKey, ...]
    destination_host: str
    destination_port: int | None


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
