"""Envoy bootstrap for a gateway that takes all its config from modelxds over ADS."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

XDS_CLUSTER = "modelxds"


def split_address(address: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``) -> (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or default_host, int(port)


def join_address(host: str, port: int) -> str:
    """(host, port) -> ``HOST:PORT``, an IPv6 host in brackets (``[::1]:8033``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# HTTP/2 PINGs on the xDS connection: a control plane that vanished without closing the
# connection (node lost, SIGSTOP, a dropped NAT entry) is found within interval + timeout,
# and Envoy reconnects, to another replica when --xds lists several.
XDS_KEEPALIVE = {"interval": "10s", "timeout": "5s"}


@dataclass(frozen=True)
class XdsTls:
    """TLS from the gateway to modelxds (serve --xds-tls-cert): file paths as Envoy will
    see them (on the gateway's machine or in its pod), so they are not read here."""

    ca: str  # CA certificates the server's certificate must chain to
    cert: str | None = None  # client certificate, for mutual TLS (serve --xds-client-ca)
    key: str | None = None
    server_name: str | None = None  # the server certificate's SAN, sent as SNI

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("give --tls-cert and --tls-key together")


TLS_SOCKET = "envoy.transport_sockets.tls"
UPSTREAM_TLS_CONTEXT = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)


def xds_transport_socket(tls: XdsTls) -> dict[str, Any]:
    """The xDS cluster's ``transport_socket``: an UpstreamTlsContext that trusts ``tls.ca``,
    presents the client certificate, and when a server name is given checks the server's
    certificate for it and sends it as SNI."""
    validation: dict[str, Any] = {"trusted_ca": {"filename": tls.ca}}
    # Envoy's client default stops at TLS 1.2; the gRPC server speaks 1.3
    common: dict[str, Any] = {"tls_params": {"tls_maximum_protocol_version": "TLSv1_3"}}
    if tls.cert and tls.key:
        common["tls_certificates"] = [
            {"certificate_chain": {"filename": tls.cert}, "private_key": {"filename": tls.key}}
        ]
    common["validation_context"] = validation
    context: dict[str, Any] = {"@type": UPSTREAM_TLS_CONTEXT, "common_tls_context": common}
    name = tls.server_name
    if name:
        san_type = "IP_ADDRESS" if _is_ip(name) else "DNS"
        validation["match_typed_subject_alt_names"] = [
            {"san_type": san_type, "matcher": {"exact": name}}
        ]
        if san_type == "DNS":
            context["sni"] = name  # SNI carries host names only (RFC 6066), never an IP
    return {"name": TLS_SOCKET, "typed_config": context}


def bootstrap(
    xds_addresses: str | Sequence[str],
    node_id: str,
    admin_address: str,
    *,
    cluster: str = "modelxds-gateway",
    tls: XdsTls | None = None,
) -> dict[str, Any]:
    """A gateway that takes every listener, route and cluster from modelxds over ADS;
    several ``xds_addresses`` are replicas of one control plane (any one serves it).
    With ``tls``, the connection to them is TLS (mutual with a client certificate)."""
    addresses = [xds_addresses] if isinstance(xds_addresses, str) else list(xds_addresses)
    if not addresses:
        raise ValueError("give the control plane's address: --xds HOST:PORT")
    xds = [split_address(a) for a in addresses]
    admin_host, admin_port = split_address(admin_address)
    # a Kubernetes Service name needs DNS; numeric addresses resolve to themselves there too
    discovery = "STATIC" if all(_is_ip(host) for host, _ in xds) else "STRICT_DNS"
    ads = {"ads": {}, "resource_api_version": "V3"}
    xds_cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": discovery,
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {"connection_keepalive": XDS_KEEPALIVE}
                },
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket(host, port)}} for host, port in xds
                    ]
                }
            ],
        },
    }
    if tls is not None:
        xds_cluster["transport_socket"] = xds_transport_socket(tls)
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": _socket(admin_host, admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {"clusters": [xds_cluster]},
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# InferencePool spec.appProtocol: HTTP/2 cleartext to the pods (gRPC), or HTTP/1.1
APP_PROTOCOLS = ("kubernetes.io/h2c", "http")
FAILURE_MODES = ("FailOpen", "FailClose")


def epp_bootstrap(
    epp_address: str,
    pool_endpoints: list[str],
    *,
    admin_address: str = "127.0.0.1:15000",
    listen_address: str = "0.0.0.0",
    listen_port: int = 8008,
    node_id: str = "gateway",
    cluster: str = "modelxds-gateway",
    epp_plaintext: bool = False,
    failure_mode: str = "FailClose",
    app_protocol: str = "kubernetes.io/h2c",
) -> dict[str, Any]:
    """A static Envoy bootstrap in the shape the GIE implementations build (Istio's):
    the ``ext_proc`` filter calls the endpoint picker at ``epp_address`` and the pool's
    load balancer is ``override_host``, which sends the request to the picked
    ``ip:port`` (its list's next entries on retries) and falls back to round robin."""
    from modelxds.epp.gateway import gateway_bootstrap  # the Envoy API messages live there

    if failure_mode not in FAILURE_MODES:
        raise ValueError(f"failure mode must be one of {', '.join(FAILURE_MODES)}")
    if app_protocol not in APP_PROTOCOLS:
        raise ValueError(f"app protocol must be one of {', '.join(APP_PROTOCOLS)}")
    if not pool_endpoints:
        raise ValueError("give the pool's pods: --pool-endpoint IP:PORT (or a DNS name:PORT)")
    return gateway_bootstrap(
        split_address(epp_address),
        [split_address(e) for e in pool_endpoints],
        admin=split_address(admin_address),
        listen=(listen_address, listen_port),
        node_id=node_id,
        cluster=cluster,
        epp_tls=not epp_plaintext,
        failure_mode_allow=failure_mode == "FailOpen",
        http2=app_protocol == "kubernetes.io/h2c",
    )
