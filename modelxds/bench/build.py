"""Snapshot build + serialize time: placement -> Envoy resources -> bytes in the cache.

    python -m modelxds.bench.build --out bench-results/build.json

Times what the server does to publish: derive the Placement from the record
tables (the watcher's snapshot), translate it, and serialize every resource into
the cache. "cold" derives every model from scratch (start, etcd re-list); "push"
is the steady state, after one model moved to other pods.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any

from modelxds.bench.common import machine, summary_ms, write_result
from modelxds.kserve import descriptor_set_bytes
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.index import Changes, MeshIndex
from modelxds.placement.model import Placement
from modelxds.policy import Policy, default_policy
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.ir import Options, Strategy
from modelxds.xds.resources import ENDPOINT
from modelxds.xds.subset import SubsetStrategy

NOW = 1_800_000_000_000


def tables(models: int, pods: int, copies: int, seed: int = 1) -> dict[str, Any]:
    """Record tables as the watcher holds them: every model an InferenceService too."""
    rnd = random.Random(seed)
    ids = [f"{i:06x}-{rnd.randrange(16**5):05x}" for i in range(pods)]
    registry = {
        f"model-{m}__isvc-{m:010x}": ModelRecord(
            type="rt:mlserver-1.x",
            instance_ids={iid: NOW - 600_000 for iid in rnd.sample(ids, copies)},
        )
        for m in range(models)
    }
    vmodels = {
        f"model-{m}": VModelRecord(
            owner="isvc",
            active_model=f"model-{m}__isvc-{m:010x}",
            target_model=f"model-{m}__isvc-{m:010x}",
        )
        for m in range(models)
    }
    instances = {
        iid: InstanceRecord(start_time=NOW - 86_400_000, count=models * copies // pods)
        for iid in ids
    }
    litelinks = {
        f"10.0.{i // 250}.{i % 250}_8080_1": LitelinksRecord(
            hostname=f"10.0.{i // 250}.{i % 250}", instance_id=iid, port=8080
        )
        for i, iid in enumerate(ids)
    }
    return {
        "registry": registry,
        "vmodels": vmodels,
        "instances": instances,
        "litelinks": litelinks,
    }


def run(models: int, pods: int, copies: int, rounds: int) -> dict[str, Any]:
    t = tables(models, pods, copies)
    policy = default_policy()
    options = Options(descriptor_set=descriptor_set_bytes())
    rnd = random.Random(2)
    pod_ids = list(t["instances"])
    cold: dict[str, list[float]] = {"placement": [], "translate": [], "serialize": []}
    push: dict[str, list[float]] = {"placement": [], "translate": [], "serialize": []}
    eds_bytes = 0
    for r in range(rounds):
        # Cold: what a start or an etcd re-list costs, every model derived from scratch.
        # A fresh index, translator and cache: nothing is left from the round before.
        index, changes, cache = MeshIndex("modelmesh-serving"), Changes(), SnapshotCache()
        translate = SubsetStrategy()
        changes.all(t["registry"], t["vmodels"])
        gc.collect()
        _timed(cold, index, changes, translate, t, policy, options, cache, NOW + r)
        eds_bytes = sum(len(b) for b in cache.get(ENDPOINT).resources.values())
        # Push: one model moves to another pod, as ModelMesh does all day.
        model_id = rnd.choice(list(t["registry"]))
        t["registry"][model_id] = ModelRecord(
            type="rt:mlserver-1.x",
            instance_ids={iid: NOW - 600_000 for iid in rnd.sample(pod_ids, copies)},
        )
        changes.models.add(model_id)
        gc.collect()
        _timed(push, index, changes, translate, t, policy, options, cache, NOW + r)
    return {
        "models": models,
        "pods": pods,
        "copies": copies,
        "rounds": rounds,
        "eds_bytes": eds_bytes,
        "cold": {k: summary_ms(v) for k, v in cold.items()}
        | {"total": summary_ms([sum(x) for x in zip(*cold.values(), strict=True)])},
        "push": {k: summary_ms(v) for k, v in push.items()}
        | {"total": summary_ms([sum(x) for x in zip(*push.values(), strict=True)])},
    }


def _timed(
    out: dict[str, list[float]],
    index: MeshIndex,
    changes: Changes,
    translate: Strategy,
    t: dict[str, Any],
    policy: Policy,
    options: Options,
    cache: SnapshotCache,
    now: int,
) -> None:
    t0 = time.perf_counter()
    mesh = index.refresh(changes, now_ms=now, **t)
    t1 = time.perf_counter()
    resources = translate(Placement({"modelmesh-serving": mesh}), policy, options)
    t2 = time.perf_counter()
    cache.set(resources)
    t3 = time.perf_counter()
    out["placement"].append(t1 - t0)
    out["translate"].append(t2 - t1)
    out["serialize"].append(t3 - t2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench-results/build.json")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--copies", type=int, default=3)
    p.add_argument(
        "--sizes",
        default="1000x10,20000x100,100000x500",
        help="MODELSxPODS,... (default: %(default)s)",
    )
    args = p.parse_args()
    results = []
    for size in args.sizes.split(","):
        models, pods = (int(x) for x in size.split("x"))
        rounds = args.rounds if models <= 20000 else max(3, args.rounds // 4)
        r = run(models, pods, args.copies, rounds)
        for kind in ("cold", "push"):
            k = r[kind]
            print(
                f"{models:>7} models / {pods:>3} pods, {kind}: total p50 {k['total']['p50_ms']} "
                f"ms, p90 {k['total']['p90_ms']} ms (placement {k['placement']['p50_ms']}, "
                f"translate {k['translate']['p50_ms']}, serialize {k['serialize']['p50_ms']}), "
                f"EDS {r['eds_bytes'] / 1e6:.2f} MB"
            )
        results.append(r)
    write_result(args.out, {"benchmark": "build", "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
