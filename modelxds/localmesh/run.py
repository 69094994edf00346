"""`make run`: the local stack on its default ports, until Ctrl-C.

etcd, three ModelMesh-compatible mesh nodes with MLServer runtimes (127.0.0.11-13:8033),
`modelxds serve` with the seed's DestinationRule/VirtualService, and an Envoy gateway
on :8008; then the seed's InferenceService is applied and loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from modelxds.localmesh import isvc
from modelxds.localmesh.client import SEED_DATA_REQUEST, SEED_REQUEST
from modelxds.localmesh.stack import SEED_GATEWAY_PORT, SEED_POD_PORT, Stack, wait_until

SEED_ISVC = "example-mnist-isvc"
EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m modelxds.localmesh.run", description=__doc__)
    p.add_argument("--workdir", default=".run", help="logs and etcd data (default: .run)")
    p.add_argument("--models", default=".run/models", help="sample models (make models)")
    p.add_argument(
        "--isvc",
        action="append",
        default=[],
        help="InferenceService YAML to apply (default: the two examples)",
    )
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
    payload = json.dumps(SEED_REQUEST, separators=(",", ":"))
    data_payload = json.dumps(SEED_DATA_REQUEST, separators=(",", ":"))
    pods = ", ".join(f"{iid}@{pod}" for iid, pod in stack.pod_addresses().items())
    return f"""
modelxds local stack is up (logs in {stack.workdir}/)
  etcd       {stack.etcd_url}
  pods       {pods}
  pod stats  http://127.0.0.11:2112/metrics (local / forwarded requests, loads, evictions)
  modelxds   xDS 127.0.0.1:{stack.xds_port}, metrics http://127.0.0.1:{stack.metrics_port}/metrics
  gateway    {gw} (REST and gRPC), admin http://{stack.admin}

Try (the answer is 8): the V2 REST protocol's "data" form, as tritonclient.http sends it,
  curl -s http://{gw}/v2/models/{SEED_ISVC}/infer -H 'content-type: application/json' \\
    -d '{data_payload}'
the seed's request (protobuf JSON "contents" form),
  curl -s http://{gw}/v2/models/{SEED_ISVC}/infer -H 'content-type: application/json' \\
    -d '{payload}'
and
  .venv/bin/modelxds mesh status --etcd {stack.etcd_url}
  .venv/bin/modelxds placement --etcd {stack.etcd_url}
  .venv/bin/modelxds status --xds 127.0.0.1:{stack.xds_port}
  curl -s 'http://{stack.admin}/config_dump?include_eds' | less

Ctrl-C stops everything.
"""


async def _all_ready(stack: Stack) -> bool:
    rows = await stack.isvc_status()
    return bool(rows) and all(r["state"] == "UpToDate" for r in rows)


async def main(
    argv: list[str] | None = None, script: Callable[[Stack], Awaitable[None]] | None = None
) -> int:
    """Bring the stack up, then run ``script`` (the demo) or wait for Ctrl-C."""
    args = _parse(argv)
    workdir = Path(args.workdir).resolve()
    models = Path(args.models).resolve()
    if not (models / "sklearn" / "mnist-svm.joblib").exists():
        print(f"error: no sample models in {models}: run `make models`", file=sys.stderr)
        return 1
    try:
        services = isvc.read_files(args.isvc or [str(EXAMPLES)])
    except isvc.InferenceServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # etcd data from an earlier run would bring back pods that no longer exist
    shutil.rmtree(workdir / "etcd-data", ignore_errors=True)
    stack = Stack(
        workdir,
        policy_poll_ms=2000,  # edit .run/policy.yaml and it is applied
        pods=args.pods,
        pod_port=args.pod_port,
        gateway_port=args.gateway_port,
        xds_port=args.xds_port,
        admin_port=args.admin_port,
        metrics_port=args.metrics_port,
        etcd_port=args.etcd_port,
        # not 0.0.0.0: the pods' REST proxies listen on the same port (8008) at their own
        # loopback addresses, as pods do in a cluster
        listen_address="127.0.0.1",
        runtime="mlserver",
        storage_dir=models,
        node_ports=(8080, 8081, 2112),
    )

    async def up() -> None:
        await stack.start()
        for service in services:
            print(await isvc.apply(stack.etcd, stack.layout, service), flush=True)
        await wait_until(lambda: _all_ready(stack), 180, "the InferenceServices to load")
        if script is None:
            print(_banner(stack), flush=True)

    # Ctrl-C works at every moment, start-up included
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        await up()
        await (script(stack) if script is not None else asyncio.Event().wait())
    except asyncio.CancelledError:
        print("stopping...", flush=True)
    except Exception as e:
        print(f"error: the local stack did not come up: {e}", file=sys.stderr)
        return 1
    finally:
        await stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
