"""`modelxds serve` with mutual TLS on the xDS port, and real Envoys bootstrapped by
`modelxds bootstrap --tls-...`: a gateway whose certificate names its node id gets its
config and routes; one presenting another gateway's node id gets nothing (the refusal
counted and logged) while the first goes on being served; clients without a certificate
of the CA are refused; `modelxds status` reaches the server with the same flags.

The certificates are made at test time (tests/certs.py): the server's names localhost and
127.0.0.1, each gateway's its own identity.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import yaml
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from modelxds.health import SERVING, HealthCheckRequest, HealthCheckResponse
from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh import processes
from modelxds.localmesh.sample import SampleBackend
from modelxds.localmesh.stack import seed_policy, wait_until
from modelxds.modelmesh import Layout
from modelxds.modelmesh.registrar import PodRegistration, etcd_client
from modelxds.serve import ONE_WAY_TLS_WARNING, PLAINTEXT_WARNING
from tests.certs import Certs, make_certs, sans

pytestmark = pytest.mark.e2e

GATEWAY = "gateway-a"  # DNS SAN of its certificate
OTHER = "gateway-b"  # a SPIFFE ID whose last segment is its name
OTHER_SPIFFE_ID = f"spiffe://cluster.local/ns/modelmesh-serving/sa/{OTHER}"
POD_HOST, POD_ID = "127.0.9.31", "7dd689-tls001"
LOADED_LONG_AGO = 1  # epoch ms: a copy whose load started long ago counts as loaded


def modelxds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelxds.cli", *args], capture_output=True, text=True, timeout=60
    )


@dataclass
class SecureServe:
    """`modelxds serve` asking for client certificates, over one pod in a real etcd."""

    workdir: Path
    certs: Certs
    xds_port: int
    metrics_port: int
    gateway_port: int
    pod: SampleBackend
    registration: PodRegistration
    envoys: dict[str, processes.Process] = field(default_factory=dict)
    admins: dict[str, str] = field(default_factory=dict)

    @property
    def xds(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    @property
    def log(self) -> str:
        return (self.workdir / "modelxds.log").read_text()

    def tls_flags(self, client: str) -> list[str]:
        cert, key = self.certs.client(client)
        return [
            *("--tls-ca", str(self.certs.ca), "--tls-cert", str(cert), "--tls-key", str(key)),
            *("--tls-server-name", "localhost"),
        ]

    def start_envoy(self, name: str, node_id: str, client: str) -> None:
        """An Envoy from `modelxds bootstrap`, as node ``node_id`` with ``client``'s
        certificate."""
        admin = f"127.0.0.1:{processes.free_port()}"
        out = modelxds(
            *("bootstrap", "--xds", self.xds, "--node-id", node_id, "--admin-address", admin),
            *self.tls_flags(client),
        )
        assert out.returncode == 0, out.stderr
        self.envoys[name] = processes.start_envoy(name, yaml.safe_load(out.stdout), self.workdir)
        self.admins[name] = admin

    def listeners(self, envoy: str) -> str:
        return processes.admin_get(self.admins[envoy], "/listeners").strip()

    def refusals(self, reason: str) -> float:
        text = processes.admin_get(f"127.0.0.1:{self.metrics_port}", "/metrics")
        found = re.search(
            rf'^modelxds_xds_identity_refusals_total{{reason="{reason}"}} (\S+)$', text, re.M
        )
        return float(found[1]) if found else 0.0

    async def routes(self, model: str) -> None:
        """Wait until a request for ``model`` through the gateway reaches the pod."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.gateway_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def routed() -> bool:
                await stub.ModelInfer(
                    pb.ModelInferRequest(model_name=model), metadata=(("model", model),), timeout=2
                )
                return self.pod.served[model] > 0

            await wait_until(routed, 20, f"{model} routed to the pod through the gateway")


