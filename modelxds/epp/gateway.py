"""The Envoy API messages of the endpoint picker's gateway (``modelxds bootstrap --epp``):
one listener whose ``ext_proc`` filter asks the picker, and a pool cluster whose
``override_host`` load balancer goes where the picker said. Istio builds the same for an
InferencePool; the modes and timeouts below are the ones it sets."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2, json_format, wrappers_pb2

from modelxds.epp.exchange import DESTINATION_HEADER, SUBSET_NAMESPACE
from modelxds.xds.builders import (
    LB_NAMESPACE,
    NO_TIMEOUT,
    eject_on_refused_connection,
    http2_upstream,
    http_filter,
    ms,
    pack,
    retry_policy,
    unlimited_retries,
)

EPP_CLUSTER = "modelxds-epp"
POOL_CLUSTER = "inference-pool"
# the picker's gRPC health service that says it has read the placement (modelxds epp)
EPP_HEALTH_SERVICE = "readiness"
Mode = processing_mode_pb2.ProcessingMode


def gateway_bootstrap(
    epp: tuple[str, int],
    pool: Sequence[tuple[str, int]],
    *,
    admin: tuple[str, int],
    listen: tuple[str, int],
    node_id: str,
    cluster: str,
    epp_tls: bool,
    failure_mode_allow: bool,
    http2: bool,
) -> dict[str, Any]:
    """The bootstrap as the plain data ``modelxds bootstrap`` prints."""
    config = bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node_id, cluster=cluster),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            listeners=[_listener(listen, failure_mode_allow)],
            clusters=[_epp_cluster(epp, epp_tls), _pool_cluster(pool, http2)],
        ),
    )
    config.admin.address.CopyFrom(_address(*admin))
    # through JSON: MessageToDict gives an Any's fields as an OrderedDict, which YAML
    # cannot print
    doc: dict[str, Any] = json.loads(
        json_format.MessageToJson(config, preserving_proto_field_name=True)
    )
    return doc


def ext_proc_filter(failure_mode_allow: bool) -> ext_proc_pb2.ExternalProcessor:
    return ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=EPP_CLUSTER),
            timeout=duration_pb2.Duration(seconds=10),
        ),
        # InferencePool failureMode: FailOpen lets the pool's own load balancer pick
        failure_mode_allow=failure_mode_allow,
        # FailClose: a picker that cannot answer is the gateway's 503 (UNAVAILABLE for
        # gRPC), not Envoy's default 500
        status_on_error=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
        processing_mode=Mode(
            request_header_mode=Mode.SEND,
            request_body_mode=Mode.FULL_DUPLEX_STREAMED,
            # FULL_DUPLEX_STREAMED needs the trailers, which say the body is complete
            request_trailer_mode=Mode.SEND,
            response_header_mode=Mode.SEND,
            response_body_mode=Mode.FULL_DUPLEX_STREAMED,
            response_trailer_mode=Mode.SEND,
        ),
        # a held headers response waits for the body, which may be slow to come
        message_timeout=duration_pb2.Duration(seconds=1000),
        # allow_mode_override stays false: the picker never changes what it is sent
        metadata_options=ext_proc_pb2.MetadataOptions(
            # without this Envoy drops the picker's envoy.lb metadata
            receiving_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[LB_NAMESPACE]
            ),
            forwarding_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[LB_NAMESPACE, SUBSET_NAMESPACE]
            ),
        ),
    )


def drop_client_pick() -> header_mutation_pb2.HeaderMutation:
    """Removes a ``x-gateway-destination-endpoint`` the client sent, before the picker is
    asked: override_host reads that header first, so with the picker down and FailOpen
    the client would choose the pod itself (the picker's answer replaces it otherwise)."""
    remove = mutation_rules_pb2.HeaderMutation(remove=DESTINATION_HEADER)
    return header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(request_mutations=[remove])
    )


