"""`modelxds inspect`: where a gateway sends each model, read from its Envoy admin API,
and where the live placement says it should go.

The reader follows what Envoy itself follows for a request, in ``/config_dump?include_eds``:
listener -> connection manager -> route table (``rds``), or scope -> route table
(``scoped_routes``) -> cluster -> endpoints. So it reads both strategies:

* ``subset``: a route names one cluster with a subset load balancer; a name's pods are
  the endpoints whose ``envoy.lb`` metadata lists it under a selector key, and the
  cluster's fallback policy takes any other name.
* ``scale``: the scope of a name's shard (``shard_of``) names its table, whose matcher
  maps the name to a route over pod clusters (their priority-0 endpoint is the pod),
  and ``on_no_match`` is the fallback.

Pods are known by the endpoint ``hostname``, which both strategies set to the ModelMesh
instance id, so the gateway's view compares with ``MeshPlacement.routes`` directly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from modelxds.placement.model import Copies, Placement
from modelxds.policy import Policy
from modelxds.xds.builders import LB_NAMESPACE
from modelxds.xds.ir import Options, destinations
from modelxds.xds.scale import shard_of, shard_prefix

Json = dict[str, Any]

_HCM = "envoy.filters.network.http_connection_manager"
# the counters each strategy's clusters keep that say how requests were routed
SUBSET_COUNTERS = ("lb_subsets_active", "lb_subsets_selected", "lb_subsets_fallback")
REQUESTS = "upstream_rq_total"
_STATS_FILTER = rf"^cluster\..*\.({'|'.join((*SUBSET_COUNTERS, REQUESTS))})$"


class AdminError(Exception):
    """The gateway's admin API could not be read."""


@dataclass(frozen=True, slots=True)
class Pod:
    instance: str  # the endpoint hostname: the ModelMesh instance id
    address: str  # host:port Envoy connects to


@dataclass(frozen=True, slots=True)
class Fallback:
    """Where a request goes for a name no route or subset holds: ``policy`` as the
    DestinationRule says it; ``status`` when the gateway answers it itself."""

    policy: str
    pods: tuple[Pod, ...] = ()
    status: int | None = None
    # scale: the clusters it sends to (subset: the routes' own cluster, its subsets aside)
    clusters: tuple[str, ...] = ()


@dataclass(slots=True)
class PortRoutes:
    """One listener port and protocol (``grpc``, or ``rest`` to the pods' REST proxy)."""

    port: int
    protocol: str
    names: dict[str, tuple[Pod, ...]]
    fallback: Fallback
    # clusters these routes send to -> Envoy's counters of them (filled by add_counters)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    # scale: names in a table other than their shard's, which no request reaches
    unreachable: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Drift:
    """A name routable to a pod in etcd (``in_etcd``) or in Envoy, but not both."""

    name: str
    pod: str
    port: int
    protocol: str
    in_etcd: bool


# -- reading Envoy's admin API ----------------------------------------------------------


def admin_url(admin: str) -> str:
    """``http://HOST:PORT`` (a bare ``HOST:PORT`` is taken as http)."""
    return admin.rstrip("/") if "://" in admin else f"http://{admin.rstrip('/')}"