@pytest_asyncio.fixture
async def secure(etcd_url: str, tmp_path: Path) -> AsyncIterator[SecureServe]:
    certs = make_certs(
        tmp_path / "certs", {GATEWAY: sans(dns=[GATEWAY]), OTHER: sans(uris=[OTHER_SPIFFE_ID])}
    )
    layout = Layout(f"rp-xds-tls-{uuid.uuid4().hex[:8]}")  # the module's etcd is shared
    client = etcd_client(etcd_url)
    await client.connect()
    pod = SampleBackend(POD_HOST, processes.free_port(POD_HOST), POD_ID)
    await pod.start()
    registration = PodRegistration(client, layout, POD_ID, POD_HOST)
    await registration.register()
    await registration.add_copy("model-a", LOADED_LONG_AGO)
    s = SecureServe(
        tmp_path,
        certs,
        processes.free_port(),
        processes.free_port(),
        processes.free_port(),
        pod,
        registration,
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(seed_policy(s.gateway_port, pod.port))
    serve = processes.spawn(
        "modelxds",
        [
            *(sys.executable, "-m", "modelxds.cli", "serve", "--etcd", etcd_url),
            *("--root-prefix", layout.root_prefix, "--policy", str(policy)),
            *("--xds-address", s.xds, "--metrics-address", f"127.0.0.1:{s.metrics_port}"),
            *("--listen-address", "127.0.0.1"),
            *("--xds-tls-cert", str(certs.server_cert), "--xds-tls-key", str(certs.server_key)),
            *("--xds-client-ca", str(certs.ca)),
        ],
        tmp_path,
    )
    try:
        processes.wait_for_port(serve, "127.0.0.1", s.xds_port)
        yield s
    finally:
        for envoy in s.envoys.values():
            envoy.stop()
        serve.stop()
        await registration.stop()
        await pod.stop()
        await client.close()


async def test_a_gateway_posing_as_another_gets_no_config_while_the_real_one_is_served(
    secure: SecureServe,
) -> None:
    secure.start_envoy("envoy-a", GATEWAY, GATEWAY)
    await secure.routes("model-a")

    # gateway-b's certificate, gateway-a's node id
    before = secure.refusals("not_in_certificate")
    secure.start_envoy("envoy-impostor", GATEWAY, OTHER)

    async def refused() -> bool:
        return secure.refusals("not_in_certificate") > before

    await wait_until(refused, 20, "the impostor's stream refused")
    assert (
        f"node id {GATEWAY!r} is not one of the client certificate's identities: "
        f"{OTHER_SPIFFE_ID!r} (URI SAN), {OTHER!r} (last segment of {OTHER_SPIFFE_ID})"
    ) in secure.log

    # the real gateway still follows placement: a model loaded after the refusal routes
    await secure.registration.add_copy("model-b", LOADED_LONG_AGO)
    await secure.routes("model-b")
    assert secure.listeners("envoy-a")
    assert secure.listeners("envoy-impostor") == ""  # it never got a listener
    stats = processes.admin_get(secure.admins["envoy-impostor"], "/stats?filter=ssl.handshake")
    assert re.search(r"cluster\.modelxds\.ssl\.handshake: [1-9]", stats), stats  # TLS was fine

    # status, through the same secured port, sees the real gateway only
    secure.envoys.pop("envoy-impostor").stop()
    out = modelxds("status", "--xds", secure.xds, "--json", *secure.tls_flags(OTHER))
    assert out.returncode == 0, out.stderr
    assert [row["gateway"] for row in json.loads(out.stdout)] == [GATEWAY]
    plaintext = modelxds("status", "--xds", secure.xds)
    assert plaintext.returncode == 1
    assert f"cannot reach modelxds at {secure.xds}" in plaintext.stderr
    assert "give --tls-ca" in plaintext.stderr
    assert "PRIVATE KEY" not in secure.log  # files are named, never shown


async def test_clients_without_a_certificate_of_the_ca_are_refused(secure: SecureServe) -> None:
    ca = secure.certs.ca.read_bytes()
    stranger_cert, stranger_key = secure.certs.client("stranger")  # signed by another CA
    cert, key = secure.certs.client(GATEWAY)
    refused = {
        "plaintext": grpc.aio.insecure_channel(secure.xds),
        "no certificate": grpc.aio.secure_channel(secure.xds, grpc.ssl_channel_credentials(ca)),
        "another CA's certificate": grpc.aio.secure_channel(
            secure.xds,
            grpc.ssl_channel_credentials(ca, stranger_key.read_bytes(), stranger_cert.read_bytes()),
        ),
    }
    for why, channel in refused.items():
        async with channel:
            stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, why

    # with a certificate of the CA, CSDS and gRPC health answer on the same port
    good = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    async with grpc.aio.secure_channel(secure.xds, good) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        await stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=5)
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )

        async def serving() -> bool:
            response = await check(HealthCheckRequest(service="liveness"), timeout=5)
            return bool(response.status == SERVING)

        await wait_until(serving, 10, "gRPC health over mutual TLS")


@pytest.mark.parametrize(
    ("host", "tls", "warning"),
    [
        ("0.0.0.0", False, PLAINTEXT_WARNING),
        ("127.0.0.1", False, None),
        ("0.0.0.0", True, ONE_WAY_TLS_WARNING),
    ],
    ids=["any", "loopback", "one-way-tls"],
)
def test_serving_gateways_without_proof_of_identity_beyond_loopback_warns_once_at_start(
    etcd_url: str, tmp_path: Path, host: str, tls: bool, warning: str | None
) -> None:
    port = processes.free_port()
    certs = make_certs(tmp_path / "certs")
    flags = ("--xds-tls-cert", str(certs.server_cert), "--xds-tls-key", str(certs.server_key))
    serve = processes.spawn(
        "modelxds",
        [
            *(sys.executable, "-m", "modelxds.cli", "serve", "--etcd", etcd_url),
            *("--xds-address", f"{host}:{port}", "--metrics-address", ""),
            *(flags if tls else ()),
        ],
        tmp_path,
    )
    try:
        processes.wait_for_port(serve, "127.0.0.1", port)
    finally:
        serve.stop()
    log = (tmp_path / "modelxds.log").read_text()
    for each in (PLAINTEXT_WARNING, ONE_WAY_TLS_WARNING):
        assert log.count(each % f"{host}:{port}") == (each == warning), log
