"""etcd faults with real processes: a real etcd (or three), `modelxds serve`, a real Envoy
and sample pods, under a paced load through the gateway. After each fault the gateway's
endpoints (its admin config dump) equal a fresh `modelxds placement --json`, both ways."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from modelxds.localmesh import processes
from modelxds.localmesh.stack import Stack, pod_instance_id, wait_until
from modelxds.modelmesh import Table
from tests.e2e.gwclient import serving
from tests.e2e.load import paced_load
from tests.e2e.test_churn import hold_models, mixed_requests
from tests.e2e.test_strategy_equivalence import LOADED_LONG_AGO, LOADING_FOR_MS, gateway
from tests.reliability import harness
from tests.reliability.conftest import Recorder

pytestmark = pytest.mark.e2e

RATE = 100  # requests/s through the gateway, on schedule (open loop)
WORKERS = 8
OUTAGE_S = 30
# a value this big fills the watch stream's buffers in a few dozen writes
FILLER = b"x" * 256 * 1024
MAX_FILLER_WRITES = 600  # 150 MB: far more than socket buffers, HTTP/2 windows and etcd's queue


async def retried(write: Callable[[], Awaitable[object]], what: str, timeout: float = 15) -> None:
    """Await ``write()`` until it succeeds: the client may still be reconnecting."""

    async def ok() -> bool:
        await write()
        return True

    await wait_until(ok, timeout, what, interval=0.2)


async def test_etcd_down_30s_under_load(tmp_path: Path, fault_row: Recorder) -> None:
    """etcd SIGKILLed under load and started again on its data dir and port 30 s later.

    While it is down the gateway keeps its config (no request fails, its endpoints do
    not change). What happens to the pods' leases: etcd keeps them, and the member that
    becomes leader on restart extends every lease by its full TTL (lessor.Promote), so
    pods that renew within the TTL after etcd is back keep them. The stand-in pods get
    a client that reconnects within a second (harness.prompt_pod_client); the test
    shows the same lease ids are alive after. A copy added right after etcd returns is
    picked up, and the gateway then equals a fresh read.
    """
    async with gateway(tmp_path, "subset") as (stack, client):
        slots = await hold_models(stack, client)
        await harness.prompt_pod_client(stack)
        leases = {r.instance_id: r.lease_id for r in slots}
        before = await asyncio.to_thread(harness.gateway_endpoints, stack.admin)
        etcd = next(p for p in stack.processes if p.name == "etcd")
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            await asyncio.sleep(1)
            etcd.kill()
            await asyncio.sleep(OUTAGE_S - 1)
            during = await asyncio.to_thread(harness.gateway_endpoints, stack.admin)
            await asyncio.sleep(1)
            await harness.restart(stack, etcd, stack.etcd_port)
            back = time.monotonic()
            # model m0 (on pod 0 alone) gains a copy on pod 1
            await retried(lambda: slots[1].add_copy("m0", started_ms=LOADED_LONG_AGO), "a write")
            diff = await harness.until_exact(stack, 45, loaded_after_ms=LOADING_FOR_MS)
            converge = time.monotonic() - back
            report = await harness.fresh_read(stack, loaded_after_ms=LOADING_FOR_MS)
            await asyncio.sleep(1)  # requests to the new holder too
        alive = {iid: (await stack.etcd.get_lease_info(lid)).TTL for iid, lid in leases.items()}
        fault_row(
            fault="etcd down 30 s under load",
            injected="SIGKILL etcd; same data dir and port again after 30 s; a copy added",
            requests=load.sent,
            failures=load.failures.total(),
            converge_s=round(converge, 2),
            lost=diff.describe(),
        )
        load.check("etcd down 30 s")
        assert during == before, harness.Diff.of(before, during).describe()
        assert not diff, diff.describe()
        (mesh,) = report["namespaces"].values()
        assert mesh["models"]["m0"]["loaded"] == [pod_instance_id(0), pod_instance_id(1)]
        assert set(mesh["instances"]) == set(leases)
        assert all(ttl > 0 for ttl in alive.values()), alive  # the same leases, kept


def etcd_gauge(stack: Stack, name: str) -> float:
    url = f"{stack.etcd_url}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return harness.counter(resp.read().decode(), name)


async def test_compaction_past_a_watcher_behind(tmp_path: Path, fault_row: Recorder) -> None:
    """The watch falls behind with events pending, etcd compacts past it: serve re-lists.

    What is real: serve is SIGSTOPped (its socket stays open, unread) while 256 KB
    writes to a key it watches (and ignores) fill the TCP buffers, the HTTP/2 window
    and etcd's per-stream queue, until etcd itself counts the watcher slow (its gauge
    etcd_debugging_mvcc_slow_watcher_total: the watcher is a "victim", taken off the
    synced group, its later events left in the store). Then m0 moves from pod 0 to
    pod 1, etcd compacts to the current revision, and serve resumes: once it has read
    what was queued, etcd resumes the watch from the store, finds its revision
    compacted and says so; serve must re-list to see the move.
    """
    async with gateway(tmp_path, "subset") as (stack, client):
        slots = await hold_models(stack, client)
        serve = next(p for p in stack.processes if p.name == "modelxds")
        assert harness.counter(stack.metrics(), "modelxds_etcd_compactions_total") == 0
        filler = (stack.layout.mm_prefix + "leaderLatch/_filler").encode()
        move = stack.layout.key(Table.REGISTRY, "m0").encode()
        writes = 0
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            with harness.stopped(serve):
                while etcd_gauge(stack, "etcd_debugging_mvcc_slow_watcher_total") < 1:
                    assert writes < MAX_FILLER_WRITES, "etcd never counted serve's watch slow"
                    for _ in range(8):
                        await stack.etcd.put(filler, FILLER)
                    writes += 8
                await slots[1].add_copy("m0", started_ms=LOADED_LONG_AGO)
                await slots[0].remove_copy("m0")
                got = await stack.etcd.get(move)
                assert got is not None
                await stack.etcd.compact(got.mod_revision, physical=True)
            resumed = time.monotonic()
            diff = await harness.until_exact(stack, 30, loaded_after_ms=LOADING_FOR_MS)
            converge = time.monotonic() - resumed
            await asyncio.sleep(1)
        metrics = stack.metrics()
        compactions = harness.counter(metrics, "modelxds_etcd_compactions_total")
        restarts = harness.counter(
            metrics, 'modelxds_etcd_watch_restarts_total{reason="compacted_or_cancelled"}'
        )
        fault_row(
            fault="etcd compacted past a watcher that is behind",
            injected=f"SIGSTOP serve, {writes} x 256 KB writes, move a copy, compact, SIGCONT",
            requests=load.sent,
            failures=load.failures.total(),
            converge_s=round(converge, 2),
            lost=diff.describe(),
        )
        load.check("compaction while behind")
        assert compactions == 1 and restarts == 1, (compactions, restarts)
        assert not diff, diff.describe()
        routes = await asyncio.to_thread(harness.gateway_endpoints, stack.admin)
        assert {e[3] for e in routes if e[2] == "m0"} == {pod_instance_id(1)}


def ss_ports(proc: processes.Process) -> set[int]:
    return harness.connected_ports(proc.popen.pid)


async def test_etcd_member_in_use_killed(tmp_path: Path, fault_row: Recorder) -> None:
    """A 3-member etcd cluster on loopback; serve is given all three (--etcd A,B,C) and
    watches through the first. That member is SIGKILLed under load (it may be the
    leader: the others elect a new one); serve's watch moves to another member, and a
    copy added after the kill (written through the third member, where the pods keep
    their leases) reaches the gateway."""
    ports = [(processes.free_port(), processes.free_port()) for _ in range(3)]
    cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    members = [
        processes.start_etcd(
            tmp_path / f"m{i}", client, peer, name=f"m{i}", initial_cluster=cluster
        )
        for i, (client, peer) in enumerate(ports)
    ]
    urls = ",".join(f"http://127.0.0.1:{client}" for client, _ in ports)
    stack = Stack(
        tmp_path / "stack",
        etcd_port=ports[2][0],
        own_etcd=False,
        serve_args=("--etcd", urls, "--strategy", "subset"),
    )
    stack.processes.extend(members)  # stopped with the stack
    async with serving(stack) as client:
        slots = await hold_models(stack, client)
        serve = next(p for p in stack.processes if p.name == "modelxds")
        first = ports[0][0]
        assert first in ss_ports(serve), ss_ports(serve)
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            await asyncio.sleep(1)
            members[0].kill()
            killed = time.monotonic()
            # a write fails while the others elect a leader (if it was one): retried
            await retried(lambda: slots[2].add_copy("m0", started_ms=LOADED_LONG_AGO), "write")
            diff = await harness.until_exact(stack, 30)
            converge = time.monotonic() - killed
            await asyncio.sleep(1)
        now_on = ss_ports(serve) & {c for c, _ in ports}
        fault_row(
            fault="etcd member in use killed (3-member cluster)",
            injected="SIGKILL the member serve watches through; a copy added after",
            requests=load.sent,
            failures=load.failures.total(),
            converge_s=round(converge, 2),
            lost=diff.describe(),
        )
        load.check("etcd member killed")
        assert not diff, diff.describe()
        assert now_on and first not in now_on, now_on
        routes = await asyncio.to_thread(harness.gateway_endpoints, stack.admin)
        assert {e[3] for e in routes if e[2] == "m0"} == {
            pod_instance_id(0),
            pod_instance_id(2),
        }
