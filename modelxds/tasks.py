"""How a long-running command (`serve`, `label`) runs its tasks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any


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
