"""How long a cold push stalls `modelxds serve`'s event loop, where ADS and the watch run.

A cold push (start-up, or after an etcd re-list) derives the placement of every model,
translates it and serializes it: seconds at 100,000 models. The controller does that
in a worker thread. This measures, during one cold push, the longest the event loop
went without running a 1 ms timer (what an ADS request or a watch event would wait for
at worst), and the ADS round trip of a real client asking for clusters meanwhile.

    python -m modelxds.bench.stall --sizes 20000x100,100000x500 --out bench-results/stall.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from modelxds.bench.build import NOW, tables
from modelxds.bench.common import ads_server, machine, write_result
from modelxds.kserve import descriptor_set_bytes
from modelxds.placement.index import Changes, MeshIndex
from modelxds.placement.model import Placement
from modelxds.policy import default_policy
from modelxds.serve import strategy
from modelxds.xds.controller import Controller
from modelxds.xds.ir import Options
from modelxds.xds.resources import CLUSTER


async def cold_push(models: int, pods: int, strategy_name: str) -> dict[str, Any]:
    t = tables(models, pods, 3)
    index = MeshIndex("modelmesh-serving")

    def capture() -> Any:
        changes = Changes()
        changes.all(t["registry"], t["vmodels"])
        return lambda: Placement(
            {"modelmesh-serving": index.refresh(changes, now_ms=NOW, **t)}, revision=1
        )

    cache, _, server, port = await ads_server()
    controller = Controller(
        capture,
        asyncio.Event(),
        default_policy(),
        cache,
        Options(descriptor_set=descriptor_set_bytes()),
        translator=strategy(strategy_name),
    )
    try:
        started = time.perf_counter()
        push = asyncio.create_task(controller.publish())
        worst_gap, last = 0.0, time.perf_counter()
        round_trips = []
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
        ) as channel:
            while not push.done():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                worst_gap, last = max(worst_gap, now - last), now
                round_trips.append(await _ads_round_trip(channel))
        await push
        return {
            "strategy": strategy_name,
            "models": models,
            "pods": pods,
            "cold_push_s": round(time.perf_counter() - started, 3),
            "loop_worst_gap_ms": round(worst_gap * 1000, 1),
            # an empty cache answers nothing: a round trip is the request and its error
            "ads_round_trip_ms_max": round(max(round_trips) * 1000, 1),
            "clusters": len(cache.get(CLUSTER).resources),
        }
    finally:
        await server.stop(0)


async def _ads_round_trip(channel: grpc.aio.Channel) -> float:
    """Open a stream, ask for clusters, wait for the first answer (or the cache's silence)."""
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=base_pb2.Node(id="stall-probe"))
    started = time.perf_counter()
    call = stub.StreamAggregatedResources(iter([request]))
    try:
        await asyncio.wait_for(call.read(), 0.05)
    except TimeoutError:
        pass  # nothing published yet: the stream was served, it had nothing to say
    finally:
        call.cancel()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="20000x100,100000x500")
    p.add_argument("--strategies", default="subset,scale")
    p.add_argument("--out", default="bench-results/stall.json")
    args = p.parse_args()
    runs = []
    for size in args.sizes.split(","):
        models, pods = (int(x) for x in size.split("x"))
        for name in args.strategies.split(","):
            r = asyncio.run(cold_push(models, pods, name))
            print(
                f"{models:>6}/{pods:<3} {name:<6}: cold push {r['cold_push_s']} s, loop's worst "
                f"gap {r['loop_worst_gap_ms']} ms, ADS round trip <= "
                f"{r['ads_round_trip_ms_max']} ms",
                flush=True,
            )
            runs.append(r)
    write_result(args.out, {"benchmark": "stall", "machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
