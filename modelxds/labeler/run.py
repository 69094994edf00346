"""`modelxds label`: etcd watch -> placement -> pod labels, leader-elected, plus health and
/metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence

from modelxds.health import readiness, start_http
from modelxds.kube import KubernetesConfigError, api_client
from modelxds.labeler.labels import LabelerConfigError, subset_key
from modelxds.labeler.leader import Leadership, default_identity
from modelxds.labeler.sync import Labeler, Target
from modelxds.modelmesh import Layout
from modelxds.policy import PolicyError, default_policy, load_policy
from modelxds.tasks import checked_watcher, run_until, stop_on_signals

log = logging.getLogger(__name__)


def targets(args: argparse.Namespace, layouts: Sequence[tuple[str, Layout]]) -> list[Target]:
    """What to label in each watched namespace; `LabelerConfigError` or `PolicyError`."""
    # only the DestinationRules matter here: a policy that routes no port is fine
    policy = load_policy(args.policy, allow_empty=True) if args.policy else default_policy()
    return [
        Target(ns, layout.service_name, subset_key(policy, ns, layout.service_name))
        for ns, layout in layouts
    ]


async def label(args: argparse.Namespace, layouts: Sequence[tuple[str, Layout]]) -> int:
    try:
        wanted = targets(args, layouts)
        if args.max_model_labels < 0:
            raise LabelerConfigError(f"--max-model-labels must be >= 0: {args.max_model_labels}")
        if args.patch_interval_ms <= 0:
            raise LabelerConfigError(f"--patch-interval-ms must be > 0: {args.patch_interval_ms}")
    except PolicyError as e:
        log.error("invalid policy:\n%s", e)
        return 2
    except LabelerConfigError as e:
        log.error("%s", e)
        return 2
    try:
        api = api_client(args.kubeconfig)
    except KubernetesConfigError as e:
        log.error("%s", e)
        return 2
    watcher = await checked_watcher(args, layouts)
    if watcher is None:
        return 2

    if not log.isEnabledFor(logging.DEBUG):
        # the library logs every try of every follower at INFO; ours logs the changes
        logging.getLogger("leaderelection").setLevel(logging.WARNING)
    leadership = None
    if args.leader_elect:
        lease_namespace = (
            args.lease_namespace or os.environ.get("POD_NAMESPACE") or wanted[0].namespace
        )
        leadership = Leadership(
            api_client(args.kubeconfig),  # a client of its own: it lives in its own thread
            name=args.lease_name,
            namespace=lease_namespace,
            identity=default_identity(),
        )
    labeler = Labeler(
        api,
        wanted,
        max_model_labels=args.max_model_labels,
        patch_interval=args.patch_interval_ms / 1000,
        may_patch=leadership.may_patch if leadership else lambda: True,
    )
    ready = readiness(
        watcher,
        args.ready_etcd_grace_s,
        [
            (watcher.synced.is_set, "placement not read from etcd yet"),
            (
                lambda: all(w.listed.is_set() for w in labeler.watches.values()),
                "pods not listed yet",
            ),
        ],
    )
    try:
        http = await start_http(args.metrics_address, ready) if args.metrics_address else None
    except (OSError, ValueError) as e:
        log.error("cannot listen on --metrics-address %s: %s", args.metrics_address, e)
        return 2
    election = "no leader election"
    if leadership is not None:
        election = f"lease {leadership.namespace}/{leadership.name} as {leadership.identity}"
    log.info(
        "labeling pods of %s; watching etcd %s; %s",
        ", ".join(f"{t.namespace}/{t.service} under {t.key}/" for t in wanted),
        args.etcd,
        election,
    )
    stop = stop_on_signals()
    if leadership is not None:
        leadership.start(labeler.leadership_changed)
    try:
        await run_until(
            stop,
            watcher.run(),
            labeler.follow(watcher.capture, watcher.changed, watcher.synced),
            labeler.run(),
        )
    finally:
        if leadership is not None:
            await asyncio.to_thread(leadership.stop)
        if http is not None:
            await http.cleanup()
        log.info("stopped")
    return 0
