"""How a long-running command (`serve`, `label`) runs its tasks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from modelxds.modelmesh import Layout
from modelxds.placement.etcd import EtcdUnavailable
from modelxds.placement.watch import PlacementWatcher

log = logging.getLogger(__name__)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until(stop: asyncio.Event, *coroutines: Coroutine[Any, Any, Any]) -> None:
    """Run ``coroutines`` until ``stop`` is set or one of them fails (its exception is
    raised here); every one still running is cancelled and awaited on the way out."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopped:
                t.result()
    finally:
        for t in [stopped, *tasks]:
            t.cancel()
        for t in [stopped, *tasks]:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def checked_watcher(
    args: argparse.Namespace, layouts: Sequence[tuple[str, Layout]]
) -> PlacementWatcher | None:
    """The placement watcher every command runs, from the etcd flags; None (after logging
    why) when etcd refuses for good: a wrong password or CA fails at start, not as endless
    retries later. An etcd that is only unreachable is retried in the background."""
    from modelxds.cli import etcd_connection

    watcher = PlacementWatcher(etcd_connection(args), layouts, loaded_after_ms=args.loaded_after_ms)
    try:
        await watcher.check(timeout=3.0)
    except EtcdUnavailable as e:
        if e.fatal:
            log.error("%s", e)
            return None
        log.warning("%s; starting anyway, retrying in the background", e)
    return watcher
