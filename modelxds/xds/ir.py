"""What the gateways must do, before any strategy turns it into Envoy resources.

Every strategy reads the policy and the placement through this: a ``Destination``
per VirtualService route (listeners, the headers that name the model, the service's
pods and which of them hold each model, what to do on a miss), and the ``Options``
that are not part of the policy.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from modelxds.placement.model import MeshPlacement, Placement
from modelxds.policy import DestinationRule, FallbackPolicy, Policy
from modelxds.policy.model import HeaderToKey, HttpRetry, resolve_host
from modelxds.xds.resources import Resources


class RestMode(enum.Enum):
    """How the gateway serves KServe V2 REST (HTTP/1.1, JSON) requests."""

    # to the REST proxy of the holder (ModelMesh Serving runs one on every pod, :8008),
    # which takes both JSON forms of the V2 protocol
    PROXY = "proxy"
    # transcoded to gRPC by the gateway, for meshes without the REST proxy; only the
    # protobuf JSON ``contents`` form maps onto the gRPC message
    TRANSCODE = "transcode"


@dataclass(frozen=True, slots=True)
class Options:
    """Knobs that are not part of the routing policy."""

    descriptor_set: bytes  # KServe V2 proto descriptors for the REST -> gRPC transcoder
    listen_address: str = "0.0.0.0"
    default_port: int = 8033  # ModelMesh's gRPC inference port when the VS names none
    rest: RestMode = RestMode.PROXY
    rest_port: int = 8008  # the pods' REST proxy port when the VS names none
    connect_timeout_ms: int = 1000
    # Envoy batches metadata-only endpoint updates for this long (default 1 s);
    # small, so a new copy takes traffic soon after it appears in etcd.
    update_merge_window_ms: int = 50


@dataclass(frozen=True, slots=True)
class Destination:
    """One VirtualService route: requests on ``listen_ports`` name a model in
    ``headers`` (or the REST path); they go to a pod of ``fqdn`` that holds it
    (``mesh.routes``), else as ``rule`` falls back."""

    virtual_host: str  # "<namespace>/<name>" of the VirtualService
    domains: tuple[str, ...]
    listen_ports: tuple[int, ...]
    # request header -> subset key, as the VirtualService maps them; the first key is
    # the model key, which ModelMesh's own headers and the REST path also feed
    headers: tuple[HeaderToKey, ...]
    rule: DestinationRule
    fqdn: str
    port: int  # the pods' gRPC port
    rest_port: int | None  # the pods' REST proxy port; None: REST is transcoded to gRPC
    mesh: MeshPlacement
    timeout_ms: int | None = None  # the route's timeout; None: none
    retries: HttpRetry | None = None  # the route's retries; None: the gateway's default

    @property
    def namespace(self) -> str:
        return self.fqdn.split(".")[1]

    @property
    def model_key(self) -> str:
        return self.headers[0].key

    @property
    def keys(self) -> tuple[str, ...]:
        """Subset keys that carry the model: those the VirtualService maps headers to."""
        return tuple(dict.fromkeys(h.key for h in self.headers))

    @property
    def model_miss(self) -> FallbackPolicy:
        """The fallback for a model no pod has: Envoy uses the selector whose keys are
        exactly the request's (the model key), else the rule's own fallback."""
        return next(
            (s.fallback_policy for s in self.rule.selectors if s.keys == (self.model_key,)),
            self.rule.fallback_policy,
        )

    def default_subset_pods(self) -> list[str]:
        """Pods a ``defaultSubset`` fallback sends to: every key of it is a model key
        and the pod holds the value (as the subset load balancer reads pod metadata)."""
        keys = set(self.keys)
        pods = set(self.mesh.instances)
        for key, value in self.rule.default_subset:
            pods &= set(self.mesh.routable(value)) if key in keys else set()
        return sorted(pods)


def destinations(placement: Placement, policy: Policy, options: Options) -> Iterator[Destination]:
    """Every routed destination, in policy order."""
    for vs in policy.virtual_services:
        for http in vs.routes:
            rule = policy.destination_rule_for(http.destination_host, vs.namespace)
            if rule is None:  # the policy loader rejects this; skip rather than crash
                continue
            fqdn = resolve_host(http.destination_host, vs.namespace)
            namespace = fqdn.split(".")[1]
            yield Destination(
                virtual_host=f"{vs.namespace}/{vs.name}",
                domains=vs.hosts or ("*",),
                listen_ports=http.ports,
                headers=http.header_keys,
                rule=rule,
                fqdn=fqdn,
                port=http.destination_port or options.default_port,
                rest_port=(
                    (vs.rest_port or options.rest_port) if options.rest is RestMode.PROXY else None
                ),
                mesh=placement.meshes.get(namespace, MeshPlacement(namespace)),
                timeout_ms=http.timeout_ms,
                retries=http.retries,
            )


# A translator: placement + policy -> Envoy resources by type URL and name. The same
# input gives the same bytes; a strategy object may keep what it built last to build
# the next one faster, never to build it differently.
Strategy = Callable[[Placement, Policy, Options], Resources]
