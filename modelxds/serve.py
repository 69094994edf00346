"""`modelxds serve`: etcd watch -> translate -> snapshot cache -> ADS, plus /metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from prometheus_client import start_http_server

from modelxds import metrics
from modelxds.kserve import descriptor_set_bytes
from modelxds.modelmesh import Layout
from modelxds.placement.watch import PlacementWatcher
from modelxds.policy import Policy, PolicyError, default_policy, load_policy
from modelxds.tasks import run_until, stop_on_signals
from modelxds.xds import csds
from modelxds.xds.bootstrap import split_address
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.controller import Controller
from modelxds.xds.ir import Options, RestMode, Strategy
from modelxds.xds.scale import ScaleStrategy
from modelxds.xds.server import AdsServer
from modelxds.xds.subset import SubsetStrategy

log = logging.getLogger(__name__)


STRATEGIES: dict[str, Callable[[], Strategy]] = {"subset": SubsetStrategy, "scale": ScaleStrategy}


def strategy(name: str) -> Strategy:
    """A fresh translator for ``--strategy``."""
    return STRATEGIES[name]()


async def serve(args: argparse.Namespace, layouts: Sequence[tuple[str, Layout]]) -> int:
    # With --kubernetes, objects may complete what the files leave out: the whole is
    # checked when the objects are read.
    files_may_be_empty = args.allow_empty_policy or args.kubernetes
    try:
        files = load_policy(args.policy, allow_empty=files_may_be_empty) if args.policy else None
    except PolicyError as e:
        log.error("invalid policy:\n%s", e)
        return 2
    # --kubernetes without files: nothing is served before the objects are read
    policy = Policy((), ()) if args.kubernetes else default_policy()
    if files is not None:
        policy = files
    api = None
    if args.kubernetes:
        from modelxds.kube import KubernetesConfigError, api_client

        try:
            api = api_client(args.kubeconfig)
        except KubernetesConfigError as e:
            log.error("%s", e)
            return 2
    from modelxds.cli import etcd_connection
    from modelxds.placement.etcd import EtcdUnavailable

    watcher = PlacementWatcher(etcd_connection(args), layouts, loaded_after_ms=args.loaded_after_ms)
    try:
        await watcher.check(timeout=3.0)
    except EtcdUnavailable as e:
        if e.fatal:  # a wrong password or CA fails now, not as endless retries later
            log.error("%s", e)
            return 2
        log.warning("%s; serving anyway, retrying in the background", e)
    cache = SnapshotCache()
    ads = AdsServer(cache, max_streams=args.max_gateways, max_names=args.max_names)
    controller = Controller(
        watcher.capture,
        watcher.changed,
        policy,
        cache,
        Options(
            descriptor_set=descriptor_set_bytes(),
            listen_address=args.listen_address,
            update_merge_window_ms=args.update_merge_window_ms,
            rest=RestMode(args.rest),
            rest_port=args.rest_port,
        ),
        quiet=args.debounce_quiet_ms / 1000,
        max_delay=args.debounce_max_ms / 1000,
        translator=strategy(args.strategy),
    )
    rules = None
    if api is not None:
        from modelxds.policy.kubernetes import PolicyWatcher

        rules = PolicyWatcher(
            api,
            args.watch_namespace or [ns for ns, _ in layouts],
            controller.set_policy,
            base=files,
            allow_empty=args.allow_empty_policy,
        )
        controller.on_published = rules.published
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    server.add_generic_rpc_handlers([ads.handler()])
    csds.add_to_server(ads, server)
    try:
        server.add_insecure_port(args.xds_address)
    except RuntimeError as e:
        log.error("cannot listen on --xds-address %s: %s", args.xds_address, e)
        return 2
    if args.metrics_address:
        host, port = split_address(args.metrics_address, "0.0.0.0")
        start_http_server(port, host)
    await server.start()
    log.info(
        "serving xDS on %s; watching etcd %s: %s",
        args.xds_address,
        args.etcd,
        ", ".join(f"{ns}={layout.root_prefix}" for ns, layout in layouts),
    )

    async def publish_when_synced() -> None:
        await watcher.synced.wait()
        if rules is not None:
            await rules.ready.wait()  # the objects are read: the first config has them
        await controller.publish()  # the first config goes out without debounce delay
        await controller.run()

    def reload_policy() -> None:
        """SIGHUP: a valid policy replaces the one served; an invalid one is reported and
        the last good one keeps serving."""
        if not args.policy:
            log.warning("SIGHUP: no --policy to reload; the built-in seed policy stays")
            return
        try:
            new = load_policy(args.policy, allow_empty=files_may_be_empty)
        except PolicyError as e:
            metrics.POLICY_RELOADS.labels("rejected").inc()
            log.error(
                "SIGHUP: %s is invalid, the last good policy keeps serving:\n%s", args.policy, e
            )
            return
        metrics.POLICY_RELOADS.labels("applied").inc()
        log.info("SIGHUP: policy reloaded from %s", args.policy)
        if rules is not None:
            rules.set_base(new)  # read again with the objects
        else:
            controller.set_policy(new)

    stop = stop_on_signals()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_policy)
    jobs = [watcher.run(), publish_when_synced()] + ([rules.run()] if rules is not None else [])
    try:
        await run_until(stop, *jobs)
    finally:
        await server.stop(grace=1)
        log.info("stopped")
    return 0
