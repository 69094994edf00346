"""Health: /healthz, /readyz and gRPC health over a real etcd; the JSON log line of a push;
the operations doc and the script that writes it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web

from modelxds.health import (
    NOT_SERVING,
    SERVING,
    Health,
    HealthCheckRequest,
    HealthCheckResponse,
    readiness,
    start_http,
)
from modelxds.kserve import descriptor_set_bytes
from modelxds.localmesh import opsdoc
from modelxds.localmesh.processes import free_port, start_etcd
from modelxds.localmesh.stack import Stack, wait_until
from modelxds.logs import JsonFormatter
from modelxds.modelmesh import Layout
from modelxds.placement.model import Placement
from modelxds.placement.watch import PlacementWatcher
from modelxds.policy import default_policy
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.controller import Controller
from modelxds.xds.ir import Options
from modelxds.xds.subset import SubsetStrategy

NS = "modelmesh-serving"


@contextlib.asynccontextmanager
async def http(ready: Callable[[], str | None]) -> AsyncIterator[str]:
    address = f"127.0.0.1:{free_port()}"
    runner: web.AppRunner = await start_http(address, ready)
    try:
        yield f"http://{address}"
    finally:
        await runner.cleanup()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return r.status, await r.text()


async def test_healthz_and_metrics_answer_beside_an_unready_readyz() -> None:
    async with http(lambda: "placement not read from etcd yet") as url:
        assert await get(f"{url}/healthz") == (200, "ok\n")
        assert await get(f"{url}/readyz") == (503, "placement not read from etcd yet\n")
        status, body = await get(f"{url}/metrics")
        assert status == 200
        assert "# TYPE modelxds_snapshots_total counter" in body


async def test_readyz_turns_ready_with_the_first_config_and_not_after_etcd_is_gone(
    tmp_path: Path,
) -> None:
    port = free_port()
    etcd = start_etcd(tmp_path, port)
    watcher = PlacementWatcher(f"http://127.0.0.1:{port}", [(NS, Layout())], max_backoff=0.2)
    cache = SnapshotCache()
    ready = readiness(
        watcher,
        0.5,
        [
            (watcher.synced.is_set, "placement not read from etcd yet"),
            (cache.ready.is_set, "no config published yet"),
        ],
    )
    watching = asyncio.create_task(watcher.run())
    try:
        async with http(ready) as url:
            await watcher.synced.wait()
            assert await get(f"{url}/readyz") == (503, "no config published yet\n")
            cache.set({})  # as the controller's first publish does
            assert await get(f"{url}/readyz") == (200, "ok\n")

            etcd.stop()

            async def unready() -> bool:
                return (await get(f"{url}/readyz"))[0] == 503

            await wait_until(unready, 30, "/readyz to answer 503 without etcd")
            _, why = await get(f"{url}/readyz")
            assert why.startswith("etcd unreachable for ")
            assert "--ready-etcd-grace-s 0.5" in why
            assert await get(f"{url}/healthz") == (200, "ok\n")  # alive all the same
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        etcd.stop()


class Fake:
    """An etcd contact that answered a fixed time ago."""

    def __init__(self, out: float) -> None:
        self.out = out

    def unreachable_for(self, now: float | None = None) -> float:
        return self.out


@pytest.mark.parametrize(("out", "ready"), [(0.0, True), (59.0, True), (61.0, False)])
def test_only_an_etcd_outage_past_the_grace_makes_a_process_unready(
    out: float, ready: bool
) -> None:
    assert (readiness(Fake(out), 60, [])() is None) == ready


async def test_grpc_health_answers_by_service_name() -> None:
    published = asyncio.Event()
    ready = readiness(Fake(0), 60, [(published.is_set, "no config published yet")])
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Health.probes(ready).handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=HealthCheckRequest.SerializeToString,
                response_deserializer=HealthCheckResponse.FromString,
            )
            watch = channel.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=HealthCheckRequest.SerializeToString,
                response_deserializer=HealthCheckResponse.FromString,
            )

            async def status(service: str) -> int:
                return int((await check(HealthCheckRequest(service=service))).status)

            assert await status("liveness") == SERVING
            assert await status("") == NOT_SERVING
            assert await status("readiness") == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await status("no-such-service")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

            stream = watch(HealthCheckRequest(service="readiness"))
            seen = [(await stream.read()).status]
            published.set()
            seen.append((await stream.read()).status)
            stream.cancel()
            assert seen == [NOT_SERVING, SERVING]
            assert await status("") == SERVING
    finally:
        await server.stop(grace=None)


async def test_a_push_is_one_json_line_with_versions_types_gateways_and_duration() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("modelxds.xds.controller")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    cache = SnapshotCache()
    controller = Controller(
        lambda: Placement,  # an empty placement each time
        asyncio.Event(),
        default_policy(),
        cache,
        Options(descriptor_set=descriptor_set_bytes()),
        translator=SubsetStrategy(),
        gateways=lambda: 3,
    )
    try:
        await controller.publish()
        await controller.publish()  # nothing changed: nothing pushed, no line
    finally:
        logger.removeHandler(handler)
        logger.level = level
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["level"] == "INFO" and doc["logger"] == "modelxds.xds.controller"
    assert doc["gateways"] == 3 and doc["duration_ms"] >= 0 and "time" in doc
    assert doc["types"] and set(doc["versions"]) == set(doc["types"])
    assert set(doc["types"]) <= {"cds", "eds", "lds", "srds", "rds"}
    for kind, version in doc["versions"].items():
        assert f"{kind}={version}" in doc["message"]


def test_the_operations_doc_shows_each_command_as_its_script_ran_it() -> None:
    doc = opsdoc.DOC.read_text()
    generated = doc[doc.index(opsdoc.BEGIN) : doc.index(opsdoc.END)]
    assert "python -m modelxds.localmesh.opsdoc" in doc.replace(generated, "")
    stack = Stack(Path("unused"), xds_port=18000, admin_port=15000, etcd_port=2379)
    shown = opsdoc.commands(stack)
    for args in shown:
        assert f"$ .venv/bin/modelxds {' '.join(args)}\n" in generated
    assert {args[0] for args in shown} == {"status", "inspect", "placement"}
    assert ["placement", "--model"] in [[args[0], args[-2]] for args in shown]
    # the script can write it again: its markers are where it looks for them
    assert opsdoc.replace_section(doc, generated + opsdoc.END) == doc
