"""The KServe V2 health RPCs of a server that is live and ready whenever it answers."""

from __future__ import annotations

import grpc

from modelxds.kserve import grpc_predict_v2_pb2 as pb


class AlwaysServing:
    """``ServerLive`` and ``ServerReady`` for a servicer registered by method name."""

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)
