"""Placement changes -> debounced translation -> snapshot cache.

Placement can change hundreds of times a second while ModelMesh loads and evicts.
A change after ``quiet`` seconds without a push goes out at once (the leading edge:
an isolated load routes as soon as it is seen); changes that follow a push wait for
``quiet`` seconds without change, but never more than ``max_delay``, so a burst is a
few pushes and a steady stream of updates still gets through.

A push builds in a worker thread (placement, translation, serialization: seconds
after a re-list of 100,000s of models), so meanwhile ADS answers and the watch reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from modelxds import metrics
from modelxds.placement.model import Placement
from modelxds.policy import Policy
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.ir import Options, Strategy
from modelxds.xds.references import ReferenceCheck
from modelxds.xds.resources import SHORT_NAMES

# Takes what changed, on the event loop; returns the build of the Placement, for a thread.
Capture = Callable[[], Callable[[], Placement]]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _timed(stage: str, step: Callable[[], T]) -> T:
    started = time.perf_counter()
    try:
        return step()
    finally:
        metrics.SNAPSHOT_STAGE_SECONDS.labels(stage).observe(time.perf_counter() - started)


class Controller:
    def __init__(
        self,
        capture: Capture,
        changed: asyncio.Event,
        policy: Policy,
        cache: SnapshotCache,
        options: Options,
        *,
        quiet: float = 0.1,
        max_delay: float = 1.0,
        translator: Strategy,
        gateways: Callable[[], int] = lambda: 0,
    ) -> None:
        """``gateways``: how many are connected now, for the push log line."""
        self.translator = translator
        self._gateways = gateways
        self._capture = capture
        self._changed = changed
        self.policy = policy
        self.cache = cache
        self.options = options
        self.quiet = quiet
        self.max_delay = max_delay
        self.placement: Placement | None = None
        self.references = ReferenceCheck()
        self._pushed_at = -float("inf")  # time.monotonic() when the last push went in
        # told the policy each published config was built from (Kubernetes status)
        self.on_published: Callable[[Policy], None] | None = None

    def set_policy(self, policy: Policy) -> None:
        """Serve ``policy`` from the next push on (debounced like a placement change)."""
        self.policy = policy
        self._changed.set()

    async def publish(self) -> None:
        """Translate the current placement into the cache now."""
        started = time.perf_counter()
        build, policy = self._capture(), self.policy

        cold = self.placement is None

        def push() -> tuple[Placement, list[str], list[str]]:
            # The first build allocates millions of objects, none of them garbage: the
            # collector's full passes over them cost half a second at 100,000 models and
            # hold the GIL from the event loop while they run.
            if cold:
                gc.disable()
            try:
                placement = _timed("placement", build)
                resources = _timed(
                    "translate", lambda: self.translator(placement, policy, self.options)
                )
                problems = _timed("check", lambda: self.references.problems(resources))
                if problems:
                    return placement, [], problems
                changed = _timed(
                    "serialize", lambda: self.cache.store(resources, placement.changed_at)
                )
                return placement, changed, []
            finally:
                if cold:
                    gc.enable()

        placement, changed, problems = await asyncio.to_thread(push)
        self._pushed_at = time.monotonic()
        self.placement = placement
        if problems:
            metrics.SNAPSHOTS_REFUSED.inc()
            log.error(
                "etcd revision %d: refused a config with %d dangling reference(s), the last "
                "good one keeps serving: %s",
                placement.revision,
                len(problems),
                "; ".join(problems[:5]),
            )
            return
        self.cache.announce(changed)
        if self.on_published is not None:
            self.on_published(policy)
        elapsed = time.perf_counter() - started
        metrics.SNAPSHOT_BUILD_SECONDS.observe(elapsed)
        metrics.SNAPSHOTS.inc()
        if changed:
            versions = {SHORT_NAMES[t]: self.cache.get(t).version for t in changed}
            gateways = self._gateways()
            log.info(
                "etcd revision %d: pushed %s to %d gateway(s) in %.1f ms",
                placement.revision,
                " ".join(f"{t}={v}" for t, v in versions.items()),
                gateways,
                elapsed * 1000,
                extra={
                    "revision": placement.revision,
                    "types": list(versions),
                    "versions": versions,
                    "gateways": gateways,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )

    async def run(self) -> None:
        while True:
            await self._wait_for_change()
            noticed = time.monotonic()
            if noticed - self._pushed_at < self.quiet:
                await self._debounce()  # a burst under way: coalesce what follows
            metrics.DEBOUNCE_WAIT_SECONDS.observe(time.monotonic() - noticed)
            self._changed.clear()
            await self.publish()

    async def _wait_for_change(self) -> None:
        """Until etcd changed, a loading copy becomes loaded by the clock, or a cluster the
        config dropped is due to leave CDS (make-before-break in the cache)."""
        due = self.placement.next_transition_ms if self.placement else None
        waits = [] if due is None else [max(0.0, due / 1000 - time.time())]
        retirement = self.cache.retirement_in()
        if retirement is not None:
            waits.append(retirement)
        timeout = min(waits, default=None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _debounce(self) -> None:
        deadline = time.monotonic() + self.max_delay
        while (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(self.quiet, left))
            except TimeoutError:
                return
