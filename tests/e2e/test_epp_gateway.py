"""The endpoint picker's gateway (`modelxds bootstrap --epp`) on a real Envoy in front of
stand-in pods, with its picker down: what a client sends does not choose the pod."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelxds.epp.exchange import DESTINATION_HEADER
from modelxds.epp.gateway import gateway_bootstrap
from modelxds.localmesh import processes
from modelxds.localmesh.client import grpc_seed
from modelxds.localmesh.sample import SampleBackend
from modelxds.localmesh.stack import wait_until

pytestmark = pytest.mark.e2e

MODEL = "m"


async def test_with_the_picker_down_a_client_cannot_pick_the_pod_by_the_pickers_header(
    tmp_path: Path,
) -> None:
    """FailOpen and no picker: requests go on by the pool's round robin. The gateway reads
    the pick from `x-gateway-destination-endpoint`, so one a client sent itself is
    removed before the picker is asked; else every request naming a pod lands there."""
    pods = [SampleBackend(f"127.0.9.{51 + i}", 0, f"pod-{i}") for i in range(2)]
    for pod in pods:
        await pod.start()
    listen, admin = processes.free_port(), processes.free_port()
    bootstrap = gateway_bootstrap(
        ("127.0.0.1", processes.free_port()),  # nothing listens there: the picker is down
        [(pod.host, pod.port) for pod in pods],
        admin=("127.0.0.1", admin),
        listen=("127.0.0.1", listen),
        node_id="epp-gateway",
        cluster="epp-gateway",
        epp_tls=False,
        failure_mode_allow=True,
        http2=True,
    )
    envoy = processes.start_envoy("envoy", bootstrap, tmp_path, concurrency=1)
    gateway = f"127.0.0.1:{listen}"
    try:

        async def answers() -> bool:
            return (await grpc_seed(gateway, MODEL)).model_name == MODEL

        await wait_until(answers, 20, "the gateway to answer without its picker", interval=0.2)
        chosen = pods[1]
        before = [pod.served[MODEL] for pod in pods]
        for _ in range(8):
            await grpc_seed(gateway, MODEL, {DESTINATION_HEADER: chosen.address})
        served = [pod.served[MODEL] - b for pod, b in zip(pods, before, strict=True)]
        assert served == [4, 4], served  # round robin, as without the header
    finally:
        envoy.stop()
        for pod in pods:
            await pod.stop()