def fetch(admin: str, path: str, timeout: float = 10.0) -> bytes:
    url = admin_url(admin) + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as e:
        raise AdminError(f"{url} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminError(f"cannot reach Envoy admin at {admin_url(admin)}: {reason}") from None


def read_gateway(admin: str, timeout: float = 10.0) -> tuple[str, list[PortRoutes]]:
    """The gateway's strategy and routes, with the counters of the clusters they send to."""
    try:
        dump = json.loads(fetch(admin, "/config_dump?include_eds", timeout))
        stats = json.loads(
            fetch(admin, "/stats?format=json&filter=" + urllib.parse.quote(_STATS_FILTER), timeout)
        )
    except ValueError as e:
        raise AdminError(f"{admin_url(admin)} did not answer JSON: {e}") from None
    routes = read_config_dump(dump)
    add_counters(routes, stats)
    return strategy_of(dump), routes


# -- the config dump -------------------------------------------------------------------


@dataclass
class _Dump:
    """The parts of a config dump routing follows, by name."""

    clusters: dict[str, Json] = field(default_factory=dict)
    endpoints: dict[str, Json] = field(default_factory=dict)  # cluster -> assignment
    routes: dict[str, Json] = field(default_factory=dict)
    scopes: dict[str, dict[str, str]] = field(default_factory=dict)  # -> key -> table
    listeners: list[Json] = field(default_factory=list)

    @classmethod
    def of(cls, dump: Json) -> _Dump:
        out = cls()
        configs = {c.get("@type", "").rsplit(".", 1)[-1]: c for c in dump.get("configs", [])}
        clusters = configs.get("ClustersConfigDump", {})
        for c in [
            *clusters.get("static_clusters", []),
            *clusters.get("dynamic_active_clusters", []),
        ]:
            cluster = c.get("cluster", {})
            out.clusters[cluster.get("name", "")] = cluster
            if "load_assignment" in cluster:  # STATIC; include_eds lists it too
                out.endpoints[cluster["name"]] = cluster["load_assignment"]
        eds = configs.get("EndpointsConfigDump", {})
        for e in [
            *eds.get("static_endpoint_configs", []),
            *eds.get("dynamic_endpoint_configs", []),
        ]:
            cla = e.get("endpoint_config", {})
            out.endpoints[cla.get("cluster_name", "")] = cla
        rds = configs.get("RoutesConfigDump", {})
        for r in [*rds.get("static_route_configs", []), *rds.get("dynamic_route_configs", [])]:
            table = r.get("route_config", {})
            out.routes[table.get("name", "")] = table
        srds = configs.get("ScopedRoutesConfigDump", {})
        for s in [
            *srds.get("inline_scoped_route_configs", []),
            *srds.get("dynamic_scoped_route_configs", []),
        ]:
            out.scopes[s.get("name", "")] = {
                "".join(
                    f.get("string_key", "") for f in scope.get("key", {}).get("fragments", [])
                ): (scope.get("route_configuration_name", ""))
                for scope in s.get("scoped_route_configs", [])
            }
        lds = configs.get("ListenersConfigDump", {})
        for lis in lds.get("static_listeners", []):
            out.listeners.append(lis.get("listener", {}))
        for lis in lds.get("dynamic_listeners", []):
            if "active_state" in lis:  # a warming listener serves nothing yet
                out.listeners.append(lis["active_state"].get("listener", {}))
        return out

    def pods(self, cluster: str, *, priority: int | None = None) -> tuple[Pod, ...]:
        """The cluster's endpoints (only ``priority`` if given), sorted by instance id."""
        out: list[Pod] = []
        for group in self.endpoints.get(cluster, {}).get("endpoints", []):
            if priority is not None and group.get("priority", 0) != priority:
                continue
            out.extend(_pod(ep) for ep in group.get("lb_endpoints", []))
        return tuple(sorted(out, key=lambda p: p.instance))


def _pod(lb_endpoint: Json) -> Pod:
    endpoint = lb_endpoint.get("endpoint", {})
    sock = endpoint.get("address", {}).get("socket_address", {})
    address = f"{sock.get('address', '')}:{sock.get('port_value', 0)}"
    return Pod(endpoint.get("hostname") or address, address)


def read_config_dump(dump: Json) -> list[PortRoutes]:
    """Every listener port's routes, for both strategies, by port and protocol."""
    d = _Dump.of(dump)
    out: list[PortRoutes] = []
    for listener in d.listeners:
        port = int(listener.get("address", {}).get("socket_address", {}).get("port_value", 0))
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                if f.get("name") != _HCM:
                    continue
                hcm = f.get("typed_config", {})
                if "rds" in hcm:
                    out.extend(_rds_routes(d, port, d.routes.get(hcm["rds"]["route_config_name"])))
                elif "scoped_routes" in hcm:
                    scopes = d.scopes.get(hcm["scoped_routes"].get("name", ""), {})
                    out.extend(_scoped_routes(d, port, scopes))
    return sorted(out, key=lambda r: (r.port, r.protocol))


def strategy_of(dump: Json) -> str:
    """``scale`` when the gateway holds route scopes, else ``subset``."""
    for c in dump.get("configs", []):
        scoped = c.get("dynamic_scoped_route_configs") or c.get("inline_scoped_route_configs")
        if c.get("@type", "").endswith(".ScopedRoutesConfigDump") and scoped:
            return "scale"
    return "subset"


def _rds_routes(d: _Dump, port: int, table: Json | None) -> list[PortRoutes]:
    """The subset strategy: the first route to a cluster per protocol, as Envoy matches."""
    seen: dict[str, PortRoutes] = {}
    for vhost in (table or {}).get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            cluster = route.get("route", {}).get("cluster")
            protocol = "grpc" if "grpc" in route.get("match", {}) else "rest"
            if cluster is None or protocol in seen:
                continue
            seen[protocol] = _subset_cluster(d, port, protocol, cluster)
    return list(seen.values())


def _subset_cluster(d: _Dump, port: int, protocol: str, cluster: str) -> PortRoutes:
    config = d.clusters.get(cluster, {}).get("lb_subset_config")
    everyone = d.pods(cluster)
    if config is None:  # not model-aware: every request goes to any pod
        return PortRoutes(port, protocol, {}, Fallback("ANY_ENDPOINT", everyone), _zero([cluster]))
    keys = [k for s in config.get("subset_selectors", []) for k in s.get("keys", [])]
    names: dict[str, list[Pod]] = {}
    default_subset = config.get("default_subset", {})
    in_default: list[Pod] = []
    for group in d.endpoints.get(cluster, {}).get("endpoints", []):
        for ep in group.get("lb_endpoints", []):
            lb = ep.get("metadata", {}).get("filter_metadata", {}).get(LB_NAMESPACE, {})
            pod = _pod(ep)
            for name in dict.fromkeys(n for k in keys for n in _listed(lb.get(k))):
                names.setdefault(name, []).append(pod)
            if default_subset and all(v in _listed(lb.get(k)) for k, v in default_subset.items()):
                in_default.append(pod)
    # a selector's own policy wins over the cluster's; absent means NO_FALLBACK (0)
    selectors = [
        s.get("fallback_policy", "NOT_DEFINED") for s in config.get("subset_selectors", [])
    ]
    policy = next((p for p in selectors if p != "NOT_DEFINED"), None)
    policy = policy or config.get("fallback_policy", "NO_FALLBACK")
    fallback_pods = {"ANY_ENDPOINT": everyone, "DEFAULT_SUBSET": tuple(in_default)}
    return PortRoutes(
        port,
        protocol,
        {n: tuple(sorted(p, key=lambda p: p.instance)) for n, p in sorted(names.items())},
        Fallback(policy, fallback_pods.get(policy, ())),
        _zero([cluster], SUBSET_COUNTERS),
    )


def _listed(value: object) -> list[str]:
    """Metadata value as ``list_as_any`` reads it: a list is each of its elements."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _scoped_routes(d: _Dump, port: int, scopes: Mapping[str, str]) -> list[PortRoutes]:
    """The scale strategy: per protocol, the shards' tables under the listener's prefix."""
    out = []
    for protocol, rest in (("grpc", False), ("rest", True)):
        prefix = shard_prefix(port, rest=rest)
        tables = {
            int(key[len(prefix) :]): table
            for key, table in scopes.items()
            if key.startswith(prefix) and key[len(prefix) :].isdigit()
        }
        if not tables:  # REST transcoded to gRPC takes the gRPC tables
            continue
        routes = PortRoutes(port, protocol, {}, Fallback("NO_FALLBACK"))
        for shard, name in sorted(tables.items()):
            for vhost in d.routes.get(name, {}).get("virtual_hosts", []):
                matcher = vhost.get("matcher", {})
                entries = matcher.get("matcher_tree", {}).get("exact_match_map", {}).get("map", {})
                for model, on_match in entries.items():
                    if shard_of(model, len(tables)) != shard:
                        routes.unreachable.append(model)
                        continue
                    clusters = _route_clusters(on_match)
                    routes.counters.update(_zero(clusters))
                    pods = {p for c in clusters for p in d.pods(c, priority=0)}
                    routes.names[model] = tuple(sorted(pods, key=lambda p: p.instance))
                if "on_no_match" in matcher and shard == 0:
                    routes.fallback = _scale_fallback(d, matcher["on_no_match"])
                    routes.counters.update(_zero(routes.fallback.clusters))
        routes.names = dict(sorted(routes.names.items()))
        out.append(routes)
    return out


def _route_clusters(on_match: Json) -> list[str]:
    action = on_match.get("action", {}).get("typed_config", {}).get("route", {})
    if "cluster" in action:
        return [action["cluster"]]
    return [c["name"] for c in action.get("weighted_clusters", {}).get("clusters", [])]


def _scale_fallback(d: _Dump, on_no_match: Json) -> Fallback:
    route = on_no_match.get("action", {}).get("typed_config", {})
    if "direct_response" in route:
        return Fallback("NO_FALLBACK", status=int(route["direct_response"].get("status", 0)))
    clusters = _route_clusters(on_no_match)
    # the service's cluster of every pod (EDS) is ANY_ENDPOINT; pod clusters a default subset
    if len(clusters) == 1 and d.clusters.get(clusters[0], {}).get("type") == "EDS":
        return Fallback("ANY_ENDPOINT", d.pods(clusters[0]), clusters=tuple(clusters))
    pods = {p for c in clusters for p in d.pods(c, priority=0)}
    return Fallback(
        "DEFAULT_SUBSET", tuple(sorted(pods, key=lambda p: p.instance)), clusters=tuple(clusters)
    )


def _zero(clusters: Iterable[str], extra: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """The counters to read of each cluster: its requests, and ``extra``."""
    return {c: dict.fromkeys((*extra, REQUESTS), 0) for c in clusters}


def add_counters(routes: Iterable[PortRoutes], stats: Json) -> None:
    """Fill each route set's cluster counters from ``/stats?format=json``. Envoy's stat
    names write a cluster name's ``:`` as ``_``."""
    values: dict[str, int] = {}
    for s in stats.get("stats", []):
        if isinstance(s.get("value"), int):
            values[s["name"]] = s["value"]
    for r in routes:
        for cluster, counters in r.counters.items():
            stat = cluster.replace(":", "_")
            for counter in counters:
                counters[counter] = values.get(f"cluster.{stat}.{counter}", 0)


# -- against the placement ---------------------------------------------------------------


def find_drift(
    routes: Iterable[PortRoutes], placement: Placement, policy: Policy, model: str | None = None
) -> list[Drift]:
    """Every (name, pod) the placement routes on a listener port the policy routes, that
    the gateway's routes for that port do not, and the reverse; only ``model`` if given.
    A port the policy routes but the gateway has no listener for counts as routing nothing."""
    by_port: dict[int, list[PortRoutes]] = {}
    for r in routes:
        by_port.setdefault(r.port, []).append(r)
    out: list[Drift] = []
    for dest in destinations(placement, policy, Options(descriptor_set=b"")):
        expected = dest.mesh.routes
        for port in dest.listen_ports:
            for r in by_port.get(port) or [PortRoutes(port, "grpc", {}, Fallback("NO_FALLBACK"))]:
                names = {*expected, *r.names} if model is None else {model}
                for name in sorted(names):
                    want = set(expected.get(name, ()))
                    got = {p.instance for p in r.names.get(name, ())}
                    out.extend(
                        Drift(name, pod, port, r.protocol, in_etcd=pod in want)
                        for pod in sorted(want ^ got)
                    )
    return out


def holders_report(placement: Placement, name: str) -> dict[str, Any]:
    """``modelxds placement --model``: per namespace, the copies of ``name`` (a model id,
    or an InferenceService's active model) and the pods a request for it goes to."""
    out: dict[str, Any] = {}
    for ns, mesh in placement.meshes.items():
        entry: dict[str, Any] = {}
        model = name
        vmodel = mesh.vmodels.get(name)
        if name not in mesh.models and vmodel is not None:
            entry["inference_service"] = {
                "active": vmodel.active,
                "target": vmodel.target,
                "state": vmodel.transition.value,
            }
            model = vmodel.active
        if model not in mesh.models and vmodel is None:
            continue
        copies = mesh.models.get(model) or Copies()
        entry["model"] = model
        entry["copies"] = {k: list(getattr(copies, k)) for k in Copies._fields}
        entry["routable"] = {
            iid: mesh.instances[iid].host for iid in mesh.routable(name) if iid in mesh.instances
        }
        out[ns] = entry
    return out


def format_holders(name: str, report: Mapping[str, Any]) -> str:
    lines = []
    for ns, e in report.items():
        lines.append(f"namespace {ns}: {name}")
        isvc = e.get("inference_service")
        if isvc:
            lines.append(
                f"  InferenceService: active {isvc['active']}, target {isvc['target']} "
                f"({isvc['state']})"
            )
        for kind, pods in e["copies"].items():
            if pods:
                lines.append(f"  {kind:<8} {', '.join(pods)}  (model {e['model']})")
        routed = ", ".join(f"{i} {h}" for i, h in e["routable"].items())
        lines.append(f"  routable {routed or '- (no pod: requests fall back)'}")
    return "\n".join(lines)


# -- output ----------------------------------------------------------------------------


def report(
    strategy: str,
    routes: list[PortRoutes],
    model: str | None = None,
    drift: list[Drift] | None = None,
) -> dict[str, Any]:
    """What ``inspect --json`` prints; ``drift`` is None when not compared with etcd."""
    sets = []
    for r in routes:
        doc = asdict(r)
        if model is not None:
            doc["names"] = {model: [asdict(p) for p in r.names.get(model, ())]}
        sets.append(doc)
    out: dict[str, Any] = {"strategy": strategy, "routes": sets}
    if drift is not None:
        out["drift"] = [asdict(x) for x in drift]
    return out


def format_report(admin: str, doc: Mapping[str, Any]) -> str:
    lines = [f"gateway {admin_url(admin)}: strategy {doc['strategy']}"]
    for r in doc["routes"]:
        fb = r["fallback"]
        where = f"answers {fb['status']}" if fb["status"] else f"{len(fb['pods'])} pods"
        lines.append(
            f"\nport {r['port']} {r['protocol']}: names {len(r['names'])}; "
            f"no holder: {fb['policy']} ({where}); {_counters_line(r)}"
        )
        width = max([len(n) for n in r["names"]] + [4])
        lines.append(f"  {'NAME':<{width}}  PODS")
        for name, pods in r["names"].items():
            shown = ", ".join(f"{p['instance']} {p['address']}" for p in pods)
            if not pods:
                shown = f"no holder: {fb['policy']} ({where})"
            lines.append(f"  {name:<{width}}  {shown}")
        for name in r["unreachable"]:
            lines.append(f"  {name:<{width}}  UNREACHABLE: in another shard's table")
    if "drift" in doc:
        drift = doc["drift"]
        lines.append(f"\ndrift against etcd: {len(drift) or 'none'}")
        for x in drift:
            where = (
                "routable in etcd, Envoy does not send it"
                if x["in_etcd"]
                else ("Envoy sends it, not routable in etcd")
            )
            lines.append(f"  {x['name']}  {x['pod']}  port {x['port']} {x['protocol']}: {where}")
    return "\n".join(lines)


def _counters_line(routes: Mapping[str, Any]) -> str:
    """Envoy's counters of a route set's clusters, summed; under scale the fallback's
    cluster apart, as its requests are the ones no route took."""
    fallback = set(routes["fallback"]["clusters"])
    total: dict[str, int] = {}
    for cluster, values in routes["counters"].items():
        for k, v in values.items():
            key = f"fallback {k}" if cluster in fallback else k
            total[key] = total.get(key, 0) + v
    ordered = sorted(total.items(), key=lambda kv: kv[0].startswith("fallback "))
    return ", ".join(f"{k}={v}" for k, v in ordered) or "no counters"
