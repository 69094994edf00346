"""An operator's view of a placement change: one convergence observation per version the
gateway takes, and `modelxds status` saying the gateway is in sync on every type it uses."""

from __future__ import annotations

import asyncio
import re

import pytest

from modelxds.localmesh.stack import Stack, pod_instance_id, wait_until
from tests.e2e.gwclient import Client, answers, gateway_status

pytestmark = pytest.mark.e2e

LOADED_LONG_AGO = 1  # epoch ms: the copy is loaded at once, no later transition by the clock
CHANGES = 3


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text format (0 when absent)."""
    want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    m = re.search(rf"^{re.escape(name + want)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def unobserved(text: str) -> float:
    return sum(
        float(v)
        for v in re.findall(r"^modelxds_xds_convergence_unobserved_total\{.*\} (\S+)$", text, re.M)
    )


async def scrape(stack: Stack) -> str:
    return await asyncio.to_thread(stack.metrics)


async def in_sync(stack: Stack) -> bool:
    return sample(await scrape(stack), "modelxds_xds_behind_streams") == 0


async def test_each_placement_change_is_one_convergence_observation(
    stack: Stack, client: Client
) -> None:
    await wait_until(lambda: in_sync(stack), 15, "the gateway to ACK its first config")
    before = await scrape(stack)
    count = sample(before, "modelxds_xds_convergence_seconds_count")
    holder = pod_instance_id(1)
    for i in range(CHANGES):
        # one etcd write, then wait for the gateway to route by it: one new version
        model = f"m{i}"
        await stack.pod(holder)[1].add_copy(model, started_ms=LOADED_LONG_AGO)

        async def routed(model: str = model) -> bool:
            return await answers(client, model, holder)

        await wait_until(routed, 15, f"{model} routed to {holder}")

        async def observed(want: float = count + i + 1) -> bool:
            got = sample(await scrape(stack), "modelxds_xds_convergence_seconds_count")
            return got >= want

        await wait_until(observed, 15, f"the convergence of change {i + 1} to be observed")
    after = await scrape(stack)
    assert sample(after, "modelxds_xds_convergence_seconds_count") == count + CHANGES
    assert sample(after, "modelxds_xds_convergence_seconds_bucket", le="+Inf") == sample(
        after, "modelxds_xds_convergence_seconds_count"
    )
    took = sample(after, "modelxds_xds_convergence_seconds_sum") - sample(
        before, "modelxds_xds_convergence_seconds_sum"
    )
    assert took > 0
    assert unobserved(after) == unobserved(before)  # nothing rejected, nobody left
    assert sample(after, "modelxds_xds_max_behind_seconds") == 0
    assert sample(after, "modelxds_xds_nacked_streams", type="lds") == 0
    assert sample(after, "modelxds_xds_sent_bytes_total", type="cds") > 0

    # every type the gateway uses is SYNCED, scoped routes included under `scale`
    (row,) = await gateway_status(stack)
    scale = "scale" in stack.serve_args
    used = ["CDS", "EDS", "LDS", "RDS"] + (["SRDS"] if scale else [])
    assert {t: row[t].split()[0] for t in used} == dict.fromkeys(used, "SYNCED")
    if not scale:
        assert row["SRDS"] == "NOT REQUESTED"  # its listeners route without scopes
    assert row["behind_seconds"] is None and row["errors"] == []
