"""The incremental MeshIndex computes exactly what build_mesh defines, on random histories."""

from __future__ import annotations

import random

import pytest

from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.index import Changes, MeshIndex
from modelxds.placement.model import MeshPlacement, build_mesh

PODS = [f"pod-{i}" for i in range(6)]
MODELS = [f"m{i}" for i in range(12)]
VMODELS = [f"v{i}" for i in range(5)]
THRESHOLD = 3000


class History:
    """Random ModelMesh churn applied to record tables, noting changes as the watcher does."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.now = 1_000_000
        self.registry: dict[str, ModelRecord] = {}
        self.vmodels: dict[str, VModelRecord] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self.litelinks: dict[str, LitelinksRecord] = {}
        self.changes = Changes()

    def step(self) -> None:
        r = self.rnd
        op = r.randrange(8)
        if op == 0:  # a pod starts or re-registers (possibly with a new address)
            iid = r.choice(PODS)
            self.instances[iid] = InstanceRecord(start_time=self.now, shutdown=r.random() < 0.1)
            self.litelinks[f"{iid}_{r.randrange(3)}"] = LitelinksRecord(
                hostname=f"10.0.0.{r.randrange(250)}", instance_id=iid, registration_time=self.now
            )
            self.changes.pods = True
        elif op == 1:  # a pod's lease expires: both records go
            iid = r.choice(PODS)
            self.instances.pop(iid, None)
            for k in [k for k, v in self.litelinks.items() if v.instance_id == iid]:
                del self.litelinks[k]
            self.changes.pods = True
        elif op in (2, 3):  # a load starts, finished long ago, fails, or the model goes
            mid = r.choice(MODELS)
            ids = {
                p: self.now - r.choice([0, 1000, 2999, 3000, 10_000])
                for p in r.sample(PODS, r.randrange(4))
            }
            failed = {p: self.now for p in r.sample(PODS, r.randrange(2))}
            if r.random() < 0.15:
                self.registry.pop(mid, None)
            else:
                self.registry[mid] = ModelRecord(instance_ids=ids, failed_in=failed)
            self.changes.models.add(mid)
        elif op == 4:  # an InferenceService points at models, mid-transition or failed
            vid = r.choice(VMODELS)
            if r.random() < 0.15:
                self.vmodels.pop(vid, None)
            else:
                self.vmodels[vid] = VModelRecord(
                    active_model=r.choice([*MODELS, ""]),
                    target_model=r.choice([*MODELS, ""]),
                    target_failed=r.random() < 0.3,
                )
            self.changes.vmodels.add(vid)
        else:  # time passes: loading copies become loaded
            self.now += r.choice([1, 500, 1500, 3000])

    def reference(self) -> MeshPlacement:
        return build_mesh(
            "ns", self.registry, self.vmodels, self.instances, self.litelinks, self.now, THRESHOLD
        )


def _same(got: MeshPlacement, want: MeshPlacement) -> None:
    assert dict(got.instances) == dict(want.instances)
    assert dict(got.models) == dict(want.models)
    assert dict(got.vmodels) == dict(want.vmodels)
    assert got.names_by_instance() == want.names_by_instance()
    assert dict(got.routes) == dict(want.routes)
    # the index may wake early for a stale entry, never late
    if want.next_transition_ms is not None:
        assert got.next_transition_ms is not None
        assert got.next_transition_ms <= want.next_transition_ms


@pytest.mark.parametrize("seed", range(60))
def test_index_matches_build_mesh_on_random_churn(seed: int) -> None:
    h = History(seed)
    index = MeshIndex("ns", THRESHOLD)
    for _ in range(150):
        for _ in range(h.rnd.randrange(1, 4)):  # several changes per push, as debounced
            h.step()
        got = index.refresh(h.changes, h.registry, h.vmodels, h.instances, h.litelinks, h.now)
        _same(got, h.reference())


@pytest.mark.parametrize("seed", range(20))
def test_each_snapshot_names_exactly_the_routes_that_changed_since_the_one_before(
    seed: int,
) -> None:
    h = History(seed)
    index = MeshIndex("ns", THRESHOLD)
    before = index.refresh(h.changes, h.registry, h.vmodels, h.instances, h.litelinks, h.now)
    assert before.changes is None  # nothing to compare the first snapshot with
    for _ in range(150):
        for _ in range(h.rnd.randrange(1, 4)):
            h.step()
        got = index.refresh(h.changes, h.registry, h.vmodels, h.instances, h.litelinks, h.now)
        assert got.changes is not None and got.changes.since is before.routes_id
        names = before.routes.keys() | got.routes.keys()
        moved = {n for n in names if before.routes.get(n) != got.routes.get(n)}
        assert got.changes.names == moved
        before = got


def test_loading_copy_becomes_loaded_by_the_clock_alone() -> None:
    h = History(0)
    h.instances["pod-0"] = InstanceRecord()
    h.litelinks["a"] = LitelinksRecord(hostname="10.0.0.1", instance_id="pod-0")
    h.registry["m"] = ModelRecord(instance_ids={"pod-0": h.now})
    h.changes.all(h.registry, h.vmodels)
    index = MeshIndex("ns", THRESHOLD)
    first = index.refresh(h.changes, h.registry, h.vmodels, h.instances, h.litelinks, h.now)
    assert first.models["m"].loading == ("pod-0",)
    assert first.next_transition_ms == h.now + THRESHOLD
    later = index.refresh(
        Changes(), h.registry, h.vmodels, h.instances, h.litelinks, h.now + THRESHOLD
    )
    assert later.models["m"].loaded == ("pod-0",)
    assert later.next_transition_ms is None
