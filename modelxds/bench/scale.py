"""Scale: both gateway strategies at 1,000 / 20,000 / 100,000 models.

    python -m modelxds.bench.scale --out bench-results/scale.json

Per size and strategy: modelxds's build + serialize time for a push (one model moved),
the bytes a push sends, the time a real Envoy takes to apply it (from the cache update
to its ACK of every changed type) and Envoy's RSS, with --concurrency 2 and 8. Then
end-to-end convergence with real etcd (etcd write -> first request served by the new
holder, as bench.convergence), and modelxds's own RSS and CPU while it serves 100
gateways (lightweight ADS clients that ACK like Envoy). Envoy runs against an
in-process ADS server fed by the same
translators `modelxds serve` uses; nothing but loopback is involved.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from modelxds.bench import convergence
from modelxds.bench.adsclient import GatewayClient
from modelxds.bench.build import NOW, tables
from modelxds.bench.common import ads_server, machine, summary_ms, write_result
from modelxds.kserve import descriptor_set_bytes
from modelxds.localmesh import processes
from modelxds.modelmesh import ModelRecord
from modelxds.placement.index import Changes, MeshIndex
from modelxds.placement.model import Placement
from modelxds.policy import Policy, parse_policy
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.serve import strategy
from modelxds.xds.bootstrap import bootstrap
from modelxds.xds.cache import SnapshotCache, TypeSnapshot
from modelxds.xds.ir import Options, RestMode
from modelxds.xds.resources import (
    PUSH_ORDER,
    SHORT_NAMES,
    WILDCARD_TYPES,
    Resources,
)
from modelxds.xds.server import AdsServer


class World:
    """Record tables, the incremental index and a translator: what `serve` runs, minus etcd."""

    def __init__(
        self,
        models: int,
        pods: int,
        strategy_name: str,
        port: int,
        rest: RestMode = RestMode.PROXY,
    ) -> None:
        self.t = tables(models, pods, 3)
        self.index = MeshIndex("modelmesh-serving")
        self.changes = Changes()
        self.changes.all(self.t["registry"], self.t["vmodels"])
        self.policy: Policy = parse_policy(SEED_POLICY_YAML.replace("8008", str(port)))
        self.options = Options(
            descriptor_set=descriptor_set_bytes(), listen_address="127.0.0.1", rest=rest
        )
        self.translate = strategy(strategy_name)
        self.rnd = random.Random(3)
        self.now = NOW

    def resources(self) -> Resources:
        self.now += 1
        mesh = self.index.refresh(self.changes, now_ms=self.now, **self.t)
        return self.translate(Placement({"modelmesh-serving": mesh}), self.policy, self.options)

    def move_one(self) -> None:
        model_id = self.rnd.choice(list(self.t["registry"]))
        pods = self.rnd.sample(list(self.t["instances"]), 3)
        self.t["registry"][model_id] = ModelRecord(instance_ids=dict.fromkeys(pods, NOW - 600_000))
        self.changes.models.add(model_id)


def _sent_bytes(before: TypeSnapshot, after: TypeSnapshot) -> int:
    """What a gateway that had ``before`` is sent: every resource of a wildcard type,
    only the changed ones of a named type (EDS, RDS)."""
    if after.type_url in WILDCARD_TYPES:
        return sum(map(len, after.resources.values()))
    return sum(len(b) for n, b in after.resources.items() if before.resources.get(n) != b)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _acked(ads: AdsServer, cache: SnapshotCache, types: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stream in ads.streams.values():
            if all(
                stream.types.get(t) is not None
                and stream.types[t].acked_version == cache.get(t).version
                for t in types
            ):
                return
            nacked = [t for t in types if stream.types.get(t) and stream.types[t].nacked_version]
            if nacked:
                raise RuntimeError(
                    f"Envoy rejected {nacked}: {stream.types[nacked[0]].nack_message[:300]}"
                )
        await asyncio.sleep(0.002)
    raise TimeoutError("Envoy did not ACK in time")


async def envoy_run(
    models: int,
    pods: int,
    strategy_name: str,
    concurrency: int,
    pushes: int,
    workdir: Path,
    rest: RestMode = RestMode.PROXY,
) -> dict[str, Any]:
    world = World(models, pods, strategy_name, processes.free_port(), rest)
    cache, ads, server, port = await ads_server()
    # The whole config, built and serialized as a start (or an etcd re-list) does, before
    # any gateway connects: what a fresh Envoy then costs is its own, as when a gateway
    # pod (re)starts beside a running modelxds.
    started = time.perf_counter()
    cache.set(world.resources())
    cold_build = time.perf_counter() - started
    admin = f"127.0.0.1:{processes.free_port()}"
    started = time.perf_counter()
    envoy = processes.start_envoy(
        f"envoy-{strategy_name}-{concurrency}",
        bootstrap(f"127.0.0.1:{port}", "bench", admin),
        workdir,
        concurrency=concurrency,
    )
    try:
        await _acked(ads, cache, [t for t in PUSH_ORDER if cache.get(t).resources], 600)
        initial = time.perf_counter() - started
        apply, build, pushed = [], [], []
        for _ in range(pushes):
            world.move_one()
            before = {t: cache.get(t) for t in PUSH_ORDER}
            t0 = time.perf_counter()
            changed = [t for t in cache.set(world.resources()) if cache.get(t).resources]
            t1 = time.perf_counter()
            await _acked(ads, cache, changed, 120)
            apply.append(time.perf_counter() - t1)
            build.append(t1 - t0)
            pushed.append(sum(_sent_bytes(before[t], cache.get(t)) for t in changed))
        return {
            "strategy": strategy_name,
            "rest": rest.value,
            "models": models,
            "pods": pods,
            "concurrency": concurrency,
            "cold_build_s": round(cold_build, 3),
            # from Envoy's start to its ACK of every type: process start included
            "initial_apply_s": round(initial, 3),
            "config_bytes": {SHORT_NAMES[t]: _config_bytes(cache.get(t)) for t in PUSH_ORDER},
            "push_build_serialize": summary_ms(build),
            "push_envoy_apply": summary_ms(apply),
            "push_bytes": int(statistics.median(pushed)),
            "envoy_rss_mb": round(_rss_mb(envoy.popen.pid), 1),
        }
    finally:
        envoy.stop()
        await server.stop(0)


async def many_gateways(
    models: int, pods: int, strategy_name: str, gateways: int, pushes: int
) -> dict[str, Any]:
    """modelxds with ``gateways`` ADS clients that subscribe and ACK like Envoy. The
    clients run in a process of their own, so this process's CPU and RSS are the
    server's alone."""
    world = World(models, pods, strategy_name, 8008)
    cache, ads, server, port = await ads_server()
    cache.set(world.resources())
    gc.collect()
    rss_before = _rss_mb_self()
    clients = multiprocessing.get_context("spawn").Process(
        target=_run_clients, args=(port, gateways), daemon=True
    )
    clients.start()
    try:
        every = [t for t in PUSH_ORDER if cache.get(t).resources]  # the types in the config
        peak = rss_before

        async def sample_peak() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss_mb_self())
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample_peak())
        synced_at = time.perf_counter()
        while len(ads.streams) < gateways:
            await asyncio.sleep(0.05)
        await _all_acked(ads, cache, every)
        sync_s = time.perf_counter() - synced_at
        sampler.cancel()
        rss_synced = _rss_mb_self()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(pushes):
            world.move_one()
            changed = cache.set(world.resources())
            await _all_acked(ads, cache, changed)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return {
            "strategy": strategy_name,
            "models": models,
            "pods": pods,
            "gateways": gateways,
            "pushes": pushes,
            "push_to_all_acked_ms": round(wall / pushes * 1000, 1),
            "server_cpu_seconds_per_push": round(cpu / pushes, 3),
            "server_rss_mb_without_gateways": round(rss_before, 1),
            # all gateways connecting at once: their first configs in flight together
            "server_rss_mb_peak_while_syncing": round(peak, 1),
            "all_synced_s": round(sync_s, 2),
            "server_rss_mb_synced": round(rss_synced, 1),
            "server_rss_mb_after_pushes": round(_rss_mb_self(), 1),
            "server_mb_per_gateway": round((_rss_mb_self() - rss_before) / gateways, 2),
        }
    finally:
        clients.kill()
        clients.join()
        await server.stop(0)


