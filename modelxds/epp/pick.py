"""The pick: for a model, the ``ip:port`` list a gateway tries in order.

Holders first (loaded copies, least loaded first, then copies still loading), then the
policy's fallback (any other live pod, the default subset's pods, or nothing), so the
gateway's retries walk on to another holder before they leave the model's pods.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from modelxds.placement.model import Instance, MeshPlacement
from modelxds.policy import FallbackPolicy
from modelxds.xds.bootstrap import join_address
from modelxds.xds.ir import Destination

# Enough for the gateway's tries and retries with room to spare; a header of 500 pods'
# addresses would cost every request ~10 KB for nothing.
MAX_ENDPOINTS = 8


class Outcome(enum.Enum):
    """What the pick found; also the ``outcome`` label of the picks metric."""

    HOLDER = "holder"  # a pod with the model loaded
    LOADING = "loading"  # only copies still loading: better than a second load
    FALLBACK = "fallback"  # no copy: the policy's fallback pods, one of which loads it
    NO_MODEL = "no_model"  # the request names no model: any live pod answers it
    NOT_FOUND = "not_found"  # NO_FALLBACK and no copy
    UNAVAILABLE = "unavailable"  # no live pod to send to


@dataclass(frozen=True, slots=True)
class Pick:
    outcome: Outcome
    endpoints: tuple[str, ...] = ()

    @property
    def header(self) -> str:
        """The value of ``x-gateway-destination-endpoint`` (and of its metadata twin)."""
        return ",".join(self.endpoints)


class Picker:
    """Picks within one pool; its only state is the turn that spreads equal pods."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._turns = itertools.count()

    def pick(
        self, destination: Destination, model: str | None, allowed: Collection[str] = ()
    ) -> Pick:
        """``allowed``: the gateway's subset hint (``ip:port``), empty for every pod."""
        mesh = destination.mesh
        live = [i for i in mesh.instances.values() if self._allowed(i, allowed)]
        if not live:
            return Pick(Outcome.UNAVAILABLE)
        turn = next(self._turns)
        if model is None:
            return Pick(Outcome.NO_MODEL, self._addresses(_least_loaded(live, turn)))
        loaded, loading = _copies(mesh, model)
        holders = self._present(mesh, loaded, allowed)
        ordered = _least_loaded(holders, turn) + _least_loaded(
            self._present(mesh, loading, allowed), turn
        )
        outcome = Outcome.HOLDER if holders else Outcome.LOADING
        fallback = self._fallback(destination, live, ordered, allowed, turn)
        if not ordered:
            if destination.model_miss is FallbackPolicy.NO_FALLBACK:
                return Pick(Outcome.NOT_FOUND)
            if not fallback:
                return Pick(Outcome.UNAVAILABLE)
            outcome = Outcome.FALLBACK
        return Pick(outcome, self._addresses([*ordered, *fallback]))

    def _fallback(
        self,
        destination: Destination,
        live: Sequence[Instance],
        ordered: Sequence[Instance],
        allowed: Collection[str],
        turn: int,
    ) -> list[Instance]:
        taken = {i.id for i in ordered}
        policy = destination.model_miss
        if policy is FallbackPolicy.NO_FALLBACK:
            return []
        if policy is FallbackPolicy.DEFAULT_SUBSET:
            subset = set(destination.default_subset_pods())
            return _least_loaded([i for i in live if i.id in subset and i.id not in taken], turn)
        return _least_loaded([i for i in live if i.id not in taken], turn)

    def address(self, instance: Instance) -> str:
        return join_address(instance.host, self.target_port)

    def _allowed(self, instance: Instance, allowed: Collection[str]) -> bool:
        return not allowed or self.address(instance) in allowed

    def _present(
        self, mesh: MeshPlacement, ids: Sequence[str], allowed: Collection[str]
    ) -> list[Instance]:
        found = (mesh.instances.get(i) for i in ids)
        return [i for i in found if i is not None and self._allowed(i, allowed)]

    def _addresses(self, instances: Sequence[Instance]) -> tuple[str, ...]:
        return tuple(self.address(i) for i in instances[:MAX_ENDPOINTS])


def _copies(mesh: MeshPlacement, model: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(loaded, loading) instance ids for a model id, else an InferenceService name (its
    active model), as ``MeshPlacement.routable`` resolves them."""
    copies = mesh.models.get(model)
    if copies is None:
        vmodel = mesh.vmodels.get(model)
        copies = mesh.models.get(vmodel.active) if vmodel is not None else None
    if copies is None:
        return (), ()
    return copies.loaded, copies.loading


def _least_loaded(instances: Sequence[Instance], turn: int) -> list[Instance]:
    """By the load each pod reports (requests per minute, then loads under way); pods
    that report the same take turns at the front, request by request."""
    if not instances:
        return []
    start = turn % len(instances)
    rotated = [*instances[start:], *instances[:start]]
    # no more than a pick sends: at 500 pods, sorting them all was most of a pick's time
    return heapq.nsmallest(MAX_ENDPOINTS, rotated, key=lambda i: (i.rpm, i.loads_in_progress))
