"""Control-plane faults with real processes: `modelxds serve` SIGKILLed and restarted,
and a replica gone half-open (SIGSTOP: its sockets stay open, nothing answers) under a
gateway that lists two replicas. The gateway keeps serving its last config meanwhile;
afterwards its endpoints equal a fresh `modelxds placement --json`, both ways."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from modelxds.localmesh import processes
from modelxds.localmesh.stack import pod_host, pod_instance_id
from modelxds.xds.bootstrap import XDS_KEEPALIVE, bootstrap
from tests.e2e.gwclient import gateway_status, xds_status
from tests.e2e.load import paced_load
from tests.e2e.test_churn import hold_models, mixed_requests
from tests.e2e.test_strategy_equivalence import LOADED_LONG_AGO, LOADING_FOR_MS, gateway
from tests.reliability import harness
from tests.reliability.conftest import Recorder

pytestmark = pytest.mark.e2e

RATE = 100  # requests/s through the gateway, on schedule (open loop)
WORKERS = 8
DOWN_S = 3  # serve stays dead this long, the gateway on its own
GATEWAY = "gateway-0"  # the stack's Envoy node id


async def test_serve_killed_under_load(tmp_path: Path, fault_row: Recorder) -> None:
    """serve SIGKILLed under load: the gateway keeps its config (no request fails) and
    does not see a copy added while serve is dead; serve started again re-syncs it:
    the copy shows up, and `modelxds status` has the gateway ACKing every type."""
    async with gateway(tmp_path, "subset") as (stack, client):
        slots = await hold_models(stack, client)
        serve = next(p for p in stack.processes if p.name == "modelxds")
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            await asyncio.sleep(1)
            serve.kill()
            stack.processes.remove(serve)
            await slots[2].add_copy("m0", started_ms=LOADED_LONG_AGO)  # m0: pod 0, now 2 too
            await asyncio.sleep(DOWN_S)
            stale = await harness.compare(stack, loaded_after_ms=LOADING_FOR_MS)
            restarted = time.monotonic()
            await stack.start_serve()
            diff = await harness.until_exact(stack, 30, loaded_after_ms=LOADING_FOR_MS)
            converge = time.monotonic() - restarted
            await asyncio.sleep(1)
        status = await gateway_status(stack)
        fault_row(
            fault="modelxds serve SIGKILLed under load",
            injected=f"SIGKILL serve, a copy added, serve started again after {DOWN_S} s",
            requests=load.sent,
            failures=load.failures.total(),
            converge_s=round(converge, 2),
            lost=diff.describe(),
        )
        load.check("serve killed")
        # while serve was dead the gateway had its last config: the new copy alone missing
        new = {
            (stack.gateway_port, p, "m0", pod_instance_id(2), pod_host(2)) for p in ("grpc", "rest")
        }
        assert stale.lost == new and not stale.phantom, stale.describe()
        assert not diff, diff.describe()
        assert harness.synced(status, GATEWAY), status


def detection_bound_s() -> float:
    """How long Envoy takes at most to find a silent xDS connection dead: an interval
    (plus Envoy's default 15 % jitter) without an answer to its PING, then the timeout."""
    interval, timeout = (float(XDS_KEEPALIVE[k].removesuffix("s")) for k in ("interval", "timeout"))
    return interval * 1.15 + timeout


async def test_half_open_replica(tmp_path: Path, fault_row: Recorder) -> None:
    """A gateway whose bootstrap lists two serve replicas; the one it streams from is
    SIGSTOPped (the TCP connection stays up, nothing answers: a vanished node). Envoy's
    HTTP/2 keepalive on the xDS cluster finds it dead and the gateway reconnects to the
    other replica, which then lists it; a copy added after the stop reaches it.

    Envoy picks a replica per connection; if it picks the stopped one again (its kernel
    still accepts connections) it takes another keepalive period: the bound allows two.
    """
    async with gateway(tmp_path, "subset") as (stack, client):
        slots = await hold_models(stack, client)
        second_port = processes.free_port()
        second = await stack.start_serve(second_port, processes.free_port())
        first = next(p for p in stack.processes if p.name == "modelxds")
        replicas = {f"127.0.0.1:{stack.xds_port}": first, f"127.0.0.1:{second_port}": second}
        # the stack's Envoy knows one replica: in its place, one that knows both
        old = next(p for p in stack.processes if p.name == "envoy")
        old.stop()
        stack.processes.remove(old)
        config = bootstrap(list(replicas), GATEWAY, stack.admin)
        envoy = processes.start_envoy("envoy-ha", config, stack.workdir)
        stack.processes.append(envoy)
        assert not await harness.until_exact(stack, 30)

        def streaming_from() -> list[str]:
            return [a for a in replicas if harness.synced(xds_status(a), GATEWAY)]

        (used,) = await asyncio.to_thread(streaming_from)
        (other,) = set(replicas) - {used}
        async with paced_load(mixed_requests(client), RATE, WORKERS) as load:
            await asyncio.sleep(1)
            with harness.stopped(replicas[used]):
                stopped = time.monotonic()
                await slots[2].add_copy("m0", started_ms=LOADED_LONG_AGO)
                bound = 2 * detection_bound_s() + 5
                while not harness.synced(await asyncio.to_thread(xds_status, other), GATEWAY):
                    assert time.monotonic() - stopped < bound + 10, "the gateway never moved"
                    await asyncio.sleep(0.5)
                moved = time.monotonic() - stopped
                diff = await harness.until_exact(stack, 30, loaded_after_ms=LOADING_FOR_MS)
                converge = time.monotonic() - stopped
                await asyncio.sleep(1)
        fault_row(
            fault="half-open control plane (replica frozen) under load",
            injected="SIGSTOP the serve replica the gateway streams from; a copy added",
            requests=load.sent,
            failures=load.failures.total(),
            converge_s=round(converge, 2),
            lost=diff.describe(),
        )
        print(f"gateway moved to {other} {moved:.1f}s after the stop (bound {bound:.1f}s)")
        load.check("half-open replica")
        assert not diff, diff.describe()
        assert moved <= bound, (moved, bound)
