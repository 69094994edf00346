"""Convergence: etcd placement write -> first request served by the new holder via Envoy.

    python -m modelxds.bench.convergence --out bench-results/convergence.json

Starts the local stack (real etcd, `modelxds serve`, real Envoy, sample pods),
places --models models (one copy each) on --pods pods, then moves one model at a
time to another pod with a single registry write (as ModelMesh does when a copy
loads elsewhere and the old one is evicted). A probe sends requests for that
model through the gateway back to back; the time from the write's completion to
the first answer from the new holder is one sample.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import grpc

from modelxds.bench.common import machine, summary_ms, write_result
from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh.stack import Stack, wait_until
from modelxds.modelmesh import ModelRecord
from modelxds.modelmesh.registrar import update_model

LOADED_LONG_AGO = 1


async def _served_by(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> str:
    resp = await stub.ModelInfer(
        pb.ModelInferRequest(model_name=model), metadata=(("model", model),), timeout=5
    )
    return str(resp.outputs[0].contents.bytes_contents[0].decode())


async def run(
    pods: int,
    models: int,
    changes: int,
    workdir: Path,
    strategy: str = "subset",
    gap_s: tuple[float, float] = (0.15, 0.35),
) -> dict[str, object]:
    stack = Stack(workdir, pods=pods, serve_args=("--strategy", strategy))
    await stack.start()
    channel = grpc.aio.insecure_channel(stack.gateway)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    rnd = random.Random(7)
    ids = [b.instance_id for b in stack.backends]
    holder = {f"bench-model-{i:05d}": ids[i % pods] for i in range(models)}
    try:
        # bulk placement, then wait until the gateway routes the last model written
        items = list(holder.items())
        for i in range(0, len(items), 200):  # concurrent writes: 20,000 models in seconds
            await asyncio.gather(
                *(
                    update_model(stack.etcd, stack.layout, model, _placed_on(iid))
                    for model, iid in items[i : i + 200]
                )
            )
        last = next(reversed(holder))

        async def routed() -> bool:
            return await _served_by(stub, last) == holder[last]

        await wait_until(routed, 60, "initial placement to reach the gateway")
        samples, probes = [], []
        for _ in range(changes):
            model = rnd.choice(list(holder))
            new = rnd.choice([i for i in ids if i != holder[model]])
            await update_model(stack.etcd, stack.layout, model, _placed_on(new))
            written = time.perf_counter()
            n = 0
            while True:
                n += 1
                if await _served_by(stub, model) == new:
                    break
                if time.perf_counter() - written > 30:
                    raise TimeoutError(f"{model} never reached {new}")
            samples.append(time.perf_counter() - written)
            probes.append(n)
            holder[model] = new
            await asyncio.sleep(rnd.uniform(*gap_s))  # changes arrive apart, not in a burst
    finally:
        await channel.close()
        await stack.stop()
    return {
        "pods": pods,
        "models": models,
        "changes": changes,
        "strategy": strategy,
        "gap_s": list(gap_s),
        "convergence": summary_ms(samples),
        "probe_requests_mean": sum(probes) / len(probes),
    }


def _placed_on(iid: str) -> Callable[[ModelRecord | None], ModelRecord]:
    def change(_: ModelRecord | None) -> ModelRecord:
        return ModelRecord(
            type="rt:mlserver-1.x", instance_ids=MappingProxyType({iid: LOADED_LONG_AGO})
        )

    return change


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench-results/convergence.json")
    p.add_argument("--pods", type=int, default=10)
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--changes", type=int, default=60)
    p.add_argument("--strategy", choices=["subset", "scale"], default="subset")
    p.add_argument(
        "--gap-ms",
        default="150,350",
        help="LOW,HIGH: a change follows the last one's convergence after a random pause in "
        "this range; above serve's 100 ms quiet period each is isolated and goes out at once",
    )
    args = p.parse_args()
    low, high = (int(x) / 1000 for x in args.gap_ms.split(","))
    gap_s = (low, high)
    with tempfile.TemporaryDirectory(prefix="modelxds-bench-") as tmp:
        result = asyncio.run(
            run(args.pods, args.models, args.changes, Path(tmp), args.strategy, gap_s)
        )
    c = result["convergence"]
    assert isinstance(c, dict)
    print(
        f"{args.models} models / {args.pods} pods, {args.strategy}, {args.changes} changes: "
        f"convergence p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, max {c['max_ms']} ms"
    )
    write_result(args.out, {"benchmark": "convergence", "machine": machine(), **result})


if __name__ == "__main__":
    main()
