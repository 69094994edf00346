"""Where a fresh Envoy's first-config time goes: one built config, served to a fresh Envoy
several times, as built and with route tables edited, alternating.

    python -m modelxds.bench.firstconfig --size 100000x500 --variants served,one-cluster,served \\
        --out bench-results/first-config.json

Variants: ``served`` (what the scale strategy builds), ``one-cluster`` (each route to its
first holder's cluster instead of a weighted split over every holder), ``no-retry`` (the
virtual hosts without their retry policy). Each run is from starting Envoy to its ACK of
every type, process start included, as `bench.scale`'s "fresh Envoy".
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2

from modelxds.bench.common import ads_server, machine, write_result
from modelxds.bench.scale import World, _acked, _rss_mb
from modelxds.localmesh import processes
from modelxds.xds.bootstrap import bootstrap
from modelxds.xds.resources import PUSH_ORDER, ROUTE, Resources


def _one_cluster(route: route_components_pb2.Route) -> None:
    if route.route.HasField("weighted_clusters"):
        first = route.route.weighted_clusters.clusters[0].name
        route.route.ClearField("weighted_clusters")
        route.route.cluster = first


def _edited(
    table: route_pb2.RouteConfiguration,
    per_route: Callable[[route_components_pb2.Route], None] | None,
    retry: bool,
) -> route_pb2.RouteConfiguration:
    out = route_pb2.RouteConfiguration()
    out.CopyFrom(table)
    for vhost in out.virtual_hosts:
        if not retry:
            vhost.ClearField("retry_policy")
        if per_route is None:
            continue
        for on_match in vhost.matcher.matcher_tree.exact_match_map.map.values():
            route = route_components_pb2.Route()
            on_match.action.typed_config.Unpack(route)
            per_route(route)
            on_match.action.typed_config.Pack(route)
    return out


VARIANTS: dict[str, tuple[Callable[[route_components_pb2.Route], None] | None, bool]] = {
    "one-cluster": (_one_cluster, True),
    "no-retry": (None, False),
}


async def fresh_envoy(resources: Resources, name: str, workdir: Path) -> dict[str, Any]:
    cache, ads, server, port = await ads_server()
    cache.set(resources)
    admin = f"127.0.0.1:{processes.free_port()}"
    started = time.perf_counter()
    envoy = processes.start_envoy(name, bootstrap(f"127.0.0.1:{port}", "bench", admin), workdir)
    try:
        await _acked(ads, cache, [t for t in PUSH_ORDER if cache.get(t).resources], 600)
        return {
            "fresh_envoy_s": round(time.perf_counter() - started, 2),
            "envoy_rss_mb": round(_rss_mb(envoy.popen.pid)),
            "rds_bytes": sum(map(len, cache.get(ROUTE).resources.values())),
        }
    finally:
        envoy.stop()
        await server.stop(0)


async def run(models: int, pods: int, variants: list[str]) -> list[dict[str, Any]]:
    served = World(models, pods, "scale", 8008).resources()
    edited: dict[str, Resources] = {"served": served}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(variants):
            if variant not in edited:
                per_route, retry = VARIANTS[variant]
                tables = {n: _edited(t, per_route, retry) for n, t in served[ROUTE].items()}
                edited[variant] = {**served, ROUTE: tables}
            result = await fresh_envoy(edited[variant], f"envoy-{i}", Path(tmp))
            print(f"{variant}: {result}", flush=True)
            out.append({"variant": variant, **result})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="100000x500", help="MODELSxPODS")
    p.add_argument("--variants", default="served,one-cluster,served,no-retry,served,one-cluster")
    p.add_argument("--out", default="bench-results/first-config.json")
    args = p.parse_args()
    for v in args.variants.split(","):
        if v != "served" and v not in VARIANTS:
            p.error(f"unknown variant {v!r}: served, {', '.join(VARIANTS)}")
    models, pods = (int(x) for x in args.size.split("x"))
    runs = asyncio.run(run(models, pods, args.variants.split(",")))
    write_result(args.out, {"benchmark": "first-config", "machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
