"""`make demo`: the seed's walk-through on the local stack, start to finish.

1. the seed's REST request (``contents.fp32_contents``) through the gateway: 8
2. the same over gRPC with a real KServe V2 client (tritonclient), routed by header: 8
3. the seed's model change: InProgress while the new model loads, then UpToDate,
   answering 8 throughout
4. a change to a model that cannot load: BlockedByFailedLoad, still answering 8
5. the pods' counters: requests through the gateway needed no in-mesh hop
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from modelxds.localmesh import isvc, run
from modelxds.localmesh.client import rest_seed, triton_grpc
from modelxds.localmesh.stack import Stack

ISVC = run.SEED_ISVC


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def _rest(stack: Stack) -> int:
    return await rest_seed(stack.gateway, ISVC)


async def _grpc(stack: Stack) -> str:
    return str(await triton_grpc(stack.gateway, ISVC, {"mm-vmodel-id": ISVC}))


async def _status(stack: Stack) -> dict[str, Any]:
    return next(r for r in await stack.isvc_status() if r["name"] == ISVC)


def _show(row: dict[str, Any]) -> str:
    target = f", target {row['target_model']}" if row["target_model"] != row["active_model"] else ""
    return f"{row['state']:<20} active {row['active_model']}{target}"


async def _change(stack: Stack, path: str, until: str) -> None:
    text = (run.EXAMPLES / "example-mnist-isvc.yaml").read_text()
    (service,) = isvc.parse_isvcs(text.replace("sklearn/mnist-svm.joblib", path), "demo")
    print(f"$ modelxds mesh apply -f isvc.yaml   # storage.path: {path}")
    print(await isvc.apply(stack.etcd, stack.layout, service))
    deadline = time.monotonic() + 60
    seen = ""
    while time.monotonic() < deadline:
        row = await _status(stack)
        line = _show(row)
        if line != seen:
            print(f"  {line}   (inference answers {await _rest(stack)})", flush=True)
            seen = line
        if row["state"] == until:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{ISVC} did not reach {until}")


def _forwarded(stack: Stack) -> dict[str, int]:
    return {
        i: int(stack.node_counters(i).get("modelmesh_forwarded_requests_total", 0))
        for i in stack.nodes
    }


async def walkthrough(stack: Stack) -> None:
    _say("1. REST through the gateway, the seed's payload (contents.fp32_contents)")
    print(f"POST http://{stack.gateway}/v2/models/{ISVC}/infer -> {await _rest(stack)}")
    _say("2. gRPC through the gateway with tritonclient (header mm-vmodel-id)")
    print(f"ModelInfer {ISVC} -> {await _grpc(stack)}")
    _say("3. the seed's model change")
    before = _forwarded(stack)
    await _change(stack, "sklearn/mnist-svm-v2.joblib", "UpToDate")
    _say("4. a change to a model that cannot be loaded")
    await _change(stack, "sklearn/missing.joblib", "BlockedByFailedLoad")
    changes = sum(_forwarded(stack).values()) - sum(before.values())
    print(
        f"\n{changes} request(s) above were forwarded inside the mesh: sent in the moment "
        "between etcd naming a new active model and the gateway hearing of it (~0.1 s)"
    )
    _say("5. 50 requests through the gateway, in-mesh hops counted on every pod")
    await asyncio.sleep(1)
    before = _forwarded(stack)
    answers = {await _rest(stack) for _ in range(50)}
    after = _forwarded(stack)
    hops = {i: after[i] - before[i] for i in after}
    print(f"answers {sorted(answers)}; forwarded per pod {hops}")
    print(
        "every request went straight to a pod holding its model"
        if not any(hops.values())
        else "some requests needed an in-mesh hop"
    )


def main() -> int:
    return asyncio.run(run.main(sys.argv[1:], script=walkthrough))


if __name__ == "__main__":
    sys.exit(main())
