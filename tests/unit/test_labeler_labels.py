"""The labeler's pure core: label names, the labels and annotation a pod should carry,
and the merge patch that gets it there."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelxds.labeler.labels import (
    ANNOTATIONS_LIMIT,
    NOTHING,
    Desired,
    LabelerConfigError,
    PodModels,
    check_subset_key,
    desired_for_mesh,
    instance_of,
    is_label_name,
    label_name,
    merge_patch,
    model_labels,
    models_annotation,
)
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.model import MeshPlacement, build_mesh

KEY = "modelmesh.asm.alibabacloud.com"
NOW = 1_715_000_100_000
OLD = NOW - 60_000
# What kube-apiserver accepts as a label key's name part (apimachinery's qualifiedName).
K8S_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def k8s_accepts(name: str) -> bool:
    return len(name) <= 63 and K8S_NAME.fullmatch(name) is not None


def mesh_of(
    registry: dict[str, ModelRecord],
    hosts: dict[str, str],
    vmodels: dict[str, VModelRecord] | None = None,
) -> MeshPlacement:
    instances = {i: InstanceRecord(start_time=OLD) for i in hosts}
    litelinks = {
        f"{h}_8080_{OLD:x}": LitelinksRecord(h, i, 8080, registration_time=OLD)
        for i, h in hosts.items()
    }
    return build_mesh("ns", registry, vmodels or {}, instances, litelinks, NOW)


def test_a_valid_name_is_its_own_label() -> None:
    for name in ("example-mnist-isvc", "example-mnist-isvc__isvc-6b2eb0b8bf", "A.b_c-9", "x"):
        assert label_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "m" * 64,  # one too long
        "model/with/slashes",
        "-starts-with-a-dash",
        "ends-with-a-dot.",
        "spaces in it",
        "ünïcode-model",
        "",
        "!!!",
    ],
)
def test_a_name_kubernetes_refuses_gets_a_valid_stable_hashed_form(name: str) -> None:
    got = label_name(name)
    assert k8s_accepts(got), got
    assert got == label_name(name)  # stable: the same pod label on every replica and restart
    assert re.fullmatch(r".*--[0-9a-f]{16}", got)


def test_the_hashed_form_keeps_a_readable_start() -> None:
    long = "sentiment-analysis-bert-large-uncased-finetuned-on-customer-reviews-2024"
    got = label_name(long)
    assert got.startswith("sentiment-analysis-bert-large-uncased-finetun--")
    assert label_name("team/fraud model").startswith("team-fraud-model--")


def test_a_name_shaped_like_a_hashed_form_is_hashed_so_it_cannot_take_anothers_label() -> None:
    other = "m" * 70
    taken = label_name(other)
    assert k8s_accepts(taken)  # a model could really be called this
    assert label_name(taken) != taken
    assert label_name(taken) != label_name(other)


def test_our_own_label_names_are_never_a_models_label() -> None:
    assert label_name("overflow") != "overflow"
    assert label_name("model-count") != "model-count"


@given(st.text(max_size=80), st.text(max_size=80))
def test_two_different_names_never_share_a_label(a: str, b: str) -> None:
    if a != b:
        assert label_name(a) != label_name(b)


@given(st.text(max_size=120))
def test_every_label_name_is_one_kubernetes_accepts(name: str) -> None:
    assert k8s_accepts(label_name(name))
    assert is_label_name(label_name(name))


def test_a_subset_key_that_cannot_prefix_a_label_is_refused_naming_it() -> None:
    assert check_subset_key(KEY) == KEY
    for bad in ("Model.Mesh", "has_underscore.io", "a" * 254, "-x.io", "x.io.", ""):
        with pytest.raises(LabelerConfigError, match="subset key"):
            check_subset_key(bad)


def test_loaded_and_loading_names_each_get_their_state() -> None:
    registry = {
        "old": ModelRecord(instance_ids={"pod-a": OLD}),
        "new": ModelRecord(instance_ids={"pod-a": NOW - 100}),  # started 0.1 s ago: loading
        "elsewhere": ModelRecord(instance_ids={"pod-b": OLD}),
    }
    mesh = mesh_of(registry, {"pod-a": "10.0.0.1", "pod-b": "10.0.0.2"})
    desired = desired_for_mesh(mesh, KEY, 200)
    assert desired["pod-a"].labels == {f"{KEY}/old": "loaded", f"{KEY}/new": "loading"}
    assert desired["pod-b"].labels == {f"{KEY}/elsewhere": "loaded"}


def test_an_inference_service_name_is_labeled_where_its_active_model_is() -> None:
    registry = {"isvc__isvc-1": ModelRecord(instance_ids={"pod-a": OLD})}
    vmodels = {"isvc": VModelRecord(active_model="isvc__isvc-1", target_model="isvc__isvc-1")}
    mesh = mesh_of(registry, {"pod-a": "10.0.0.1", "pod-b": "10.0.0.2"}, vmodels)
    desired = desired_for_mesh(mesh, KEY, 200)
    assert desired["pod-a"].labels == {f"{KEY}/isvc": "loaded", f"{KEY}/isvc__isvc-1": "loaded"}
    assert desired["pod-b"] == Desired({}, PodModels())


def test_the_cap_keeps_loaded_names_first_then_by_name_and_marks_the_overflow() -> None:
    models = PodModels(
        loaded=tuple(f"m{i:03}" for i in range(250)), loading=("a-loading", "b-loading")
    )
    labels = model_labels(KEY, models, 200)
    model_keys = [k for k in labels if k not in (f"{KEY}/overflow", f"{KEY}/model-count")]
    assert len(model_keys) == 200
    assert model_keys == [f"{KEY}/m{i:03}" for i in range(200)]
    assert labels[f"{KEY}/overflow"] == "true"
    assert labels[f"{KEY}/model-count"] == "252"


def test_under_the_cap_there_is_no_overflow_label() -> None:
    labels = model_labels(KEY, PodModels(loaded=("a", "b"), loading=("c",)), 3)
    assert labels == {f"{KEY}/a": "loaded", f"{KEY}/b": "loaded", f"{KEY}/c": "loading"}


def test_the_models_annotation_is_compact_sorted_json_of_every_name() -> None:
    models = PodModels(loaded=("a", "b"), loading=("c",))
    text = models_annotation(models, 1000)
    assert text == '{"loaded":["a","b"],"loading":["c"]}'


def test_a_models_annotation_over_budget_is_truncated_and_says_by_how_much() -> None:
    models = PodModels(loaded=tuple(f"model-{i:05}" for i in range(20_000)))
    text = models_annotation(models, 128 * 1024)
    assert text is not None and len(text) <= 128 * 1024
    doc = json.loads(text)
    assert doc["loaded"] == [f"model-{i:05}" for i in range(len(doc["loaded"]))]
    assert doc["truncated"] == 20_000 - len(doc["loaded"])
    assert doc["truncated"] > 0


def test_the_annotation_shrinks_to_fit_beside_other_annotations() -> None:
    models = PodModels(loaded=tuple(f"model-{i:05}" for i in range(20_000)))
    others = {"big.example.com/blob": "x" * 200_000}
    patch = merge_patch(KEY, {}, others, Desired({}, models))
    assert patch is not None
    ours = patch["metadata"]["annotations"][f"{KEY}/models"]
    total = sum(len(k) + len(v) for k, v in {**others, f"{KEY}/models": ours}.items())
    assert total <= ANNOTATIONS_LIMIT
    assert json.loads(ours)["truncated"] > 0


def test_the_patch_touches_only_our_keys_and_removes_what_is_gone() -> None:
    labels = {
        "app": "modelmesh",
        "modelmesh-service": "modelmesh-serving",
        "other.example.com/gone-model": "loaded",  # someone else's prefix
        f"{KEY}x/gone-model": "loaded",  # a longer prefix, not ours
        f"{KEY}/gone-model": "loaded",
        f"{KEY}/kept": "loading",
    }
    annotations = {"prometheus.io/scrape": "true", f"{KEY}/models": "stale"}
    desired = Desired({f"{KEY}/kept": "loaded", f"{KEY}/new": "loaded"}, PodModels(("kept", "new")))
    patch = merge_patch(KEY, labels, annotations, desired)
    assert patch == {
        "metadata": {
            "labels": {f"{KEY}/gone-model": None, f"{KEY}/kept": "loaded", f"{KEY}/new": "loaded"},
            "annotations": {f"{KEY}/models": '{"loaded":["kept","new"],"loading":[]}'},
        }
    }


def test_a_pod_that_already_matches_needs_no_patch() -> None:
    desired = Desired({f"{KEY}/a": "loaded"}, PodModels(("a",)))
    labels = {"app": "x", f"{KEY}/a": "loaded"}
    annotations = {f"{KEY}/models": '{"loaded":["a"],"loading":[]}'}
    assert merge_patch(KEY, labels, annotations, desired) is None


def test_a_pod_that_is_no_live_instance_loses_all_our_keys() -> None:
    labels = {"app": "x", f"{KEY}/a": "loaded"}
    annotations = {f"{KEY}/models": '{"loaded":["a"],"loading":[]}', "keep": "me"}
    assert merge_patch(KEY, labels, annotations, NOTHING) == {
        "metadata": {"labels": {f"{KEY}/a": None}, "annotations": {f"{KEY}/models": None}}
    }
    assert merge_patch(KEY, {"app": "x"}, {"keep": "me"}, NOTHING) is None


def test_a_pod_is_its_instance_by_name_suffix_and_ip() -> None:
    pod = "modelmesh-serving-mlserver-1.x-7c5d8b9f4d-x2kzq"
    mesh = mesh_of({}, {"8b9f4d-x2kzq": "10.0.0.1", "abcdefabcdef": "fd00::1"})
    assert instance_of(mesh, pod, "10.0.0.1") == "8b9f4d-x2kzq"
    assert instance_of(mesh, "mm-abcdefabcdef", "fd00:0:0::1") == "abcdefabcdef"
    # same name, new IP: a restarted pod etcd has not seen register yet
    assert instance_of(mesh, pod, "10.0.0.9") is None
    assert instance_of(mesh, pod, "") is None
    assert instance_of(mesh, "unknown-pod-000000000000", "10.0.0.1") is None
