"""`make run`: the local stack on its default ports, until Ctrl-C.

etcd, three sample ModelMesh pods (127.0.0.11-13:8033), `modelxds serve` with the
seed's DestinationRule/VirtualService, and an Envoy gateway on :8008, with the
seed's InferenceService placed on one pod.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from modelxds.localmesh.stack import SEED_GATEWAY_PORT, SEED_POD_PORT, Stack, pod_instance_id
from modelxds.modelmesh.records import VModelRecord
from modelxds.modelmesh.registrar import put_vmodel

SEED_ISVC = "example-mnist-isvc"
SEED_MODEL = "example-mnist-isvc__isvc-6b2eb0b8bf"
SEED_INPUT = [
    0,
    0,
    1,
    11,
    14,
    15,
    3,
    0,
    0,
    1,
    13,
    16,
    12,
    16,
    8,
    0,
    0,
    8,
    16,
    4,
    6,
    16,
    5,
    0,
    0,
    5,
    15,
    11,
    13,
    14,
    0,
    0,
    0,
    0,
    2,
    12,
    16,
    13,
    0,
    0,
    0,
    0,
    0,
    13,
    16,
    16,
    6,
    0,
    0,
    0,
    0,
    16,
    16,
    16,
    7,
    0,
    0,
    0,
    0,
    11,
    13,
    12,
    1,
    0,
]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m modelxds.localmesh.run", description=__doc__)
    p.add_argument("--workdir", default=".run", help="logs and etcd data (default: .run)")
    p.add_argument("--pods", type=int, default=3)
    p.add_argument("--gateway-port", type=int, default=SEED_GATEWAY_PORT)
    p.add_argument("--pod-port", type=int, default=SEED_POD_PORT)
    p.add_argument("--xds-port", type=int, default=18000)
    p.add_argument("--admin-port", type=int, default=15000)
    p.add_argument("--metrics-port", type=int, default=9091)
    p.add_argument("--etcd-port", type=int, default=2379)
    return p.parse_args(argv)


def _banner(stack: Stack) -> str:
    gw = f"127.0.0.1:{stack.gateway_port}"
    payload = (
        '{"inputs":[{"name":"predict","shape":[1,64],"datatype":"FP32",'
        f'"contents":{{"fp32_contents":{SEED_INPUT}}}}}]}}'
    ).replace(" ", "")
    pods = ", ".join(f"{b.instance_id}@{b.address}" for b in stack.backends)
    return f"""
modelxds local stack is up (logs in {stack.workdir}/)
  etcd       {stack.etcd_url}
  pods       {pods}
  modelxds   xDS 127.0.0.1:{stack.xds_port}, metrics http://127.0.0.1:{stack.metrics_port}/metrics
  gateway    {gw} (REST and gRPC), admin http://{stack.admin}
  placement  {SEED_ISVC} -> {SEED_MODEL} loaded on {pod_instance_id(1)}

Try (the answer names the pod that served it; always {pod_instance_id(1)} here):
  curl -s http://{gw}/v2/models/{SEED_ISVC}/infer -H 'content-type: application/json' \\
    -d '{payload}'
  .venv/bin/modelxds placement --etcd {stack.etcd_url}
  curl -s 'http://{stack.admin}/config_dump?include_eds' | less

Ctrl-C stops everything.
"""


async def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    workdir = Path(args.workdir).resolve()
    # etcd data from an earlier run would bring back pods that no longer exist
    with contextlib.suppress(FileNotFoundError):
        for f in (workdir / "etcd-data").rglob("*"):
            if f.is_file():
                f.unlink()
    stack = Stack(
        workdir,
        pods=args.pods,
        pod_port=args.pod_port,
        gateway_port=args.gateway_port,
        xds_port=args.xds_port,
        admin_port=args.admin_port,
        metrics_port=args.metrics_port,
        etcd_port=args.etcd_port,
        listen_address="0.0.0.0",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stack.start()
    except Exception as e:
        print(f"error: the local stack did not start: {e}", file=sys.stderr)
        return 1
    try:
        _, reg = stack.pod(pod_instance_id(1))
        await reg.add_copy(SEED_MODEL, started_ms=1)
        await put_vmodel(
            stack.etcd,
            stack.layout,
            SEED_ISVC,
            VModelRecord(owner="isvc", active_model=SEED_MODEL, target_model=SEED_MODEL),
        )
        print(_banner(stack), flush=True)
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        await stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
