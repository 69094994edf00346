"""Client Status Discovery Service: which gateway has which config, accepted or rejected.

The view `istioctl proxy-status` gives for Istio: per connected gateway and per
resource type, the version sent, whether the gateway ACKed or NACKed it (with its
error), and whether it is behind the current config. An entry the gateway is behind
on (STALE, NACKED, NOT_SENT) carries in ``last_updated`` when it fell behind: when the
oldest version it has yet to ACK was published.
"""

from __future__ import annotations

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from modelxds.xds.resources import PUSH_ORDER
from modelxds.xds.server import AdsServer, Stream, behind_since

ConfigStatus = csds_pb2.ConfigStatus
ClientStatus = config_dump_shared_pb2.ClientResourceStatus


class CsdsServicer(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, ads: AdsServer) -> None:
        self.ads = ads

    async def FetchClientStatus(
        self, request: csds_pb2.ClientStatusRequest, context: grpc.aio.ServicerContext
    ) -> csds_pb2.ClientStatusResponse:
        wanted = {m.node_id.exact for m in request.node_matchers if m.node_id.exact}
        return csds_pb2.ClientStatusResponse(
            config=[
                self._client_config(stream)
                for stream in sorted(self.ads.streams.values(), key=lambda s: s.node_id)
                if not wanted or stream.node_id in wanted
            ]
        )

    def _client_config(self, stream: Stream) -> csds_pb2.ClientConfig:
        config = csds_pb2.ClientConfig(
            node=base_pb2.Node(id=stream.node_id, cluster=stream.cluster)
        )
        for type_url in PUSH_ORDER:
            state = stream.types.get(type_url)
            if state is None:
                continue
            current = self.ads.cache.get(type_url)
            names = sorted(state.sent_names if state.sent_names is not None else current.resources)
            for name in names or [""]:
                entry = config.generic_xds_configs.add(
                    type_url=type_url, name=name, version_info=state.sent_version or ""
                )
                if state.sent_version is None:
                    entry.config_status = ConfigStatus.NOT_SENT
                elif state.nacked_version == state.sent_version:
                    entry.config_status = ConfigStatus.ERROR
                    entry.client_status = ClientStatus.NACKED
                    entry.error_state.details = state.nack_message
                elif state.acked_version == state.sent_version:
                    entry.client_status = ClientStatus.ACKED
                    entry.config_status = (
                        ConfigStatus.SYNCED
                        if state.sent_version == current.version
                        else ConfigStatus.STALE
                    )
                else:
                    entry.config_status = ConfigStatus.STALE  # sent, no answer yet
                    entry.client_status = ClientStatus.REQUESTED
                since = behind_since(state, current)
                if since is not None:
                    entry.last_updated.FromNanoseconds(int(since * 1e9))
        return config


def add_to_server(ads: AdsServer, server: grpc.aio.Server) -> None:
    csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(CsdsServicer(ads), server)
