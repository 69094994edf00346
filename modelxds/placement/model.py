"""Immutable placement snapshots, built by a pure function from ModelMesh's tables.

A snapshot answers one question for the translator: for a model id or an
InferenceService (vmodel) name, which live pods should a request go to?
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord

DEFAULT_LOADED_AFTER_MS = 3000


@dataclass(frozen=True, slots=True)
class Instance:
    """A live ModelMesh pod: it holds an etcd lease and registered its address."""

    id: str
    host: str  # pod IP from the litelinks registration (InstanceRecord.loc is the node)
    zone: str = ""
    capacity: int = 0
    used: int = 0
    model_count: int = 0
    loads_in_progress: int = 0
    rpm: int = 0
    lru_time: int = 0  # last use of the least recently used model: the eviction candidate


class Copies(NamedTuple):
    """Where one model is, as instance ids (sorted). A tuple: 20,000 of these per push."""

    loaded: tuple[str, ...] = ()
    loading: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    # listed in instanceIds but the pod is gone; the leader's reaper removes these later
    dead: tuple[str, ...] = ()

    @property
    def routable(self) -> tuple[str, ...]:
        # A copy that is still loading beats a fresh load elsewhere: ModelMesh would
        # otherwise start a second copy while the first is nearly there.
        return self.loaded or self.loading


class Transition(enum.Enum):
    UP_TO_DATE = "UpToDate"
    IN_PROGRESS = "InProgress"
    BLOCKED_BY_FAILED_LOAD = "BlockedByFailedLoad"


@dataclass(frozen=True, slots=True)
class VModel:
    active: str
    target: str
    target_failed: bool = False

    @property
    def transition(self) -> Transition:
        if self.active == self.target:
            return Transition.UP_TO_DATE
        if self.target_failed:
            return Transition.BLOCKED_BY_FAILED_LOAD
        return Transition.IN_PROGRESS


class SortedNames(Mapping[str, tuple[str, ...]]):
    """Instance id -> the names routable to it, sorted when first read. A pod of a
    production mesh holds 100,000 models; sorting its names on every copy it gains or
    loses would cost a push half a second, for a consumer (the scale strategy) that
    never reads them. An unchanged pod's entry is the same object from one snapshot
    to the next, so it is sorted at most once."""

    class Entry:
        __slots__ = ("_sorted", "names")

        def __init__(self, names: frozenset[str]) -> None:
            self.names = names
            self._sorted: tuple[str, ...] | None = None

        def sorted(self) -> tuple[str, ...]:
            if self._sorted is None:
                self._sorted = tuple(sorted(self.names))
            return self._sorted

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, SortedNames.Entry]) -> None:
        self._entries = entries

    def __getitem__(self, iid: str) -> tuple[str, ...]:
        return self._entries[iid].sorted()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class RouteChanges:
    """The names whose ``routes`` entry differs (added, changed or gone) from the
    snapshot whose ``routes_id`` is ``since``."""

    since: object
    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class MeshPlacement:
    """Placement in one ModelMesh deployment (one namespace)."""

    namespace: str
    instances: Mapping[str, Instance] = field(default_factory=dict)
    models: Mapping[str, Copies] = field(default_factory=dict)
    vmodels: Mapping[str, VModel] = field(default_factory=dict)
    # epoch ms at which a loading copy counts as loaded; the snapshot must be rebuilt then
    next_transition_ms: int | None = None
    # instance id -> every model id and vmodel id routable to it, sorted
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # routable(name) of every model id and vmodel id that has pods
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # This snapshot's ``routes``, for ``RouteChanges.since`` of the next one: a consumer
    # that derives state from 100,000s of routes updates it by the names that changed.
    routes_id: object = field(default_factory=object, compare=False)
    changes: RouteChanges | None = field(default=None, compare=False)

    def routable(self, name: str) -> tuple[str, ...]:
        """Instances to send a request for ``name`` (model id, else vmodel id) to."""
        copies = self.models.get(name)
        if copies is None:
            vmodel = self.vmodels.get(name)
            if vmodel is None:
                return ()
            copies = self.models.get(vmodel.active)
            if copies is None:
                return ()
        return copies.routable

    def names_by_instance(self) -> dict[str, list[str]]:
        """For each live instance, every model id and vmodel id routable to it (sorted)."""
        return {iid: list(self.names.get(iid, ())) for iid in self.instances}


@dataclass(frozen=True, slots=True)
class Placement:
    """Every watched ModelMesh deployment, by namespace."""

    meshes: Mapping[str, MeshPlacement] = field(default_factory=dict)
    revision: int = 0  # etcd revision the snapshot reflects
    # time.monotonic() when the watch received the oldest etcd change this snapshot is the
    # first to reflect; None: none (a copy loaded by the clock, a policy change)
    changed_at: float | None = field(default=None, compare=False)

    @property
    def next_transition_ms(self) -> int | None:
        times = [m.next_transition_ms for m in self.meshes.values() if m.next_transition_ms]
        return min(times) if times else None


def live_instances(
    instances: Mapping[str, InstanceRecord], litelinks: Mapping[str, LitelinksRecord]
) -> dict[str, Instance]:
    """Pods that hold a lease (instance record) *and* registered an address, not shutting down."""
    newest: dict[str, LitelinksRecord] = {}
    for reg in litelinks.values():
        seen = newest.get(reg.instance_id)
        if seen is None or reg.registration_time > seen.registration_time:
            newest[reg.instance_id] = reg
    live = {}
    for iid, rec in instances.items():
        found = newest.get(iid)
        if found is None or rec.shutdown:
            continue
        live[iid] = Instance(
            id=iid,
            host=found.hostname,
            zone=rec.zone,
            capacity=rec.capacity,
            used=rec.used,
            model_count=rec.count,
            loads_in_progress=rec.loads_in_progress,
            rpm=rec.rpm,
            lru_time=rec.lru_time,
        )
    return live


def build_mesh(
    namespace: str,
    registry: Mapping[str, ModelRecord],
    vmodels: Mapping[str, VModelRecord],
    instances: Mapping[str, InstanceRecord],
    litelinks: Mapping[str, LitelinksRecord],
    now_ms: int,
    loaded_after_ms: int = DEFAULT_LOADED_AFTER_MS,
) -> MeshPlacement:
    """Placement of one deployment at time ``now_ms``."""
    live = live_instances(instances, litelinks)
    models: dict[str, Copies] = {}
    names: dict[str, list[str]] = {iid: [] for iid in live}
    next_transition: int | None = None
    for model_id, rec in registry.items():
        copies, due = classify(rec, live, now_ms, loaded_after_ms)
        models[model_id] = copies
        if due is not None:
            next_transition = due if next_transition is None else min(next_transition, due)
        for iid in copies.routable:
            names[iid].append(model_id)
    routes = {model_id: c.routable for model_id, c in models.items() if c.routable}
    vms = {}
    for vid, vrec in vmodels.items():
        vm = vmodel_of(vrec)
        if vm is None:
            continue
        vms[vid] = vm
        active = models.get(vm.active)
        if active is not None:
            for iid in active.routable:
                names[iid].append(vid)
            if active.routable and vid not in models:  # a model id wins over a vmodel id
                routes[vid] = active.routable
    return MeshPlacement(
        namespace=namespace,
        instances=MappingProxyType(live),
        models=MappingProxyType(models),
        vmodels=MappingProxyType(vms),
        next_transition_ms=next_transition,
        names=SortedNames({iid: SortedNames.Entry(frozenset(n)) for iid, n in names.items()}),
        routes=MappingProxyType(routes),
    )


def vmodel_of(rec: VModelRecord) -> VModel | None:
    if not (rec.active_model or rec.target_model):
        return None
    return VModel(
        # a brand-new vmodel may not have an active model yet: its target is all there is
        active=rec.active_model or rec.target_model,
        target=rec.target_model or rec.active_model,
        target_failed=rec.target_failed,
    )


def classify(
    rec: ModelRecord, live: Mapping[str, Instance], now_ms: int, loaded_after_ms: int
) -> tuple[Copies, int | None]:
    """Copies of one model, and when the earliest loading copy counts as loaded."""
    ids = rec.instance_ids
    if not rec.failed_in:  # fast path, the common case at scale: all live and loaded
        fast = [i for i, t in ids.items() if i in live and now_ms - t >= loaded_after_ms]
        if len(fast) == len(ids):
            fast.sort()
            return Copies(tuple(fast)), None
    loaded, loading, failed, dead = [], [], [], []
    due: int | None = None
    for iid, started_ms in rec.instance_ids.items():
        if iid in rec.failed_in:
            failed.append(iid)
        elif iid not in live:
            dead.append(iid)
        elif now_ms - started_ms >= loaded_after_ms:
            loaded.append(iid)
        else:
            loading.append(iid)
            done = started_ms + loaded_after_ms
            due = done if due is None else min(due, done)
    failed.extend(i for i in rec.failed_in if i not in rec.instance_ids)
    copies = Copies(
        tuple(sorted(loaded)), tuple(sorted(loading)), tuple(sorted(failed)), tuple(sorted(dead))
    )
    return copies, due