def _run_clients(port: int, gateways: int) -> None:
    """The gateways' process: ``gateways`` streams on one channel, until killed."""

    async def run() -> None:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
        )
        await asyncio.gather(
            *(GatewayClient(channel, f"gw-{i}", keep=False).run() for i in range(gateways))
        )

    asyncio.run(run())


def _config_bytes(snapshot: TypeSnapshot) -> int:
    return sum(len(blob) for blob in snapshot.resources.values())


def _rss_mb_self() -> float:
    return _rss_mb(int(Path("/proc/self/stat").read_text().split()[0]))


async def _all_acked(ads: AdsServer, cache: SnapshotCache, types: list[str]) -> None:
    while not all(
        s.types.get(t) is not None and s.types[t].acked_version == cache.get(t).version
        for s in ads.streams.values()
        for t in types
    ):
        await asyncio.sleep(0.005)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench-results/scale.json")
    p.add_argument("--sizes", default="1000x10,20000x100,100000x500")
    p.add_argument("--strategies", default="subset,scale")
    p.add_argument("--concurrency", default="2,8")
    p.add_argument(
        "--rest",
        default="proxy",
        help="REST modes of the Envoy runs, comma-separated: proxy (routes to the pods' REST "
        "proxy, a second set of routes) and/or transcode",
    )
    p.add_argument("--pushes", type=int, default=5)
    p.add_argument("--gateways", type=int, default=100)
    p.add_argument(
        "--convergence-sizes",
        default="1000x10,20000x100",
        help="sizes to also measure end-to-end convergence at, with real etcd (empty: none)",
    )
    p.add_argument("--changes", type=int, default=30, help="model moves per convergence run")
    args = p.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"envoy": [], "convergence": [], "gateways": []}
    with tempfile.TemporaryDirectory(prefix="modelxds-scale-") as tmp:
        for size in args.sizes.split(","):
            models, pods = (int(x) for x in size.split("x"))
            for name, rest, c in itertools.product(
                args.strategies.split(","),
                [RestMode(r) for r in args.rest.split(",")],
                [int(x) for x in args.concurrency.split(",")],
            ):
                r = asyncio.run(envoy_run(models, pods, name, c, args.pushes, Path(tmp), rest))
                print(
                    f"{models:>6}/{pods:<3} {name:<6} {rest.value:<9} c={c}: push build "
                    f"{r['push_build_serialize']['p50_ms']} ms, {r['push_bytes'] / 1e6:.2f}"
                    f" MB, Envoy apply p50 {r['push_envoy_apply']['p50_ms']} ms, "
                    f"RSS {r['envoy_rss_mb']} MB, cold build {r['cold_build_s']} s, fresh "
                    f"Envoy to ACKed {r['initial_apply_s']} s",
                    flush=True,
                )
                results["envoy"].append(r)
        for size in filter(None, args.convergence_sizes.split(",")):
            models, pods = (int(x) for x in size.split("x"))
            for name in args.strategies.split(","):
                workdir = Path(tmp) / f"convergence-{size}-{name}"
                run = asyncio.run(convergence.run(pods, models, args.changes, workdir, name))
                conv = run["convergence"]
                assert isinstance(conv, dict)
                print(
                    f"{models:>6}/{pods:<3} {name:<6} convergence p50 {conv['p50_ms']} ms, "
                    f"p99 {conv['p99_ms']} ms ({args.changes} moves)",
                    flush=True,
                )
                results["convergence"].append(run)
        if args.gateways:
            # the middle size (20,000 / 100 by default): the one with targets to meet
            sizes = args.sizes.split(",")
            models, pods = (int(x) for x in sizes[len(sizes) // 2].split("x"))
            for name in args.strategies.split(","):
                g = asyncio.run(many_gateways(models, pods, name, args.gateways, args.pushes))
                print(
                    f"{args.gateways} gateways, {models}/{pods} {name}: push to all ACKed "
                    f"{g['push_to_all_acked_ms']} ms, server CPU "
                    f"{g['server_cpu_seconds_per_push']} s/push, server RSS "
                    f"{g['server_rss_mb_without_gateways']} -> {g['server_rss_mb_synced']} "
                    f"-> {g['server_rss_mb_after_pushes']} MB "
                    f"({g['server_mb_per_gateway']} MB a gateway); all synced in "
                    f"{g['all_synced_s']} s, peak {g['server_rss_mb_peak_while_syncing']} MB",
                    flush=True,
                )
                results["gateways"].append(g)
    write_result(args.out, {"benchmark": "scale", "machine": machine(), **results})


if __name__ == "__main__":
    main()
