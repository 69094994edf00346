"""A config Envoy rejects is reported, and the rejected version is not pushed again in a loop."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

from modelxds.localmesh import processes
from modelxds.localmesh.stack import Stack, pod_instance_id, seed_policy, wait_until
from tests.e2e.gwclient import Client, gateway_status


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_listener_envoy_cannot_bind_is_nacked_once_and_not_resent(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    gw_port = processes.free_port()
    pod_port = processes.free_port("127.0.0.11")
    # one VirtualService listening on a free port and on a port something else holds
    policy = seed_policy(gw_port, pod_port).replace(
        f"- port: {gw_port}", f"- port: {gw_port}\n    - port: {busy_port}"
    )
    stack = Stack(tmp_path / "s", gateway_port=gw_port, pod_port=pod_port, policy_text=policy)
    await stack.start()
    client = Client(stack)
    try:

        async def nacked() -> bool:
            return (
                _metric(
                    await asyncio.to_thread(stack.metrics), "modelxds_xds_nacks_total", type="lds"
                )
                >= 1
            )

        await wait_until(nacked, 15, "the gateway to reject the listener config")
        sent = _metric(stack.metrics(), "modelxds_xds_responses_total", type="lds")
        await asyncio.sleep(3)  # long enough for a resend loop to show
        metrics = stack.metrics()
        assert _metric(metrics, "modelxds_xds_responses_total", type="lds") == sent
        assert _metric(metrics, "modelxds_xds_nacks_total", type="lds") == 1
        assert _metric(metrics, "modelxds_xds_nacked_streams", type="lds") == 1
        log = stack.processes[1].log_path.read_text()
        assert "rejected lds" in log and str(busy_port) in log
        # the operator's view of the same: this gateway NACKed LDS, the rest is in sync
        (row,) = await gateway_status(stack)
        assert row["LDS"].startswith("NACKED")
        assert any(str(busy_port) in e for e in row["errors"])
        assert row["CDS"].startswith("SYNCED") and row["RDS"].startswith("SYNCED")
        assert row["behind_seconds"] > 0  # on LDS, since the rejected version was published
        # the listener Envoy could bind still serves, routed by placement as usual
        holder = pod_instance_id(2)
        await stack.pod(holder)[1].add_copy("m", started_ms=1)

        async def routed() -> bool:
            return {await client.grpc("m", [("model", "m")]) for _ in range(5)} == {holder}

        await wait_until(routed, 10, "routing on the listener that did bind")
    finally:
        busy.close()
        await client.close()
        await stack.stop()
