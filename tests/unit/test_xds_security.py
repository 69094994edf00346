"""The xDS port's security as operators and gateways meet it, without Envoy: which node ids
a client certificate allows (checked through a real mutual-TLS grpc.aio server, so what
gRPC hands the server is part of the test), the flags' errors, the gateway bootstrap's
TLS block, and the loopback defaults of the metrics and admin endpoints."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from prometheus_client import REGISTRY

from modelxds import cli
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.identity import Identity, spiffe_name
from modelxds.xds.resources import CLUSTER
from modelxds.xds.server import AdsServer
from modelxds.xds.tls import channel_credentials, server_credentials
from tests.certs import Certs, make_certs, sans
from tests.unit.xds_messages import cluster

SPIFFE_ID = "spiffe://cluster.local/ns/modelmesh-serving/sa/modelxds-gateway"
# common name -> subject alternative names of the client certificates made for these tests
CLIENTS: dict[str, list[x509.GeneralName]] = {
    "dns-gw": sans(dns=["gw-a", "gw-a.modelmesh-serving.svc"]),
    "uri-gw": sans(uris=["urn:modelxds:gw-b"]),
    "spiffe-gw": sans(uris=[SPIFFE_ID]),
    "cn-gw": [],  # no SANs: the common name is its identity
    "ip-gw": [x509.IPAddress(ipaddress.ip_address("10.0.0.9"))],  # SANs: the CN no longer is
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), CLIENTS)


def identity(certs: Certs, client: str) -> Identity:
    return Identity.from_pem(certs.client(client)[0].read_bytes())


# --- the rule


@pytest.mark.parametrize(
    ("client", "node_id"),
    [
        ("dns-gw", "gw-a"),
        ("dns-gw", "gw-a.modelmesh-serving.svc"),
        ("uri-gw", "urn:modelxds:gw-b"),
        ("spiffe-gw", SPIFFE_ID),
        ("spiffe-gw", "modelxds-gateway"),  # the service account of the workload identity
        ("cn-gw", "cn-gw"),
    ],
)
def test_a_certificate_allows_its_sans_spiffe_name_or_lone_common_name(
    certs: Certs, client: str, node_id: str
) -> None:
    assert identity(certs, client).allows(node_id)


@pytest.mark.parametrize(
    ("client", "node_id"),
    [
        ("dns-gw", "gw-b"),  # another gateway's name
        ("dns-gw", "dns-gw"),  # the CN of a certificate with SANs
        ("dns-gw", "GW-A"),  # exactly, not case-folded
        ("dns-gw", ""),
        ("uri-gw", "gw-b"),  # only spiffe:// URIs give their last segment
        ("spiffe-gw", "sa"),
        ("spiffe-gw", "cluster.local"),
        ("ip-gw", "ip-gw"),  # an IP SAN is a SAN: the CN no longer counts
        ("ip-gw", "10.0.0.9"),  # nor is an IP address a node id
    ],
)
def test_a_certificate_allows_nothing_else(certs: Certs, client: str, node_id: str) -> None:
    assert not identity(certs, client).allows(node_id)


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("spiffe://td/ns/a/sa/b", "b"),
        ("spiffe://td/workload", "workload"),
        ("spiffe://td", ""),
        ("spiffe://td/", ""),
        ("https://td/ns/a/sa/b", ""),
    ],
)
def test_the_spiffe_name_is_the_last_path_segment(uri: str, name: str) -> None:
    assert spiffe_name(uri) == name


# --- through a real mutual-TLS server


@dataclass
class Secured:
    address: str
    certs: Certs

    def channel(self, client: str) -> grpc.aio.Channel:
        cert, key = self.certs.client(client)
        credentials = channel_credentials(str(self.certs.ca), str(cert), str(key))
        return grpc.aio.secure_channel(self.address, credentials)


@pytest_asyncio.fixture
async def secured(certs: Certs) -> AsyncIterator[Secured]:
    """An ADS server with one cluster to serve, asking for client certificates of the CA."""
    cache = SnapshotCache()
    cache.set({CLUSTER: {"model-a": cluster("model-a")}})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([AdsServer(cache, require_identity=True).handler()])
    credentials = server_credentials(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    assert credentials is not None
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield Secured(f"127.0.0.1:{port}", certs)
    finally:
        await server.stop(None)


def request(node_id: str | None) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
    if node_id is not None:
        req.node.CopyFrom(base_pb2.Node(id=node_id))
    return req


async def first_response(
    channel: grpc.aio.Channel, *requests: discovery_pb2.DiscoveryRequest
) -> discovery_pb2.DiscoveryResponse:
    """What the server answers a stream sending ``requests``; raises AioRpcError."""
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
        iter(requests)
    )
    try:
        return await asyncio.wait_for(call.read(), 5)
    finally:
        call.cancel()


def refusals(reason: str) -> float:
    labels = {"reason": reason}
    return REGISTRY.get_sample_value("modelxds_xds_identity_refusals_total", labels) or 0.0


@pytest.mark.parametrize(
    ("client", "node_id"),
    [
        ("dns-gw", "gw-a"),
        ("uri-gw", "urn:modelxds:gw-b"),
        ("spiffe-gw", "modelxds-gateway"),
        ("cn-gw", "cn-gw"),
    ],
)
async def test_a_gateway_is_served_under_a_node_id_its_certificate_names(
    secured: Secured, client: str, node_id: str
) -> None:
    async with secured.channel(client) as channel:
        resp = await first_response(channel, request(node_id))
    assert resp.type_url == CLUSTER and len(resp.resources) == 1


@pytest.mark.parametrize(
    ("client", "node_id", "identities"),
    [
        ("dns-gw", "gw-b", ["'gw-a' (DNS SAN)", "'gw-a.modelmesh-serving.svc' (DNS SAN)"]),
        ("spiffe-gw", "gw-a", [f"'{SPIFFE_ID}' (URI SAN)", "'modelxds-gateway' (last segment"]),
        ("ip-gw", "ip-gw", ["none"]),
    ],
)
async def test_a_gateway_posing_as_another_node_gets_nothing_and_is_told_why(
    secured: Secured,
    client: str,
    node_id: str,
    identities: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = refusals("not_in_certificate")
    async with secured.channel(client) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first_response(channel, request(node_id))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = refused.value.details() or ""
    assert f"node id {node_id!r}" in details
    for name in identities:
        assert name in details
    assert refusals("not_in_certificate") == before + 1
    logged = [r for r in caplog.records if "refused gateway" in r.getMessage()]
    assert len(logged) == 1 and details in logged[0].getMessage()


async def test_a_first_request_without_a_node_id_is_refused(secured: Secured) -> None:
    before = refusals("no_node_id")
    async with secured.channel("dns-gw") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first_response(channel, request(None))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusals("no_node_id") == before + 1


async def test_a_stream_that_names_another_node_later_is_refused(secured: Secured) -> None:
    """Both names are the certificate's, but one stream is one node: a gateway that could
    switch would leave `modelxds status` and the logs naming the wrong one."""
    before = refusals("node_id_changed")
    async with secured.channel("dns-gw") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([request("gw-a"), request("gw-a.modelmesh-serving.svc")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'gw-a.modelmesh-serving.svc'" in (refused.value.details() or "")
    assert refusals("node_id_changed") == before + 1


@pytest.mark.parametrize("client", ["stranger", None], ids=["other-ca", "no-certificate"])
async def test_a_client_without_a_certificate_of_the_ca_cannot_connect(
    secured: Secured, client: str | None
) -> None:
    ca = secured.certs.ca.read_bytes()
    if client is None:
        credentials = grpc.ssl_channel_credentials(ca)
    else:
        cert, key = secured.certs.client(client)
        credentials = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    async with grpc.aio.secure_channel(secured.address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first_response(channel, request("gw-a"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# --- serve's flags


def serve(*args: str) -> int:
    return cli.main(["serve", "--metrics-address", "", "--xds-address", "127.0.0.1:0", *args])


@pytest.fixture
def files(certs: Certs, tmp_path: Path) -> dict[str, str]:
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    (tmp_path / "encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    return {
        "encrypted_key": str(tmp_path / "encrypted.key"),
        "cert": str(certs.server_cert),
        "key": str(certs.server_key),
        "ca": str(certs.ca),
        "other_key": str(certs.client_key),
        "missing": str(tmp_path / "missing.pem"),
        "folder": str(tmp_path),
    }


# case -> (serve's TLS flags, the one error line it logs); words in braces are files
SERVE_TLS_ERRORS = {
    "missing": (
        "--xds-tls-cert {missing} --xds-tls-key {key}",
        "--xds-tls-cert {missing}: cannot read it: No such file",
    ),
    "unreadable": (
        "--xds-tls-cert {cert} --xds-tls-key {folder}",
        "--xds-tls-key {folder}: cannot read it: Is a directory",
    ),
    "cert-is-a-key": (
        "--xds-tls-cert {key} --xds-tls-key {key}",
        "--xds-tls-cert {key}: no PEM certificate in it",
    ),
    "key-is-a-cert": (
        "--xds-tls-cert {cert} --xds-tls-key {cert}",
        "--xds-tls-key {cert}: no PEM private key in it",
    ),
    "encrypted-key": (
        "--xds-tls-cert {cert} --xds-tls-key {encrypted_key}",
        "--xds-tls-key {encrypted_key}: the key is encrypted; give it unencrypted",
    ),
    "mismatched": (
        "--xds-tls-cert {cert} --xds-tls-key {other_key}",
        "--xds-tls-key {other_key} is not the private key of the certificate in "
        "--xds-tls-cert {cert}",
    ),
    "ca-is-a-key": (
        "--xds-tls-cert {cert} --xds-tls-key {key} --xds-client-ca {key}",
        "--xds-client-ca {key}: no PEM certificate in it",
    ),
    "no-key": ("--xds-tls-cert {cert}", "give --xds-tls-cert and --xds-tls-key together"),
    "ca-alone": ("--xds-client-ca {ca}", "give --xds-tls-cert and --xds-tls-key together"),
}


@pytest.mark.parametrize(("flags", "says"), SERVE_TLS_ERRORS.values(), ids=SERVE_TLS_ERRORS)
def test_serve_names_the_flag_and_file_that_cannot_serve_tls(
    files: dict[str, str], flags: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert serve(*flags.format_map(files).split()) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert says.format_map(files) in errors[0]
    assert "PRIVATE KEY" not in caplog.text  # a file is named, never shown


def test_tls_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELXDS_XDS_TLS_CERT", "/tls/tls.crt")
    monkeypatch.setenv("MODELXDS_XDS_TLS_KEY", "/tls/tls.key")
    monkeypatch.setenv("MODELXDS_XDS_CLIENT_CA", "/tls/ca.crt")
    monkeypatch.setenv("MODELXDS_TLS_CA", "/gw/ca.crt")
    args = cli.build_parser().parse_args(["serve"])
    assert (args.xds_tls_cert, args.xds_tls_key, args.xds_client_ca) == (
        "/tls/tls.crt",
        "/tls/tls.key",
        "/tls/ca.crt",
    )
    assert cli.build_parser().parse_args(["status"]).tls_ca == "/gw/ca.crt"
    assert cli.build_parser().parse_args(["bootstrap"]).tls_ca == "/gw/ca.crt"


# --- the gateway bootstrap


def bootstrap(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, Any, str]:
    code = cli.main(["bootstrap", "--xds", "modelxds-xds.modelmesh-serving.svc:18000", *flags])
    out, err = capsys.readouterr()
    return code, yaml.safe_load(out) if code == 0 else None, err


def xds_cluster(doc: Any) -> dict[str, Any]:
    (found,) = doc["static_resources"]["clusters"]
    assert isinstance(found, dict)
    return found


def test_the_bootstrap_reaches_modelxds_over_mutual_tls(capsys: pytest.CaptureFixture[str]) -> None:
    name = "modelxds-xds.modelmesh-serving.svc"
    code, doc, err = bootstrap(
        capsys,
        *("--tls-ca", "/etc/envoy/tls/ca.crt", "--tls-cert", "/etc/envoy/tls/tls.crt"),
        *("--tls-key", "/etc/envoy/tls/tls.key", "--tls-server-name", name),
    )
    assert code == 0, err
    assert err == ""
    socket = xds_cluster(doc)["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context.pop("@type") == (
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    )
    assert context == {
        "common_tls_context": {
            "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": "/etc/envoy/tls/tls.crt"},
                    "private_key": {"filename": "/etc/envoy/tls/tls.key"},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": "/etc/envoy/tls/ca.crt"},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": name}}],
            },
        },
        "sni": name,
    }
    # Envoy's own message takes every field by these names
    json_format.ParseDict(context, tls_pb2.UpstreamTlsContext())
    # the xDS connection still pings the server over HTTP/2
    options = xds_cluster(doc)["typed_extension_protocol_options"]
    (http,) = options.values()
    assert http["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]


def test_a_server_name_that_is_an_ip_address_is_checked_as_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc, err = bootstrap(capsys, "--tls-ca", "ca.crt", "--tls-server-name", "10.0.0.5")
    assert code == 0, err
    context = xds_cluster(doc)["transport_socket"]["typed_config"]
    validation = context["common_tls_context"]["validation_context"]
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.5"}}
    ]
    assert "sni" not in context  # SNI carries host names only
    assert "tls_certificates" not in context["common_tls_context"]  # one-way TLS


def test_without_a_server_name_the_bootstrap_warns_what_it_accepts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc, err = bootstrap(capsys, "--tls-ca", "ca.crt")
    assert code == 0
    assert "without --tls-server-name" in err
    validation = xds_cluster(doc)["transport_socket"]["typed_config"]["common_tls_context"]
    assert "match_typed_subject_alt_names" not in validation["validation_context"]


def test_without_tls_flags_the_bootstrap_is_plaintext(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = bootstrap(capsys)
    assert code == 0
    assert "transport_socket" not in xds_cluster(doc)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ("--tls-ca ca.crt --tls-cert tls.crt", "give --tls-cert and --tls-key together"),
        ("--tls-cert tls.crt --tls-key tls.key", "need --tls-ca"),
        ("--tls-server-name x", "need --tls-ca"),
        ("--epp 127.0.0.1:9002 --pool-endpoint 10.0.0.1:8033 --tls-ca ca.crt", "--epp"),
    ],
)
def test_bootstrap_tls_flags_that_do_not_go_together(
    capsys: pytest.CaptureFixture[str], flags: str, says: str
) -> None:
    code, _, err = bootstrap(capsys, *flags.split())
    assert code == 2
    assert says in err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--tls-cert", "tls.crt"], "need --tls-ca"),
        (["--tls-ca", "/nowhere/ca.crt"], "--tls-ca /nowhere/ca.crt: cannot read it"),
    ],
)
def test_status_names_the_tls_flag_that_cannot_serve(
    capsys: pytest.CaptureFixture[str], flags: list[str], says: str
) -> None:
    assert cli.main(["status", "--xds", "127.0.0.1:1", *flags]) == 2
    assert says in capsys.readouterr().err


# --- loopback unless told otherwise


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for flag in ("--metrics-address", "--admin-address"):
        monkeypatch.delenv(cli._env(flag), raising=False)
    yield


@pytest.mark.parametrize("command", [["serve"], ["label"], ["epp"]])
def test_metrics_and_probes_listen_on_loopback_by_default(
    clean_env: None, command: list[str]
) -> None:
    address = cli.build_parser().parse_args(command).metrics_address
    assert address.rpartition(":")[0] == "127.0.0.1"


@pytest.mark.parametrize(
    "flags", [[], ["--epp", "127.0.0.1:9002", "--pool-endpoint", "10.0.0.1:8033"]]
)
def test_every_bootstrap_keeps_envoy_admin_on_loopback(
    clean_env: None, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    code, doc, err = bootstrap(capsys, *flags)
    assert code == 0, err
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
