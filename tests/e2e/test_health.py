"""`modelxds serve`'s probes against a real etcd: not ready until the first config is
published, ready after, not ready again once etcd has been gone past the grace; the
gRPC health service on the xDS port says the same, and each push is one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest

from modelxds.health import NOT_SERVING, SERVING, HealthCheckRequest, HealthCheckResponse
from modelxds.localmesh import processes
from modelxds.localmesh.stack import wait_until

pytestmark = pytest.mark.e2e


async def _readyz(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as r:
        return r.status, await r.text()


async def _grpc_status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        return int((await check(HealthCheckRequest(service=service), timeout=5)).status)


async def test_serve_is_ready_once_its_first_config_is_out_and_not_while_etcd_is_gone(
    tmp_path: Path,
) -> None:
    etcd_port, xds_port, metrics_port = (processes.free_port() for _ in range(3))
    xds, url = f"127.0.0.1:{xds_port}", f"http://127.0.0.1:{metrics_port}"
    serve = processes.spawn(
        "modelxds",
        [
            *(sys.executable, "-m", "modelxds.cli", "--log-format", "json", "serve"),
            *("--etcd", f"http://127.0.0.1:{etcd_port}", "--xds-address", xds),
            *("--metrics-address", f"127.0.0.1:{metrics_port}", "--ready-etcd-grace-s", "1"),
        ],
        tmp_path,
    )
    etcd = None
    try:
        # etcd is not there yet: serve starts anyway, alive but not ready
        processes.wait_for_port(serve, "127.0.0.1", metrics_port)
        assert await _readyz(url) == (503, "placement not read from etcd yet\n")
        assert await _grpc_status(xds, "liveness") == SERVING
        assert await _grpc_status(xds, "") == NOT_SERVING

        etcd = processes.start_etcd(tmp_path / "etcd", etcd_port)

        async def ready() -> bool:
            return await _readyz(url) == (200, "ok\n")

        await wait_until(ready, 60, "/readyz to answer 200 after the first config")
        assert await _grpc_status(xds, "") == SERVING
        assert await _grpc_status(xds, "readiness") == SERVING
        pushes = [
            doc
            for line in serve.log_path.read_text().splitlines()
            if "gateways" in (doc := json.loads(line))
        ]
        assert pushes and pushes[0]["logger"] == "modelxds.xds.controller"
        assert "lds" in pushes[0]["types"] and pushes[0]["gateways"] == 0

        etcd.stop()

        async def unready() -> bool:
            return (await _readyz(url))[0] == 503

        await wait_until(unready, 60, "/readyz to answer 503 with etcd gone")
        assert (await _readyz(url))[1].startswith("etcd unreachable for ")
        assert await _grpc_status(xds, "readiness") == NOT_SERVING
        assert await _grpc_status(xds, "liveness") == SERVING
    finally:
        serve.stop()
        if etcd is not None:
            etcd.stop()
