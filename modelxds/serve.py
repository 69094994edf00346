"""`modelxds serve`: etcd watch -> translate -> snapshot cache -> ADS, plus health and
/metrics."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from modelxds import metrics
from modelxds.health import Health, readiness, start_http
from modelxds.kserve import descriptor_set_bytes
from modelxds.modelmesh import Layout
from modelxds.policy import Policy, PolicyError, default_policy, load_policy
from modelxds.tasks import checked_watcher, run_until, stop_on_signals
from modelxds.xds import csds
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.controller import Controller
from modelxds.xds.ir import Options, RestMode, Strategy
from modelxds.xds.scale import ScaleStrategy
from modelxds.xds.server import AdsServer
from modelxds.xds.subset import SubsetStrategy
from modelxds.xds.tls import TlsConfigError, server_credentials

log = logging.getLogger(__name__)


STRATEGIES: dict[str, Callable[[], Strategy]] = {"subset": SubsetStrategy, "scale": ScaleStrategy}


def strategy(name: str) -> Strategy:
    """A fresh translator for ``--strategy``."""
    return STRATEGIES[name]()


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address HOST:PORT takes connections from this machine only
    (a host name other than localhost may resolve to anything: not loopback)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


PLAINTEXT_WARNING = (
    "xDS is served in plaintext on %s: a client that reaches it reads every pod address and "
    "every gateway's status, and gateways cannot tell this server from one that sends them "
    "its own listeners and Lua; serve TLS with --xds-tls-cert and --xds-tls-key, and ask "
    "gateways for client certificates with --xds-client-ca (docs/security.md)"
)
ONE_WAY_TLS_WARNING = (
    "xDS is served over TLS on %s without --xds-client-ca: any client that reaches it may "
    "connect as any gateway node id and read every pod address; ask gateways for client "
    "certificates with --xds-client-ca (docs/security.md)"
)


def policy_fingerprint(path: str) -> tuple[tuple[str, int, int], ...]:
    """What changes when the policy files do: name, mtime and size of each (following
    symlinks); an unreadable path is a fingerprint of its own, so its return is a change."""
    root = Path(path)
    try:
        files = sorted(root.iterdir()) if root.is_dir() else [root]
        return tuple((f.name, (st := f.stat()).st_mtime_ns, st.st_size) for f in files)
    except OSError:
        return ()


async def serve(args: argparse.Namespace, layouts: Sequence[tuple[str, Layout]]) -> int:
    # With --kubernetes, objects may complete what the files leave out: the whole is
    # checked when the objects are read.
    files_may_be_empty = args.allow_empty_policy or args.kubernetes
    try:
        files = load_policy(args.policy, allow_empty=files_may_be_empty) if args.policy else None
    except PolicyError as e:
        log.error("invalid policy:\n%s", e)
        return 2
    try:
        credentials = server_credentials(args.xds_tls_cert, args.xds_tls_key, args.xds_client_ca)
    except TlsConfigError as e:
        log.error("cannot serve xDS over TLS: %s", e)
        return 2
    if not is_loopback(args.xds_address):
        if credentials is None:
            log.warning(PLAINTEXT_WARNING, args.xds_address)
        elif not args.xds_client_ca:
            log.warning(ONE_WAY_TLS_WARNING, args.xds_address)
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
    watcher = await checked_watcher(args, layouts)
    if watcher is None:
        return 2
    cache = SnapshotCache()
    ads = AdsServer(
        cache,
        max_streams=args.max_gateways,
        max_names=args.max_names,
        require_identity=bool(args.xds_client_ca),
    )
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
        gateways=lambda: len(ads.streams),
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
    ready = readiness(
        watcher,
        args.ready_etcd_grace_s,
        [
            (watcher.synced.is_set, "placement not read from etcd yet"),
            (cache.ready.is_set, "no config published yet"),
        ],
    )
    server.add_generic_rpc_handlers([ads.handler(), Health.probes(ready).handler()])
    csds.add_to_server(ads, server)
    try:
        if credentials is None:
            server.add_insecure_port(args.xds_address)
        else:
            server.add_secure_port(args.xds_address, credentials)
    except RuntimeError as e:
        log.error("cannot listen on --xds-address %s: %s", args.xds_address, e)
        return 2
    try:
        http = await start_http(args.metrics_address, ready) if args.metrics_address else None
    except (OSError, ValueError) as e:
        log.error("cannot listen on --metrics-address %s: %s", args.metrics_address, e)
        return 2
    await server.start()
    security = "plaintext"
    if args.xds_client_ca:
        security = f"mutual TLS, client certificates of {args.xds_client_ca}"
    elif credentials is not None:
        security = "TLS"
    log.info(
        "serving xDS on %s (%s); watching etcd %s: %s",
        args.xds_address,
        security,
        args.etcd,
        ", ".join(f"{ns}={layout.root_prefix}" for ns, layout in layouts),
    )

    async def publish_when_synced() -> None:
        await watcher.synced.wait()
        if rules is not None:
            await rules.ready.wait()  # the objects are read: the first config has them
        await controller.publish()  # the first config goes out without debounce delay
        await controller.run()

    def reload_policy(why: str) -> None:
        """A valid policy replaces the one served; an invalid one is reported and the last
        good one keeps serving."""
        if not args.policy:
            log.warning("%s: no --policy to reload; the built-in seed policy stays", why)
            return
        try:
            new = load_policy(args.policy, allow_empty=files_may_be_empty)
        except PolicyError as e:
            metrics.POLICY_RELOADS.labels("rejected").inc()
            log.error(
                "%s: %s is invalid, the last good policy keeps serving:\n%s", why, args.policy, e
            )
            return
        metrics.POLICY_RELOADS.labels("applied").inc()
        log.info("%s: policy reloaded from %s", why, args.policy)
        if rules is not None:
            rules.set_base(new)  # read again with the objects
        else:
            controller.set_policy(new)

    async def reload_on_change() -> None:
        """Poll the policy files: a ConfigMap mount changes them by swapping a symlink,
        which no signal announces."""
        seen = policy_fingerprint(args.policy)
        while True:
            await asyncio.sleep(args.policy_poll_ms / 1000)
            now = policy_fingerprint(args.policy)
            if now != seen:
                seen = now
                reload_policy(f"{args.policy} changed")

    stop = stop_on_signals()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_policy, "SIGHUP")
    jobs = [watcher.run(), publish_when_synced()] + ([rules.run()] if rules is not None else [])
    if args.policy and args.policy_poll_ms > 0:
        jobs.append(reload_on_change())
    try:
        await run_until(stop, *jobs)
    finally:
        await server.stop(grace=1)
        if http is not None:
            await http.cleanup()
        log.info("stopped")
    return 0
