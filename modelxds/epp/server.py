"""`modelxds epp`: the placement watcher, the ext_proc service, health and /metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from modelxds import metrics
from modelxds.epp.exchange import Exchange
from modelxds.epp.pick import Picker
from modelxds.epp.tls import server_credentials
from modelxds.health import Health, readiness, start_http
from modelxds.modelmesh import Layout
from modelxds.placement.model import Placement
from modelxds.placement.watch import PlacementWatcher
from modelxds.policy import Policy, PolicyError, default_policy, load_policy
from modelxds.tasks import checked_watcher, run_until, stop_on_signals
from modelxds.xds.ir import Destination, Options, destinations

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
DEFAULT_EPP_ADDRESS = "0.0.0.0:9002"  # the GIE chart's EPP port
DEFAULT_TARGET_PORT = 8033


class Pool:
    """The destination the picks read: the policy's first route, with the placement of
    its service's namespace, replaced whole on every placement snapshot."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.destination: Destination | None = None
        routes = list(destinations(Placement(), policy, Options(descriptor_set=b"")))
        if not routes:
            raise PolicyError(["the policy routes nothing: the picker needs one VirtualService"])
        if len(routes) > 1:
            log.warning(
                "the policy has %d routes; an endpoint picker serves one pool, the first: %s",
                len(routes),
                routes[0].virtual_host,
            )
        self.headers = tuple(h.header for h in routes[0].headers)

    def update(self, placement: Placement) -> None:
        first = next(destinations(placement, self.policy, Options(descriptor_set=b"")))
        self.destination = first

    def current(self) -> Destination | None:
        return self.destination


class Processor:
    """``envoy.service.ext_proc.v3.ExternalProcessor``: one Exchange per stream."""

    def __init__(self, pool: Pool, picker: Picker) -> None:
        self.pool = pool
        self.picker = picker

    async def Process(
        self,
        request_iterator: AsyncIterator[ep.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ep.ProcessingResponse]:
        exchange = Exchange(self.pool.current, self.picker, self.pool.headers)
        async for request in request_iterator:
            try:
                responses = exchange.handle(request)
            except Exception:
                # one request's stream ends; the gateway applies its failure mode to it
                metrics.EPP_INVALID_MESSAGES.labels("error").inc()
                log.exception("ext_proc message could not be processed")
                await context.abort(grpc.StatusCode.INTERNAL, "the endpoint picker failed")
            for response in responses:
                yield response


async def follow(watcher: PlacementWatcher, pool: Pool, ready: asyncio.Event) -> None:
    """A new placement for the picks on every etcd change, and when a loading copy
    becomes loaded by the clock. A build runs in a thread: the picks go on meanwhile."""
    await watcher.synced.wait()
    while True:
        watcher.changed.clear()
        placement = await asyncio.to_thread(watcher.capture())
        pool.update(placement)
        ready.set()
        due = placement.next_transition_ms
        timeout = None if due is None else max(0.0, due / 1000 - time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher.changed.wait(), timeout)


async def epp(args: argparse.Namespace, layouts: Sequence[tuple[str, Layout]]) -> int:
    try:
        pool = Pool(load_policy(args.policy) if args.policy else default_policy())
        credentials = None if args.plaintext else server_credentials(args.cert_file, args.key_file)
    except PolicyError as e:
        log.error("invalid policy:\n%s", e)
        return 2
    except (OSError, ValueError) as e:
        log.error("cannot serve TLS: %s", e)
        return 2
    watcher = await checked_watcher(args, layouts)
    if watcher is None:
        return 2
    picking = asyncio.Event()  # the first placement is in the pool
    ready = readiness(
        watcher, args.ready_etcd_grace_s, [(picking.is_set, "placement not read from etcd yet")]
    )
    health = Health.probes(ready, **{EXT_PROC_SERVICE: ready})
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(
        Processor(pool, Picker(args.target_port)), server
    )
    server.add_generic_rpc_handlers([health.handler()])
    try:
        if credentials is None:
            server.add_insecure_port(args.epp_address)
        else:
            server.add_secure_port(args.epp_address, credentials)
    except RuntimeError as e:
        log.error("cannot listen on --epp-address %s: %s", args.epp_address, e)
        return 2
    try:
        http = await start_http(args.metrics_address, ready) if args.metrics_address else None
    except (OSError, ValueError) as e:
        log.error("cannot listen on --metrics-address %s: %s", args.metrics_address, e)
        return 2
    await server.start()
    log.info(
        "endpoint picker on %s (%s), pods' port %d; watching etcd %s: %s",
        args.epp_address,
        "plaintext" if credentials is None else "TLS",
        args.target_port,
        args.etcd,
        ", ".join(f"{ns}={layout.root_prefix}" for ns, layout in layouts),
    )
    stop = stop_on_signals()
    try:
        await run_until(stop, watcher.run(), follow(watcher, pool, picking))
    finally:
        await server.stop(grace=1)
        if http is not None:
            await http.cleanup()
        log.info("stopped")
    return 0
