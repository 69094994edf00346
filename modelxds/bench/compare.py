"""Latency with and without dynamic subsets, the way users check it with fortio.

    modelxds bench compare --pods 3 --models 60 --copies 1 -qps 100 -c 1 -t 60s

On the local mesh (MLServer pods), the same load runs through two gateways, and over
gRPC also straight to each model's holder (the floor a gateway can reach):

* ``plain``: round robin over all pods, as a Kubernetes Service does (no subsets);
* ``subsets``: the gateway modelxds programs, each request sent to a holder;
* ``direct``: the client sends each request to its model's holder (gRPC only);
* ``epp``: the gateway the Gateway API Inference Extension builds: an Envoy whose
  ``ext_proc`` filter asks ``modelxds epp`` for the pod (``modelxds bootstrap --epp``),
  one EPP and Envoy per protocol, as each InferencePool has its own picker.

Runs alternate mode by mode (A/B/A/B, ``--rounds`` times) so the noise of a shared
machine lands on every mode alike. Reported per mode: latency percentiles, and the
share of requests a pod had to forward to another pod (from the pods' counters).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from modelxds.bench.common import machine, write_result
from modelxds.bench.load import LoadSpec, parse_duration, run
from modelxds.bench.stats import duration_histogram, percentiles_ms, summary_line
from modelxds.localmesh import processes
from modelxds.localmesh.client import SEED_BODY, SEED_REQUEST
from modelxds.localmesh.stack import Stack, pod_host, wait_until
from modelxds.modelmesh import ModelRecord
from modelxds.modelmesh.registrar import now_ms, update_model
from modelxds.xds.bootstrap import epp_bootstrap

GRPC_BODY = json.dumps({"model_name": "{model}", **SEED_REQUEST}).encode()
MODES = ("plain", "subsets", "direct", "epp")


def plain_gateway(stack: Stack, port: int, admin_port: int) -> dict[str, Any]:
    """Envoy bootstrap of a gateway without dynamic subsets, as a Kubernetes Service is:
    round robin over the pods, gRPC to their gRPC port and REST to their REST proxy (the
    path the modelxds gateway takes too, so the two differ only in the pod chosen)."""
    router = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "plain",
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "plain",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/", "grpc": {}},
                            "route": {"cluster": "pods", "timeout": "0s"},
                        },
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "pods-rest", "timeout": "0s"},
                        },
                    ],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": router}],
    }
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }

    def pods(name: str, pod_port: int, options: dict[str, Any]) -> dict[str, Any]:
        endpoints = [
            {
                "endpoint": {
                    "address": {"socket_address": {"address": pod_host(i), "port_value": pod_port}}
                }
            }
            for i in range(stack.pods)
        ]
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "typed_extension_protocol_options": options,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        }

    return {
        "node": {"id": "plain-gateway", "cluster": "bench"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "plain",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                pods("pods", stack.pod_port, http2),
                pods("pods-rest", stack.rest_port, {}),
            ],
        },
    }


async def start_epp_gateway(stack: Stack, proto: str, workdir: Path, workers: int) -> str:
    """`modelxds epp` on the mesh's etcd and policy, and the Envoy `modelxds bootstrap
    --epp` describes in front of the pods' gRPC port (or their REST proxy); returns the
    gateway's address."""
    target = stack.pod_port if proto == "grpc" else stack.rest_port
    epp_port, metrics_port = processes.free_port(), processes.free_port()
    port, admin_port = processes.free_port(), processes.free_port()
    epp = processes.spawn(
        f"epp-{proto}",
        [
            sys.executable,
            "-m",
            "modelxds.cli",
            "epp",
            "--etcd",
            stack.etcd_url,
            "--root-prefix",
            stack.layout.root_prefix,
            "--service-name",
            stack.layout.service_name,
            "--policy",
            str(stack.workdir / "policy.yaml"),
            "--epp-address",
            f"127.0.0.1:{epp_port}",
            "--target-port",
            str(target),
            "--plaintext",
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
        ],
        workdir,
    )
    stack.processes.append(epp)
    await asyncio.to_thread(processes.wait_for_port, epp, "127.0.0.1", epp_port)
    config = epp_bootstrap(
        f"127.0.0.1:{epp_port}",
        [f"{pod_host(i)}:{target}" for i in range(stack.pods)],
        admin_address=f"127.0.0.1:{admin_port}",
        listen_address="127.0.0.1",
        listen_port=port,
        node_id=f"epp-gateway-{proto}",
        epp_plaintext=True,
        app_protocol="kubernetes.io/h2c" if proto == "grpc" else "http",
    )
    stack.processes.append(
        processes.start_envoy(f"envoy-epp-{proto}", config, workdir, concurrency=workers)
    )
    return f"127.0.0.1:{port}"


async def place_models(stack: Stack, models: int, copies: int) -> dict[str, list[str]]:
    """Register ``models`` sample models, ``copies`` copies each spread over the pods."""
    ids = sorted(stack.nodes)
    holders = {}
    for m in range(models):
        name = f"bench-{m:04d}"
        pods = [ids[(m + j) % len(ids)] for j in range(copies)]
        record = ModelRecord(
            type="mt:sklearn",
            model_path=f"generated/model-{m % 60:04d}.joblib",
            encryption_key=json.dumps({"storage_key": "localMinIO"}),
            instance_ids=MappingProxyType(dict.fromkeys(pods, now_ms())),
        )
        await update_model(stack.etcd, stack.layout, name, functools.partial(_same, record))
        holders[name] = pods
    return holders


def _same(record: ModelRecord, _: ModelRecord | None) -> ModelRecord:
    return record


async def _forwarded(stack: Stack) -> dict[str, float]:
    return {
        iid: (await asyncio.to_thread(stack.node_counters, iid)).get(
            "modelmesh_forwarded_requests_total", 0.0
        )
        for iid in stack.nodes
    }


def _spec(
    mode: str,
    proto: str,
    gateways: dict[str, str],
    holders: dict[str, list[str]],
    stack: Stack,
    args: argparse.Namespace,
) -> LoadSpec:
    models = list(holders)
    gateway = gateways.get(f"{proto}/{mode}", "")
    if proto == "rest":
        return LoadSpec(
            url=f"http://{gateway}/v2/models/{{model}}/infer",
            qps=args.qps,
            connections=args.connections,
            duration=args.duration,
            headers=[("model", "{model}")],
            payload=SEED_BODY,
            jitter=args.jitter,
            models=models,
            labels=f"{proto} {mode}",
        )
    addresses = stack.pod_addresses()
    direct = mode == "direct"
    return LoadSpec(
        url=gateway,
        grpc=True,
        qps=args.qps,
        connections=args.connections,
        duration=args.duration,
        payload=GRPC_BODY,
        jitter=args.jitter,
        models=models,
        headers=[("model", "{model}")] + ([("mm-balanced", "true")] if direct else []),
        target=(lambda m: addresses[holders[m][0]]) if direct else None,
        labels=f"{proto} {mode}",
    )


async def _fortio(spec: LoadSpec, out: Path) -> dict[str, Any]:
    """Drive fortio itself (REST): one model per run, as fortio takes one URL."""
    model = spec.models[0]
    cmd = [
        shutil.which("fortio") or "fortio",
        "load",
        "-json",
        str(out),
        "-qps",
        str(spec.qps),
        "-c",
        str(spec.connections),
        "-t",
        f"{spec.duration}s",
        f"-jitter={str(spec.jitter).lower()}",
        "-payload",
        spec.payload.decode(),
    ]
    for k, v in spec.headers:
        cmd += ["-H", f"{k}: {v.replace('{model}', model)}"]
    cmd.append(spec.url.replace("{model}", model))
    await asyncio.to_thread(subprocess.run, cmd, check=True, capture_output=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


async def compare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from rich.progress import Progress

    stack = Stack(
        workdir,
        runtime="mlserver",
        storage_dir=Path(args.storage).resolve(),
        pods=args.pods,
        node_capacity=args.models * args.copies // args.pods + 4,
        gateway_workers=args.gateway_workers,
    )
    await stack.start()
    try:
        gateways = {}
        for proto in args.protocols:
            gateways[f"{proto}/subsets"] = stack.gateway
        if "plain" in args.modes:
            plain_port, plain_admin = processes.free_port(), processes.free_port()
            stack.processes.append(
                processes.start_envoy(
                    "envoy-plain",
                    plain_gateway(stack, plain_port, plain_admin),
                    workdir,
                    concurrency=args.gateway_workers,
                )
            )
            for proto in args.protocols:
                gateways[f"{proto}/plain"] = f"127.0.0.1:{plain_port}"
        if "epp" in args.modes:
            for proto in args.protocols:
                gateways[f"{proto}/epp"] = await start_epp_gateway(
                    stack, proto, workdir, args.gateway_workers
                )
        holders = await place_models(stack, args.models, args.copies)
        # load every copy before measuring: misses are not what is compared
        warm = LoadSpec(
            url=stack.gateway,
            grpc=True,
            qps=0,
            connections=4,
            duration=0,
            payload=GRPC_BODY,
            models=list(holders),
            headers=[("model", "{model}")],
        )

        async def all_loaded() -> bool:
            warm.duration = len(holders) / 40
            result = await run(warm)
            return set(result["RetCodes"]) == {"OK"}

        await wait_until(all_loaded, 300, "every model to load", interval=1)
        raw: dict[str, list[float]] = {}
        runs = []
        plan = [
            (proto, mode)
            for proto in args.protocols
            for mode in args.modes
            if mode != "direct" or proto == "grpc"  # no REST client reaches a pod's 8033
        ]
        # Warm every path (connections, channels between pods) and let the pods settle,
        # unmeasured. Settling is most of it: ~500 requests after its models load, each
        # MLServer runs its first full GC (110-130 ms stop-the-world on the benchmark
        # machine; a node's is 20-30 ms), and it used to land in round 0 of whichever
        # mode ran first (REST plain: p99 94 ms there, 10-12 ms after). Default: at
        # least 1,000 requests a pod, and 30 s.
        warmup = args.warmup or max(30.0, 1000 * args.pods / max(args.qps, 1))
        for proto, mode in plan:
            spec = _spec(mode, proto, gateways, holders, stack, args)
            spec.duration = max(2.0, warmup / len(plan))
            await run(spec)
        with Progress() as progress:
            bar = progress.add_task("A/B runs", total=len(plan) * args.rounds)
            for r in range(args.rounds):
                order = plan if r % 2 == 0 else list(reversed(plan))
                for proto, mode in order:
                    spec = _spec(mode, proto, gateways, holders, stack, args)
                    before = await _forwarded(stack)
                    progress.update(bar, description=f"round {r + 1}: {proto} {mode}")
                    if args.tool == "fortio" and proto == "rest":
                        result = await _fortio(spec, workdir / f"fortio-{r}-{mode}.json")
                    else:
                        result = await run(spec)
                        raw.setdefault(f"{proto}/{mode}", []).extend(result.pop("Samples"))
                    after = await _forwarded(stack)
                    count = result["DurationHistogram"]["Count"]
                    hops = sum(after.values()) - sum(before.values())
                    runs.append(
                        {
                            "round": r,
                            "protocol": proto,
                            "mode": mode,
                            "forwarded": hops,
                            "requests": count,
                            "summary": summary_line(result),
                            "result": result,
                        }
                    )
                    progress.advance(bar)
    finally:
        await stack.stop()
    return {"runs": runs, "modes": _aggregate(runs, raw)}


def _aggregate(runs: list[dict[str, Any]], raw: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in dict.fromkeys(f"{r['protocol']}/{r['mode']}" for r in runs):
        mine = [r for r in runs if f"{r['protocol']}/{r['mode']}" == key]
        requests = sum(r["requests"] for r in mine)
        hist = (
            duration_histogram(raw[key]) if key in raw else mine[-1]["result"]["DurationHistogram"]
        )
        out[key] = {
            "requests": requests,
            "forwarded_share": round(sum(r["forwarded"] for r in mine) / max(requests, 1), 4),
            "latency_ms": percentiles_ms({"DurationHistogram": hist}),
            "samples": raw.get(key, []),
        }
    return out


def plot(modes: dict[str, Any], path: Path, title: str) -> None:
    """Latency by percentile, one line per mode: the picture fortio users compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({k.split("/")[0] for k in modes}, reverse=True)
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    styles = {"plain": "#d62728", "subsets": "#2ca02c", "direct": "#1f77b4", "epp": "#9467bd"}
    for ax, proto in zip(axes[0], protocols, strict=True):
        for key, data in modes.items():
            p, mode = key.split("/")
            if p != proto or not data["samples"]:
                continue
            samples = sorted(data["samples"])
            n = len(samples)
            # x: 1/(1 - quantile), log scale, so the tail gets the room it deserves
            xs = [1 / (1 - (i + 0.5) / n) for i in range(n)]
            ax.plot(
                xs,
                [s * 1000 for s in samples],
                color=styles.get(mode),
                label=f"{mode}: p50 {data['latency_ms']['p50']:.2f} ms, "
                f"p99 {data['latency_ms']['p99']:.2f} ms, "
                f"forwarded {data['forwarded_share']:.0%}",
            )
        ticks = [1, 2, 10, 100, 1000]
        ax.set_xscale("log")
        ax.set_xticks(ticks, ["p0", "p50", "p90", "p99", "p99.9"])
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{proto.upper()} {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="modelxds bench compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pods", type=int, default=3)
    p.add_argument("--models", type=int, default=60)
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("-qps", type=float, default=100)
    p.add_argument("-c", type=int, default=1, dest="connections")
    p.add_argument("-t", default="60s", dest="duration", help="per mode, split over the rounds")
    p.add_argument("-jitter", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--warmup",
        default="",
        help="unmeasured load before round 0, split over the modes (at least 2 s each), "
        "to get past the pods' first full garbage collection after their models load; "
        "default: 1,000 requests a pod at -qps, at least 30 s",
    )
    p.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="Envoy --concurrency of both gateways: on a 2-core machine that also runs "
        "the pods, a second worker only adds contention",
    )
    p.add_argument("--protocols", default="rest,grpc")
    p.add_argument(
        "--modes",
        default="plain,subsets,direct",
        help=f"comma-separated, of {', '.join(MODES)} (direct: gRPC only)",
    )
    p.add_argument(
        "--tool",
        choices=["builtin", "fortio"],
        default="builtin",
        help="fortio: drive the fortio binary on PATH for the REST runs",
    )
    p.add_argument("--storage", default=".run/models", help="sample models (make models)")
    p.add_argument("--out", default="bench-results/compare.json")
    p.add_argument("--png", default="bench-results/compare.png")
    args = p.parse_args(argv)
    args.protocols = [x for x in args.protocols.split(",") if x]
    args.modes = [x for x in args.modes.split(",") if x]
    unknown = sorted(set(args.modes) - set(MODES)) + sorted(set(args.protocols) - {"rest", "grpc"})
    if unknown:
        print(f"error: unknown mode or protocol: {', '.join(unknown)}", file=sys.stderr)
        return 2
    args.duration = parse_duration(args.duration) / args.rounds
    args.warmup = parse_duration(args.warmup) if args.warmup else 0.0
    if args.tool == "fortio" and shutil.which("fortio") is None:
        print("error: --tool fortio needs fortio on PATH", file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="modelxds-compare-") as tmp:
        report = asyncio.run(compare(args, Path(tmp)))
    title = (
        f"{args.pods} pods, {args.models} models x {args.copies}, "
        f"-qps {args.qps:g} -c {args.connections}"
    )
    plot(report["modes"], Path(args.png), title)
    for key, data in report["modes"].items():
        print(
            f"{key:>14}: {data['latency_ms']}  forwarded {data['forwarded_share']:.1%}"
            f"  ({data['requests']} requests)"
        )
    for proto in args.protocols:
        plain, subsets = (report["modes"].get(f"{proto}/{m}") for m in ("plain", "subsets"))
        if plain and subsets:
            ratio = {
                k: round(subsets["latency_ms"][k] / plain["latency_ms"][k], 3)
                for k in plain["latency_ms"]
            }
            report.setdefault("ratio_subsets_over_plain", {})[proto] = ratio
            print(f"{proto} subsets/plain: {ratio}")
        for gateway in ("epp", "subsets"):
            # the target: a gateway's p99 within 2 ms of going straight to the holder
            mine, direct = (report["modes"].get(f"{proto}/{m}") for m in (gateway, "direct"))
            if mine and direct:
                over = {
                    k: round(mine["latency_ms"][k] - direct["latency_ms"][k], 3)
                    for k in direct["latency_ms"]
                }
                report.setdefault(f"{gateway}_minus_direct_ms", {})[proto] = over
                print(f"{proto} {gateway} - direct (ms): {over}")
    for data in report["modes"].values():
        data.pop("samples")
    for r in report["runs"]:
        r["result"]["DurationHistogram"].pop("Data", None)
    write_result(
        args.out,
        {
            "benchmark": "compare",
            "machine": machine(),
            "args": {k: v for k, v in vars(args).items()},
            "seconds": round(time.time() - started),
            **report,
        },
    )
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
