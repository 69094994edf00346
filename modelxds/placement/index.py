"""Incremental placement: per push, work in proportion to what changed, not to the fleet.

`build_mesh` is the definition of placement; this index computes the same result
(a property test checks it on random histories) by keeping the derived state
between pushes and recomputing only dirty models, vmodels and instances:

* a registry write dirties that model; a vmodel write dirties that vmodel;
* a pod coming or going (instances / litelinks) dirties the models that list it;
* the clock dirties a model when one of its loading copies becomes loaded;
* a model whose routable pods change dirties the vmodels whose active model it is.

Each snapshot lists the names whose route changed since the one before
(``MeshPlacement.changes``), so a consumer can do the same.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.model import (
    DEFAULT_LOADED_AFTER_MS,
    Copies,
    Instance,
    MeshPlacement,
    RouteChanges,
    SortedNames,
    VModel,
    classify,
    live_instances,
    vmodel_of,
)


@dataclass
class Changes:
    """What changed in the record tables since the index last looked."""

    models: set[str] = field(default_factory=set)
    vmodels: set[str] = field(default_factory=set)
    pods: bool = False  # instances or litelinks changed

    def all(self, registry: Iterable[str], vmodels: Iterable[str]) -> None:
        self.models.update(registry)
        self.vmodels.update(vmodels)
        self.pods = True


class MeshIndex:
    """Derived placement of one deployment, kept current from record changes."""

    def __init__(self, namespace: str, loaded_after_ms: int = DEFAULT_LOADED_AFTER_MS) -> None:
        self.namespace = namespace
        self.loaded_after_ms = loaded_after_ms
        self._routes: dict[str, tuple[str, ...]] = {}
        self._routes_id: object | None = None  # of the last snapshot
        self._live: dict[str, Instance] = {}
        self._copies: dict[str, Copies] = {}
        self._vmodels: dict[str, VModel] = {}
        self._vroutable: dict[str, tuple[str, ...]] = {}
        self._name_sets: dict[str, set[str]] = {}
        self._names: dict[str, SortedNames.Entry] = {}
        self._models_by_pod: defaultdict[str, set[str]] = defaultdict(set)
        self._pods_of: dict[str, tuple[str, ...]] = {}
        self._vmodels_by_active: defaultdict[str, set[str]] = defaultdict(set)
        self._due: list[tuple[int, str]] = []  # (epoch ms, model id), may hold stale entries
        # copies of all models by state (Copies' fields), and routable ones: kept as models
        # change, so reporting them costs nothing per push
        self.copies = dict.fromkeys(Copies._fields, 0)
        self.routable_copies = 0

    def refresh(
        self,
        changes: Changes,
        registry: Mapping[str, ModelRecord],
        vmodels: Mapping[str, VModelRecord],
        instances: Mapping[str, InstanceRecord],
        litelinks: Mapping[str, LitelinksRecord],
        now_ms: int,
    ) -> MeshPlacement:
        """Apply ``changes`` (then cleared) and return the placement at ``now_ms``."""
        dirty_pods: set[str] = set()
        if changes.pods:
            self._refresh_pods(instances, litelinks, changes, dirty_pods)
        while self._due and self._due[0][0] <= now_ms:
            changes.models.add(heapq.heappop(self._due)[1])
        for model_id in changes.models:
            self._refresh_model(model_id, registry.get(model_id), now_ms, changes, dirty_pods)
        for vmodel_id in changes.vmodels:
            self._refresh_vmodel(vmodel_id, vmodels.get(vmodel_id), dirty_pods)
        for iid in dirty_pods:
            if iid in self._name_sets:
                self._names[iid] = SortedNames.Entry(frozenset(self._name_sets[iid]))
        moved = frozenset(n for n in changes.models | changes.vmodels if self._set_route(n))
        changes.models.clear()
        changes.vmodels.clear()
        changes.pods = False
        mesh = MeshPlacement(
            namespace=self.namespace,
            instances=MappingProxyType(dict(self._live)),
            models=MappingProxyType(dict(self._copies)),
            vmodels=MappingProxyType(dict(self._vmodels)),
            next_transition_ms=self._due[0][0] if self._due else None,
            names=SortedNames(dict(self._names)),
            routes=MappingProxyType(dict(self._routes)),
            changes=None if self._routes_id is None else RouteChanges(self._routes_id, moved),
        )
        self._routes_id = mesh.routes_id
        return mesh

    def _set_route(self, name: str) -> bool:
        """Bring ``name``'s route up to date; whether it changed."""
        copies = self._copies.get(name)
        pods = copies.routable if copies is not None else self._vroutable.get(name, ())
        if self._routes.get(name, ()) == pods:
            return False
        if pods:
            self._routes[name] = pods
        else:
            del self._routes[name]
        return True

    def _refresh_pods(
        self,
        instances: Mapping[str, InstanceRecord],
        litelinks: Mapping[str, LitelinksRecord],
        changes: Changes,
        dirty_pods: set[str],
    ) -> None:
        live = live_instances(instances, litelinks)
        came = live.keys() - self._live.keys()
        went = self._live.keys() - live.keys()
        self._live = live
        for iid in went:
            del self._name_sets[iid]
            del self._names[iid]
        for iid in came:
            self._name_sets[iid] = set()
            self._names[iid] = SortedNames.Entry(frozenset())
        dirty_pods.update(came)
        for iid in came | went:
            changes.models.update(self._models_by_pod.get(iid, ()))

    def _refresh_model(
        self,
        model_id: str,
        rec: ModelRecord | None,
        now_ms: int,
        changes: Changes,
        dirty_pods: set[str],
    ) -> None:
        had = self._copies.get(model_id)
        if had is not None:
            self._count(had, -1)
        before = had.routable if had is not None else ()
        for iid in self._pods_of.pop(model_id, ()):
            self._models_by_pod[iid].discard(model_id)
        if rec is None:
            self._copies.pop(model_id, None)
            after: tuple[str, ...] = ()
        else:
            copies, due = classify(rec, self._live, now_ms, self.loaded_after_ms)
            self._copies[model_id] = copies
            self._count(copies, 1)
            after = copies.routable
            pods = tuple(rec.instance_ids)
            if rec.failed_in:
                pods = tuple(rec.instance_ids.keys() | rec.failed_in.keys())
            self._pods_of[model_id] = pods
            for iid in pods:
                self._models_by_pod[iid].add(model_id)
            if due is not None:
                heapq.heappush(self._due, (due, model_id))
        if before != after:
            self._move(model_id, before, after, dirty_pods)
            changes.vmodels.update(self._vmodels_by_active.get(model_id, ()))

    def _count(self, copies: Copies, sign: int) -> None:
        for state, pods in zip(Copies._fields, copies, strict=True):
            self.copies[state] += sign * len(pods)
        self.routable_copies += sign * len(copies.routable)

    def _refresh_vmodel(
        self, vmodel_id: str, rec: VModelRecord | None, dirty_pods: set[str]
    ) -> None:
        old = self._vmodels.pop(vmodel_id, None)
        if old is not None:
            self._vmodels_by_active[old.active].discard(vmodel_id)
        vm = vmodel_of(rec) if rec is not None else None
        after: tuple[str, ...] = ()
        if vm is not None:
            self._vmodels[vmodel_id] = vm
            self._vmodels_by_active[vm.active].add(vmodel_id)
            active = self._copies.get(vm.active)
            after = active.routable if active is not None else ()
        before = self._vroutable.pop(vmodel_id, ())
        if after:
            self._vroutable[vmodel_id] = after
        if before != after:
            self._move(vmodel_id, before, after, dirty_pods)

    def _move(
        self, name: str, before: tuple[str, ...], after: tuple[str, ...], dirty_pods: set[str]
    ) -> None:
        if before:
            for iid in set(before).difference(after):
                if iid in self._name_sets:
                    self._name_sets[iid].discard(name)
                    dirty_pods.add(iid)
        added = set(after).difference(before) if before else after
        for iid in added:
            self._name_sets[iid].add(name)  # routable implies live
        dirty_pods.update(added)
