"""Placement: which live pods a request for a model or InferenceService goes to."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
from prometheus_client import REGISTRY

from modelxds.modelmesh import (
    InstanceRecord,
    Layout,
    LitelinksRecord,
    ModelRecord,
    Table,
    VModelRecord,
    encode,
    litelinks_item,
)
from modelxds.placement.etcd import prefix_range_end
from modelxds.placement.model import MeshPlacement, Transition, build_mesh
from modelxds.placement.watch import MeshTables

NOW = 1_715_000_100_000
LOADED_AFTER = 3000
OLD = NOW - 60_000  # a load that started a minute ago: loaded
NS = "modelmesh-serving"


def ip(iid: str) -> str:
    return f"10.1.0.{sum(iid.encode()) % 250}"


def pods(
    *ids: str, shutdown: frozenset[str] = frozenset()
) -> tuple[dict[str, InstanceRecord], dict[str, LitelinksRecord]]:
    """Live pods: an instance record and a litelinks registration each."""
    instances = {
        i: InstanceRecord(start_time=OLD, location="192.168.0.1", shutdown=i in shutdown)
        for i in ids
    }
    litelinks = {
        litelinks_item(ip(i), 8080, OLD): LitelinksRecord(ip(i), i, 8080, registration_time=OLD)
        for i in ids
    }
    return instances, litelinks


def model(failed: Mapping[str, int] | None = None, **copies: int) -> ModelRecord:
    """A registry record; keyword = instance id (with '_' for '-'), value = load start ms."""
    return ModelRecord(
        type="rt:mlserver-1.x",
        instance_ids={k.replace("_", "-"): v for k, v in copies.items()},
        failed_in=dict(failed or {}),
    )


def mesh(
    registry: Mapping[str, ModelRecord],
    live: tuple[str, ...] = ("pod-a", "pod-b", "pod-c"),
    vmodels: Mapping[str, VModelRecord] | None = None,
    now_ms: int = NOW,
) -> MeshPlacement:
    instances, litelinks = pods(*live)
    return build_mesh(NS, registry, vmodels or {}, instances, litelinks, now_ms, LOADED_AFTER)


# ---- live instances ----


def test_a_pod_is_live_with_instance_record_and_litelinks_registration() -> None:
    instances, litelinks = pods("pod-a", "pod-b", "pod-c", "pod-d", shutdown=frozenset({"pod-d"}))
    del instances["pod-b"]  # lease gone for the instance record only
    litelinks = {k: v for k, v in litelinks.items() if v.instance_id != "pod-c"}  # not registered
    registry = {"m": model(pod_a=OLD, pod_b=OLD, pod_c=OLD, pod_d=OLD)}
    placement = build_mesh(NS, registry, {}, instances, litelinks, NOW, LOADED_AFTER)
    assert set(placement.instances) == {"pod-a"}
    assert placement.routable("m") == ("pod-a",)
    assert placement.models["m"].dead == ("pod-b", "pod-c", "pod-d")


def test_routable_is_instance_ids_of_live_pods_minus_failed() -> None:
    registry = {"m": model(failed={"pod-c": NOW - 5}, pod_a=OLD, pod_b=OLD, pod_c=OLD, pod_x=OLD)}
    placement = mesh(registry)
    copies = placement.models["m"]
    assert placement.routable("m") == ("pod-a", "pod-b")
    assert copies.loaded == ("pod-a", "pod-b")
    assert copies.failed == ("pod-c",)
    assert copies.dead == ("pod-x",)


def test_failed_in_without_instance_ids_is_reported_failed() -> None:
    placement = mesh({"m": model(failed={"pod-b": NOW}, pod_a=OLD)})
    assert placement.models["m"].failed == ("pod-b",)
    assert placement.routable("m") == ("pod-a",)


def test_copies_only_on_dead_pods_are_not_routable() -> None:
    placement = mesh({"m": model(pod_gone=OLD, pod_gone2=NOW)})
    assert placement.routable("m") == ()
    assert placement.models["m"].dead == ("pod-gone", "pod-gone2")
    assert placement.models["m"].loading == ()
    assert placement.next_transition_ms is None  # a dead pod never finishes loading


def test_unknown_name_is_not_routable() -> None:
    assert mesh({}).routable("nope") == ()


def test_instance_carries_pod_address_and_load_from_records() -> None:
    instances = {
        "pod-a": InstanceRecord(
            location="192.168.7.7",
            zone="z1",
            capacity=100,
            used=40,
            count=3,
            loads_in_progress=1,
            rpm=60,
        )
    }
    litelinks = {"k": LitelinksRecord("100.96.35.150", "pod-a", 8080, registration_time=1)}
    inst = build_mesh(NS, {}, {}, instances, litelinks, NOW).instances["pod-a"]
    assert inst.host == "100.96.35.150"  # the pod IP, not `loc` (the node)
    assert (inst.zone, inst.capacity, inst.used, inst.model_count) == ("z1", 100, 40, 3)
    assert (inst.loads_in_progress, inst.rpm) == (1, 60)


def test_newest_litelinks_registration_wins() -> None:
    instances = {"pod-a": InstanceRecord()}
    old = LitelinksRecord("10.0.0.1", "pod-a", 8080, registration_time=1000)
    new = LitelinksRecord("10.0.0.2", "pod-a", 8080, registration_time=2000)
    for litelinks in (
        {litelinks_item("10.0.0.1", 8080, 1000): old, litelinks_item("10.0.0.2", 8080, 2000): new},
        {litelinks_item("10.0.0.2", 8080, 2000): new, litelinks_item("10.0.0.1", 8080, 1000): old},
    ):
        placement = build_mesh(NS, {}, {}, instances, litelinks, NOW)
        assert placement.instances["pod-a"].host == "10.0.0.2"


# ---- loaded vs loading ----


def test_loaded_after_threshold_boundary_counts_as_loaded() -> None:
    registry = {
        "m": model(
            pod_a=NOW - LOADED_AFTER,  # exactly at the threshold
            pod_b=NOW - LOADED_AFTER + 1,  # one ms short
            pod_c=NOW - LOADED_AFTER - 1,
        )
    }
    copies = mesh(registry).models["m"]
    assert copies.loaded == ("pod-a", "pod-c")
    assert copies.loading == ("pod-b",)


def test_loaded_copies_win_over_loading() -> None:
    placement = mesh({"m": model(pod_a=NOW - 10, pod_b=OLD, pod_c=NOW)})
    assert placement.routable("m") == ("pod-b",)
    assert placement.models["m"].loading == ("pod-a", "pod-c")


def test_only_loading_copies_are_routable() -> None:
    placement = mesh({"m": model(pod_a=NOW - 10, pod_c=NOW)})
    assert placement.models["m"].loaded == ()
    assert placement.routable("m") == ("pod-a", "pod-c")


def test_same_copies_become_loaded_as_time_passes() -> None:
    registry = {"m": model(pod_a=NOW - 1000, pod_b=OLD)}
    assert mesh(registry).routable("m") == ("pod-b",)
    later = mesh(registry, now_ms=NOW + 2000)
    assert later.routable("m") == ("pod-a", "pod-b")
    assert later.next_transition_ms is None


def test_next_transition_is_the_earliest_loading_copy() -> None:
    registry = {
        "m1": model(pod_a=NOW - 1000, pod_b=OLD),
        "m2": model(pod_b=NOW - 2500, pod_c=NOW),
        "m3": model(pod_gone=NOW - 2900),  # dead: never a transition
    }
    placement = mesh(registry)
    assert placement.next_transition_ms == NOW - 2500 + LOADED_AFTER
    assert mesh({"m": model(pod_a=OLD)}).next_transition_ms is None
    assert mesh({}).next_transition_ms is None


def test_failed_copy_is_not_a_transition() -> None:
    placement = mesh({"m": model(failed={"pod-a": NOW}, pod_a=NOW - 10)})
    assert placement.next_transition_ms is None
    assert placement.routable("m") == ()


# ---- vmodels (InferenceService names) ----

OLD_MODEL = "isvc-a__isvc-1111111111"
NEW_MODEL = "isvc-a__isvc-2222222222"


def test_vmodel_routes_to_active_model() -> None:
    registry = {OLD_MODEL: model(pod_a=OLD)}
    vm = {"isvc-a": VModelRecord("isvc", OLD_MODEL, OLD_MODEL)}
    placement = mesh(registry, vmodels=vm)
    assert placement.routable("isvc-a") == ("pod-a",)
    assert placement.vmodels["isvc-a"].transition is Transition.UP_TO_DATE


def test_vmodel_stays_on_active_while_target_loads() -> None:
    registry = {OLD_MODEL: model(pod_a=OLD), NEW_MODEL: model(pod_b=NOW - 10)}
    vm = {"isvc-a": VModelRecord("isvc", OLD_MODEL, NEW_MODEL)}
    placement = mesh(registry, vmodels=vm)
    assert placement.routable("isvc-a") == ("pod-a",)
    assert placement.vmodels["isvc-a"].transition is Transition.IN_PROGRESS
    # the target itself is still addressable by model id
    assert placement.routable(NEW_MODEL) == ("pod-b",)


def test_vmodel_stays_on_active_after_target_failed() -> None:
    registry = {OLD_MODEL: model(pod_a=OLD), NEW_MODEL: model(failed={"pod-b": NOW})}
    vm = {"isvc-a": VModelRecord("isvc", OLD_MODEL, NEW_MODEL, target_failed=True)}
    placement = mesh(registry, vmodels=vm)
    assert placement.routable("isvc-a") == ("pod-a",)
    assert placement.vmodels["isvc-a"].transition is Transition.BLOCKED_BY_FAILED_LOAD


def test_vmodel_with_only_target_uses_it() -> None:
    registry = {NEW_MODEL: model(pod_b=NOW - 10)}
    placement = mesh(registry, vmodels={"isvc-a": VModelRecord("isvc", target_model=NEW_MODEL)})
    assert placement.routable("isvc-a") == ("pod-b",)
    assert placement.vmodels["isvc-a"].active == NEW_MODEL


def test_vmodel_without_any_model_is_not_routable() -> None:
    vm = {"isvc-a": VModelRecord("isvc"), "isvc-b": VModelRecord(active_model="missing")}
    placement = mesh({}, vmodels=vm)
    assert placement.routable("isvc-a") == ()
    assert placement.routable("isvc-b") == ()


# ---- names per pod ----


def test_names_by_instance() -> None:
    registry = {
        "z-model": model(pod_a=OLD, pod_b=OLD),
        OLD_MODEL: model(pod_b=OLD, pod_gone=OLD),
        "loading-only": model(pod_c=NOW),
        "loaded-elsewhere": model(pod_a=OLD, pod_c=NOW),  # pod-c's copy is not routable
        "failed": model(failed={"pod-a": NOW}, pod_a=OLD),
    }
    vm = {
        "isvc-a": VModelRecord("isvc", OLD_MODEL, NEW_MODEL),
        "a-isvc": VModelRecord("isvc", "z-model", "z-model"),
    }
    placement = mesh(registry, vmodels=vm)
    assert placement.names_by_instance() == {
        "pod-a": ["a-isvc", "loaded-elsewhere", "z-model"],
        "pod-b": ["a-isvc", "isvc-a", OLD_MODEL, "z-model"],
        "pod-c": ["loading-only"],
    }


def test_names_by_instance_lists_idle_pods() -> None:
    assert mesh({}, live=("pod-a",)).names_by_instance() == {"pod-a": []}


# ---- MeshTables.apply ----

LAYOUT = Layout()
MODEL_KEY = LAYOUT.key(Table.REGISTRY, "m1")
GOOD = encode(ModelRecord(instance_ids={"pod-a": 5}))
BAD = b'{"instanceIds":["pod-a"]}'


def invalid_count(table: str = "registry") -> float:
    value = REGISTRY.get_sample_value("modelxds_etcd_invalid_records_total", {"table": table})
    return value or 0.0


def warnings_for(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and key in r.getMessage()]


def test_put_then_delete() -> None:
    tables = MeshTables(NS, LAYOUT)
    assert tables.apply(MODEL_KEY, GOOD) is True
    assert dict(tables.registry["m1"].instance_ids) == {"pod-a": 5}
    assert tables.apply(MODEL_KEY, None) is True
    assert tables.registry == {}
    assert tables.apply(MODEL_KEY, None) is False  # deleting what isn't there changes nothing


def test_each_table_is_filled() -> None:
    tables = MeshTables(NS, LAYOUT)
    item = litelinks_item("10.0.0.1", 8080, 1)
    tables.apply(LAYOUT.key(Table.VMODELS, "v"), encode(VModelRecord(active_model="m1")))
    tables.apply(LAYOUT.key(Table.INSTANCES, "pod-a"), encode(InstanceRecord(zone="z")))
    tables.apply(LAYOUT.key(Table.LITELINKS, item), encode(LitelinksRecord("10.0.0.1", "pod-a")))
    assert tables.vmodels["v"].active_model == "m1"
    assert tables.instances["pod-a"].zone == "z"
    assert tables.litelinks[item].hostname == "10.0.0.1"


def test_malformed_value_is_skipped_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="modelxds.placement.watch")
    tables = MeshTables(NS, LAYOUT)
    before = invalid_count()
    assert tables.apply(MODEL_KEY, BAD) is True
    assert "m1" not in tables.registry
    assert MODEL_KEY in tables.invalid
    assert "instanceIds" in tables.invalid[MODEL_KEY]
    assert invalid_count() == before + 1
    assert len(warnings_for(caplog, MODEL_KEY)) == 1

    tables.apply(MODEL_KEY, BAD)  # the same bad value again (e.g. re-delivered)
    assert invalid_count() == before + 1
    assert len(warnings_for(caplog, MODEL_KEY)) == 1

    tables.apply(MODEL_KEY, b"not json")  # a different problem is worth a new warning
    assert invalid_count() == before + 2
    assert len(warnings_for(caplog, MODEL_KEY)) == 2


def test_malformed_value_drops_previous_good_record() -> None:
    tables = MeshTables(NS, LAYOUT)
    tables.apply(MODEL_KEY, GOOD)
    assert tables.apply(MODEL_KEY, BAD) is True
    assert "m1" not in tables.registry


def test_good_value_clears_invalid_entry() -> None:
    tables = MeshTables(NS, LAYOUT)
    tables.apply(MODEL_KEY, BAD)
    tables.apply(MODEL_KEY, GOOD)
    assert tables.invalid == {}
    assert "m1" in tables.registry


def test_delete_clears_invalid_entry() -> None:
    tables = MeshTables(NS, LAYOUT)
    tables.apply(MODEL_KEY, BAD)
    tables.apply(MODEL_KEY, None)
    assert tables.invalid == {}


def test_invalid_litelinks_counted_under_its_table() -> None:
    tables = MeshTables(NS, LAYOUT)
    key = LAYOUT.key(Table.LITELINKS, litelinks_item("10.0.0.1", 8080, 1))
    before = invalid_count("litelinks")
    tables.apply(key, b'{"port":8080}')
    assert invalid_count("litelinks") == before + 1
    assert tables.litelinks == {}
    assert key in tables.invalid


@pytest.mark.parametrize(
    "key",
    [
        Layout.for_namespace("team-a").key(Table.REGISTRY, "m1"),
        Layout(service_name="other").key(Table.REGISTRY, "m1"),
        Layout().mm_prefix + "leaderLatch/_pod-a",
    ],
)
def test_keys_of_other_layouts_are_ignored(key: str) -> None:
    tables = MeshTables(NS, LAYOUT)
    before = invalid_count()
    assert tables.apply(key, GOOD) is False
    assert tables.apply(key, BAD) is False
    assert tables.registry == {}
    assert tables.invalid == {}
    assert invalid_count() == before


def test_tables_feed_build_mesh() -> None:
    tables = MeshTables(NS, LAYOUT)
    item = litelinks_item("10.0.0.1", 8080, 1)
    tables.apply(LAYOUT.key(Table.INSTANCES, "pod-a"), encode(InstanceRecord()))
    tables.apply(LAYOUT.key(Table.LITELINKS, item), encode(LitelinksRecord("10.0.0.1", "pod-a")))
    tables.apply(MODEL_KEY, encode(ModelRecord(instance_ids={"pod-a": OLD})))
    placement = build_mesh(
        NS, tables.registry, tables.vmodels, tables.instances, tables.litelinks, NOW
    )
    assert placement.routable("m1") == ("pod-a",)
    tables.apply(LAYOUT.key(Table.INSTANCES, "pod-a"), None)  # the pod's lease expired
    placement = build_mesh(
        NS, tables.registry, tables.vmodels, tables.instances, tables.litelinks, NOW
    )
    assert placement.routable("m1") == ()
    assert placement.models["m1"].dead == ("pod-a",)


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"modelmesh-serving/mm/modelmesh-serving/", b"modelmesh-serving/mm/modelmesh-serving0"),
        (b"abc", b"abd"),
        (b"a\xff", b"b"),
        (b"a\xff\xff", b"b"),
        (b"\xff", b"\0"),
        (b"", b"\0"),
    ],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


def test_prefix_range_end_covers_exactly_the_prefix() -> None:
    prefix = Layout().mm_prefix.encode()
    end = prefix_range_end(prefix)
    inside = [prefix, prefix + b"registry/m", prefix + b"\xff\xff"]
    outside = [prefix[:-1], b"modelmesh-serving/mm/modelmesh-serving-2/registry/m", end]
    assert all(prefix <= k < end for k in inside)
    assert not any(prefix <= k < end for k in outside)
