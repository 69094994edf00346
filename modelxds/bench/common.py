"""Shared by the benchmarks: machine facts, percentiles, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc

from modelxds.bench.stats import percentile
from modelxds.localmesh.processes import binary
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.server import AdsServer


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        envoy = (
            subprocess.run(
                [binary("envoy"), "--version"], capture_output=True, text=True, timeout=10
            )
            .stdout.strip()
            .split("version: ")[-1]
        )
    except (OSError, subprocess.SubprocessError):
        envoy = "unknown"
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "envoy": envoy,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "min_ms": round(min(ms), 2),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def write_result(path: str, result: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


async def ads_server() -> tuple[SnapshotCache, AdsServer, grpc.aio.Server, int]:
    """An ADS server on a free loopback port, as `modelxds serve` runs one."""
    cache = SnapshotCache()
    ads = AdsServer(cache)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers([ads.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return cache, ads, server, port
