"""Convergence: how long an etcd change takes to be running on every gateway.

A version counts once every stream connected when it was published has ACKed it, or a
later version of each type it changed (state of the world: a later one contains the
change too). A NACK or a disconnect before then leaves the version unobserved, counted
by reason, so a rejected config cannot hide behind a fast median.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from modelxds import metrics
from modelxds.xds.cache import TypeSnapshot

# Versions waited on at once: more means a gateway has stopped answering; the oldest are
# given up rather than held forever.
MAX_PENDING = 64


@dataclass
class _Pending:
    changed_at: float  # time.monotonic() of the etcd change
    versions: dict[str, str]  # type URL -> the version that first contains the change
    waiting: dict[int, set[str]]  # stream id -> types it has yet to ACK


class Convergence:
    """Owned by the ADS server, which tells it what each stream publishes and answers."""

    def __init__(
        self, *, max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_pending = max_pending
        self._clock = clock
        self._seen: Mapping[str, TypeSnapshot] | None = None
        self._pending: list[_Pending] = []  # oldest first

    def is_new(self, snapshot: Mapping[str, TypeSnapshot]) -> bool:
        return snapshot is not self._seen

    def published(
        self, snapshot: Mapping[str, TypeSnapshot], subscriptions: Mapping[int, Collection[str]]
    ) -> None:
        """A config the streams have not seen yet; ``subscriptions``: the types each
        connected stream asked for."""
        seen, self._seen = self._seen, snapshot
        new = {t: s for t, s in snapshot.items() if seen is None or seen.get(t) is not s}
        times = [s.changed_at for s in new.values() if s.changed_at is not None]
        if not times:
            return  # no etcd change in it: a policy change, a copy loaded by the clock
        waiting = {
            sid: types
            for sid, subscribed in subscriptions.items()
            if (types := new.keys() & subscribed)
        }
        if not waiting:
            metrics.CONVERGENCE_UNOBSERVED.labels("no_gateways").inc()
            return
        self._pending.append(_Pending(min(times), {t: s.version for t, s in new.items()}, waiting))
        if len(self._pending) > self.max_pending:
            self._pending.pop(0)
            metrics.CONVERGENCE_UNOBSERVED.labels("too_many_pending").inc()

    def acked(self, stream_id: int, type_url: str, version: str) -> None:
        now = self._clock()
        for p in self._taken_by(stream_id, type_url, version):
            p.waiting[stream_id].discard(type_url)
            if not p.waiting[stream_id]:
                del p.waiting[stream_id]
            if not p.waiting:
                metrics.CONVERGENCE_SECONDS.observe(now - p.changed_at)
        self._pending = [p for p in self._pending if p.waiting]

    def nacked(self, stream_id: int, type_url: str, version: str) -> None:
        self._give_up(self._taken_by(stream_id, type_url, version), "nacked")

    def disconnected(self, stream_id: int) -> None:
        self._give_up([p for p in self._pending if stream_id in p.waiting], "disconnected")

    def _taken_by(self, stream_id: int, type_url: str, version: str) -> list[_Pending]:
        """The versions waiting on this stream's ``type_url`` that ``version`` answers:
        its own and every older one."""
        newest = next(
            (
                i
                for i in reversed(range(len(self._pending)))
                if self._pending[i].versions.get(type_url) == version
            ),
            None,
        )
        if newest is None:
            return []
        return [p for p in self._pending[: newest + 1] if type_url in p.waiting.get(stream_id, ())]

    def _give_up(self, pending: list[_Pending], reason: str) -> None:
        if pending:
            metrics.CONVERGENCE_UNOBSERVED.labels(reason).inc(len(pending))
        self._pending = [p for p in self._pending if all(p is not q for q in pending)]