def override_host_policy() -> cluster_pb2.LoadBalancingPolicy:
    """The picked ``ip:port`` list from the header, else from ``envoy.lb`` metadata;
    round robin when neither is there (the picker is down and fails open)."""
    sources = [
        override_host_pb2.OverrideHost.OverrideHostSource(header=DESTINATION_HEADER),
        override_host_pb2.OverrideHost.OverrideHostSource(
            metadata=metadata_pb2.MetadataKey(
                key=LB_NAMESPACE,
                path=[metadata_pb2.MetadataKey.PathSegment(key=DESTINATION_HEADER)],
            )
        ),
    ]
    fallback = _policy("envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin())
    return _policy(
        "envoy.load_balancing_policies.override_host",
        override_host_pb2.OverrideHost(override_host_sources=sources, fallback_policy=fallback),
    )


def _policy(name: str, config: Any) -> cluster_pb2.LoadBalancingPolicy:
    return cluster_pb2.LoadBalancingPolicy(
        policies=[
            cluster_pb2.LoadBalancingPolicy.Policy(
                typed_extension_config=extension_pb2.TypedExtensionConfig(
                    name=name, typed_config=pack(config)
                )
            )
        ]
    )


def _listener(listen: tuple[str, int], failure_mode_allow: bool) -> listener_pb2.Listener:
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(
            cluster=POOL_CLUSTER,
            timeout=NO_TIMEOUT,  # model loads take minutes; ModelMesh holds the request
            retry_policy=retry_policy(),
        ),
    )
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="epp_gateway",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,  # gRPC and REST on one port
        normalize_path=wrappers_pb2.BoolValue(value=True),
        route_config=route_pb2.RouteConfiguration(
            name="inference-pool",
            virtual_hosts=[
                route_components_pb2.VirtualHost(name="pool", domains=["*"], routes=[route])
            ],
        ),
        http_filters=[
            http_filter("envoy.filters.http.header_mutation", drop_client_pick()),
            http_filter("envoy.filters.http.ext_proc", ext_proc_filter(failure_mode_allow)),
            http_filter("envoy.filters.http.router", router_pb2.Router()),
        ],
    )
    return listener_pb2.Listener(
        name=f"gateway_{listen[1]}",
        address=_address(*listen),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=pack(hcm),
                    )
                ]
            )
        ],
    )


def _epp_cluster(epp: tuple[str, int], tls: bool) -> cluster_pb2.Cluster:
    c = _cluster(EPP_CLUSTER, [epp])
    _http2(c)
    _known_down_when_down(c)
    if tls:
        # the GIE chart's picker has a self-signed certificate, which Istio does not
        # verify (DestinationRule tls SIMPLE, insecureSkipVerify)
        c.transport_socket.name = "envoy.transport_sockets.tls"
        c.transport_socket.typed_config.CopyFrom(
            pack(
                tls_pb2.UpstreamTlsContext(
                    common_tls_context=tls_pb2.CommonTlsContext(alpn_protocols=["h2"])
                )
            )
        )
    return c


def _known_down_when_down(c: cluster_pb2.Cluster) -> None:
    """Let the gateway know the picker is down before it opens a stream to it.

    ext_proc fails open (FailOpen) in FULL_DUPLEX_STREAMED only until the first body
    chunk has gone to the picker; a stream to a dead picker fails when its connection
    is refused, after the request's first chunk went out, so the request fails closed.
    A stream to a cluster with no healthy host fails as it opens, before any chunk, and
    fails open. So the first refused connection ejects the picker (outlier detection on
    local-origin errors), gRPC health checks keep it out while it is down and bring it
    back once it answers ready, and the panic threshold 0 keeps Envoy from sending to an
    unhealthy picker anyway when it is the only one.
    """
    c.health_checks.append(
        health_check_pb2.HealthCheck(
            timeout=ms(1000),
            interval=ms(1000),
            no_traffic_interval=ms(1000),
            unhealthy_threshold=wrappers_pb2.UInt32Value(value=2),
            healthy_threshold=wrappers_pb2.UInt32Value(value=1),
            grpc_health_check=health_check_pb2.HealthCheck.GrpcHealthCheck(
                service_name=EPP_HEALTH_SERVICE
            ),
        )
    )
    eject_on_refused_connection(c)


def _pool_cluster(pool: Sequence[tuple[str, int]], http2: bool) -> cluster_pb2.Cluster:
    c = _cluster(POOL_CLUSTER, pool)
    c.load_balancing_policy.CopyFrom(override_host_policy())
    # the retries that walk the picked list: a pod that dies wants them all at once
    c.circuit_breakers.CopyFrom(unlimited_retries())
    if http2:
        _http2(c)
    return c


def _http2(c: cluster_pb2.Cluster) -> None:
    for key, options in http2_upstream().items():
        c.typed_extension_protocol_options[key].CopyFrom(options)


def _cluster(name: str, endpoints: Sequence[tuple[str, int]]) -> cluster_pb2.Cluster:
    """STATIC for IP addresses; a DNS name (a Kubernetes Service; headless for the pods)
    makes it STRICT_DNS."""
    static = all(_is_ip(host) for host, _ in endpoints)
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC if static else cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=ms(1000),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(address=_address(h, p))
                        )
                        for h, p in endpoints
                    ]
                )
            ],
        ),
    )


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
