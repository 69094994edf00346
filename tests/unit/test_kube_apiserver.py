"""The Kubernetes API stand-in (tests/kube/apiserver.py) behaves like a real API server for
the real `kubernetes` client and `kubectl`: the labeler's and CRD watcher's tests rely on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
import pytest
from kubernetes.client import CoordinationV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.rest import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from tests.kube.apiserver import ApiServer, pod

NS = "modelmesh-serving"
A = "modelmesh-serving-mlserver-1.x-7c6d8b9f5d-abcde"
B = "modelmesh-serving-mlserver-1.x-7c6d8b9f5d-fghij"
WIDGETS = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wd"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object"}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {
                        "name": "Accepted",
                        "type": "string",
                        "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
                    },
                ],
            }
        ],
    },
}


@pytest.fixture
def server() -> Iterator[ApiServer]:
    s = ApiServer(history=50, bookmark_interval=0.2)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def core(server: ApiServer) -> CoreV1Api:
    server.create(pod(A, NS, "10.0.0.5", {"model": "x"}))
    server.create(pod(B, NS, "10.0.0.6"))
    return CoreV1Api(server.api_client())


def names(pods: Any) -> list[str]:
    return sorted(p.metadata.name for p in pods.items)


def kubectl(server: ApiServer, tmp_path: Path, *args: str) -> str:
    config = server.kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    cmd = ["kubectl", "--kubeconfig", str(config), "--cache-dir", str(tmp_path / "cache"), *args]
    env = {**os.environ, "NO_PROXY": "127.0.0.1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_label_selectors_pick_pods_as_kubernetes_does(core: CoreV1Api) -> None:
    both, only_a, only_b = [A, B], [A], [B]
    for selector, want in [
        ("model=x", only_a),
        ("model==x", only_a),
        ("model!=x", only_b),
        ("model in (x, y)", only_a),
        ("model notin (x)", only_b),
        ("model", only_a),
        ("!model", only_b),
        ("modelmesh-service=modelmesh-serving,!model", only_b),
        ("", both),
    ]:
        assert names(core.list_namespaced_pod(NS, label_selector=selector)) == want, selector
    assert names(core.list_pod_for_all_namespaces(label_selector="model=x")) == only_a
    assert names(core.list_namespaced_pod(NS, field_selector=f"metadata.name={B}")) == only_b
    assert names(core.list_namespaced_pod("elsewhere")) == []


def test_merge_patches_set_and_remove_only_the_labels_they_name(core: CoreV1Api) -> None:
    strategic = {"metadata": {"labels": {"m/a": "loaded", "model": None}}}
    patched = core.patch_namespaced_pod(A, NS, strategic)  # a dict body goes as strategic
    assert patched.metadata.labels == {
        "modelmesh-service": "modelmesh-serving",
        "name": "modelmesh-serving-mlserver-1.x",
        "m/a": "loaded",
    }
    assert patched.status.pod_ip == "10.0.0.5"  # a label patch leaves the rest alone
    merge = {"metadata": {"labels": {"m/a": None, "m/b": "loading"}}}
    core.patch_namespaced_pod(A, NS, merge, _content_type="application/merge-patch+json")
    assert core.read_namespaced_pod(A, NS).metadata.labels == {
        "modelmesh-service": "modelmesh-serving",
        "name": "modelmesh-serving-mlserver-1.x",
        "m/b": "loading",
    }


def test_requests_record_the_patch_type_and_body(server: ApiServer, core: CoreV1Api) -> None:
    core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"m/a": "loaded"}}})
    last = server.requests[-1]
    assert (last.method, last.path, last.status) == (
        "PATCH",
        f"/api/v1/namespaces/{NS}/pods/{A}",
        200,
    )
    assert last.content_type == "application/strategic-merge-patch+json"
    assert last.body == {"metadata": {"labels": {"m/a": "loaded"}}}


def test_json_patch_adds_and_tests(core: CoreV1Api) -> None:
    ops = [
        {"op": "test", "path": "/metadata/labels/model", "value": "x"},
        {"op": "add", "path": "/metadata/labels/m~1a", "value": "loaded"},
        {"op": "remove", "path": "/metadata/labels/model"},
    ]
    labels = core.patch_namespaced_pod(A, NS, ops).metadata.labels
    assert labels["m/a"] == "loaded" and "model" not in labels
    with pytest.raises(ApiException) as failed:
        core.patch_namespaced_pod(
            A, NS, [{"op": "test", "path": "/metadata/labels/m~1a", "value": "no"}]
        )
    assert failed.value.status == 422


def test_a_stale_resource_version_is_a_conflict(core: CoreV1Api) -> None:
    seen = core.read_namespaced_pod(A, NS)
    core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"other": "writer"}}})
    stale = {
        "metadata": {"resourceVersion": seen.metadata.resource_version, "labels": {"m/a": "loaded"}}
    }
    with pytest.raises(ApiException) as conflict:
        core.patch_namespaced_pod(A, NS, stale)
    assert conflict.value.status == 409
    assert '"reason": "Conflict"' in conflict.value.body
    seen.metadata.labels["m/a"] = "loaded"
    with pytest.raises(ApiException) as replaced:
        core.replace_namespaced_pod(A, NS, seen)
    assert replaced.value.status == 409
    fresh = core.read_namespaced_pod(A, NS)
    fresh.metadata.labels["m/a"] = "loaded"
    assert core.replace_namespaced_pod(A, NS, fresh).metadata.labels["m/a"] == "loaded"


def test_a_write_that_changes_nothing_keeps_the_version_and_sends_no_event(
    core: CoreV1Api,
) -> None:
    before = core.read_namespaced_pod(A, NS).metadata.resource_version
    listed = core.list_namespaced_pod(NS).metadata.resource_version
    same = core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"model": "x"}}})
    assert same.metadata.resource_version == before
    assert watch_events(core, resource_version=listed, timeout_seconds=1) == []


def test_create_names_new_objects_and_refuses_taken_names(core: CoreV1Api) -> None:
    body = {"metadata": {"generateName": "lease-holder-"}, "spec": {}}
    made = CoordinationV1Api(core.api_client).create_namespaced_lease(NS, body)
    assert made.metadata.name.startswith("lease-holder-") and len(made.metadata.name) == 18
    assert made.metadata.uid and made.metadata.creation_timestamp
    with pytest.raises(ApiException) as taken:
        core.create_namespaced_pod(NS, {"metadata": {"name": A}, "spec": {"containers": []}})
    assert taken.value.status == 409 and '"reason": "AlreadyExists"' in taken.value.body
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("no-such-pod", NS)
    assert missing.value.status == 404 and '"reason": "NotFound"' in missing.value.body


def test_writers_in_many_threads_each_get_their_own_version(core: CoreV1Api) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version

    def write(i: int) -> None:
        for j in range(10):
            core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {f"t{i}": str(j)}}})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = core.read_namespaced_pod(A, NS).metadata.labels
    assert all(labels[f"t{i}"] == "9" for i in range(4))
    events = []
    for e in kubernetes.watch.Watch().stream(
        core.list_namespaced_pod, NS, resource_version=start, timeout_seconds=1
    ):
        events.append(int(e["raw_object"]["metadata"]["resourceVersion"]))
    assert events == list(range(int(start) + 1, int(start) + 41))


def test_invalid_label_keys_and_values_are_rejected(core: CoreV1Api) -> None:
    for labels in ({"m/" + "x" * 64: "loaded"}, {"m/a": "-bad"}, {"m/a b": "loaded"}):
        with pytest.raises(ApiException) as invalid:
            core.patch_namespaced_pod(A, NS, {"metadata": {"labels": labels}})
        assert invalid.value.status == 422, labels
    with pytest.raises(ApiException) as too_big:
        core.patch_namespaced_pod(A, NS, {"metadata": {"annotations": {"m/models": "x" * 300_000}}})
    assert too_big.value.status == 422


def watch_events(core: CoreV1Api, **kwargs: Any) -> list[tuple[str, str]]:
    events = []
    for e in kubernetes.watch.Watch().stream(core.list_namespaced_pod, NS, **kwargs):
        events.append((e["type"], e["raw_object"]["metadata"].get("name", "")))
    return events


def test_a_watch_replays_changes_after_its_version_and_sees_direct_writes(
    server: ApiServer, core: CoreV1Api
) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version
    core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"m/a": "loaded"}}})
    server.delete("v1", "Pod", NS, B)
    threading.Timer(0.3, lambda: server.create(pod("late-pod-0-0", NS, "10.0.0.7"))).start()
    events = watch_events(core, resource_version=start, timeout_seconds=1)
    assert events == [("MODIFIED", A), ("DELETED", B), ("ADDED", "late-pod-0-0")]


def test_a_watch_without_version_starts_with_the_current_objects(core: CoreV1Api) -> None:
    assert sorted(watch_events(core, timeout_seconds=1)) == [("ADDED", A), ("ADDED", B)]


def test_a_selector_watch_sees_pods_leave_and_join_the_selection(
    server: ApiServer, core: CoreV1Api
) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version
    core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"model": None}}})
    core.patch_namespaced_pod(B, NS, {"metadata": {"labels": {"model": "x"}}})
    events = watch_events(core, label_selector="model=x", resource_version=start, timeout_seconds=1)
    assert events == [("DELETED", A), ("ADDED", B)]


def test_a_watch_from_a_compacted_version_ends_in_410_gone(
    server: ApiServer, core: CoreV1Api
) -> None:
    old = core.list_namespaced_pod(NS).metadata.resource_version
    core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"m/a": "loaded"}}})
    server.compact()
    raw = core.list_namespaced_pod(
        NS, watch=True, resource_version=old, _preload_content=False, _request_timeout=5
    )
    assert raw.status == 200  # as on a real server, the 410 is an ERROR event in the stream
    event = json.loads(raw.read())
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    # the client retries a 410 once from the same version, then raises it
    with pytest.raises(ApiException) as gone:
        watch_events(core, resource_version=old, _request_timeout=5)
    assert gone.value.status == 410
    current = core.list_namespaced_pod(NS).metadata.resource_version
    assert watch_events(core, resource_version=current, timeout_seconds=1) == []


def test_the_history_is_bounded(server: ApiServer, core: CoreV1Api) -> None:
    old = core.list_namespaced_pod(NS).metadata.resource_version
    for i in range(60):  # the fixture keeps 50 events
        core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"n": str(i)}}})
    with pytest.raises(ApiException) as gone:
        watch_events(core, resource_version=old, timeout_seconds=1)
    assert gone.value.status == 410


def test_bookmarks_carry_a_version_to_resume_from(server: ApiServer, core: CoreV1Api) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version
    w = kubernetes.watch.Watch()
    stream = w.stream(
        core.list_namespaced_pod,
        NS,
        resource_version=start,
        allow_watch_bookmarks=True,
        _request_timeout=5,  # fail, not hang, without bookmarks
    )
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "unrelated"}})
    bookmark = next(stream)
    w.stop()
    assert bookmark["type"] == "BOOKMARK"
    resume = bookmark["raw_object"]["metadata"]["resourceVersion"]
    assert int(resume) > int(start)  # writes to other kinds move it on too
    core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"m/a": "loaded"}}})
    assert watch_events(core, resource_version=resume, timeout_seconds=1) == [("MODIFIED", A)]


def test_an_injected_429_carries_retry_after(server: ApiServer, core: CoreV1Api) -> None:
    server.inject("PATCH", "pods", 429, retry_after=3)
    with pytest.raises(ApiException) as throttled:
        core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"m/a": "loaded"}}})
    assert throttled.value.status == 429
    assert throttled.value.headers["Retry-After"] == "3"
    assert '"reason": "TooManyRequests"' in throttled.value.body
    assert core.patch_namespaced_pod(A, NS, {"metadata": {"labels": {"m/a": "loaded"}}})
    assert [r.status for r in server.requests if r.method == "PATCH"] == [429, 200]


def test_leader_election_on_a_lease_elects_one_and_fails_over(server: ApiServer) -> None:
    kubernetes.client.Configuration.set_default(server.api_client().configuration)
    leaders: list[str] = []
    done = threading.Event()

    def candidate(identity: str) -> threading.Thread:
        def lead() -> None:
            leaders.append(identity)
            done.wait()
            raise RuntimeError("stop leading")  # the client's way to step down

        lock = LeaseLock("modelxds-labeler", NS, identity)
        config = electionconfig.Config(lock, 2, 1.5, 1, lead, lambda: None)
        thread = threading.Thread(target=leaderelection.LeaderElection(config).run, daemon=True)
        thread.start()
        return thread

    try:
        threads = [candidate("one"), candidate("two")]
        time.sleep(3)
        assert len(leaders) == 1
        lease = CoordinationV1Api(server.api_client()).read_namespaced_lease("modelxds-labeler", NS)
        assert lease.spec.holder_identity == leaders[0]
        done.set()
        deadline = time.monotonic() + 10
        while len(leaders) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(leaders) == ["one", "two"]  # the follower took over once the lease lapsed
        for t in threads:
            t.join(timeout=5)
    finally:
        done.set()
        kubernetes.client.Configuration.set_default(None)


def test_a_custom_resource_status_and_spec_move_separately(server: ApiServer) -> None:
    server.add_crd(WIDGETS)
    api = CustomObjectsApi(server.api_client())
    group = ("example.com", "v1", NS, "widgets")
    body = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    created = api.create_namespaced_custom_object(
        *group, {**body, "spec": {"size": 1}, "status": {"x": 1}}
    )
    assert "status" not in created and created["metadata"]["generation"] == 1
    status = {
        "status": {"conditions": [{"type": "Accepted", "status": "True"}]},
        "spec": {"size": 9},
    }
    after = api.patch_namespaced_custom_object_status(*group, "w", status)
    assert after["spec"] == {"size": 1} and after["metadata"]["generation"] == 1
    assert after["status"]["conditions"][0]["type"] == "Accepted"
    after = api.patch_namespaced_custom_object(*group, "w", {"spec": {"size": 2}, "status": None})
    assert after["metadata"]["generation"] == 2 and after["status"] == status["status"]
    same = api.patch_namespaced_custom_object(*group, "w", {"metadata": {"labels": {"a": "b"}}})
    assert same["metadata"]["generation"] == 2
    crd = server.get(
        "apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "widgets.example.com"
    )
    assert crd is not None
    assert {c["type"] for c in crd["status"]["conditions"]} == {"NamesAccepted", "Established"}


def test_its_kubeconfig_loads_in_the_client_with_the_namespace(
    server: ApiServer, tmp_path: Path
) -> None:
    path = server.kubeconfig(tmp_path / "config", namespace=NS)
    _, active = kubernetes.config.list_kube_config_contexts(str(path))
    assert active["context"]["namespace"] == NS
    client = kubernetes.config.new_client_from_config(str(path))
    assert [n.metadata.name for n in CoreV1Api(client).list_namespace().items] == ["default"]


def test_kubectl_lists_exactly_the_pods_with_a_label(
    server: ApiServer, core: CoreV1Api, tmp_path: Path
) -> None:
    server.create(pod("elsewhere-0-0", "other", "10.0.1.1", {"model": "x"}))
    assert kubectl(server, tmp_path, "get", "pods", "-l", "model=x", "-o", "name") == f"pod/{A}\n"
    table = kubectl(server, tmp_path, "get", "pods", "-n", NS, "-l", "model=x").splitlines()
    assert table[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert [row.split()[:4] for row in table[1:]] == [[A, "3/3", "Running", "0"]]


def test_kubectl_applies_and_prints_custom_resources(server: ApiServer, tmp_path: Path) -> None:
    server.add_crd(WIDGETS)
    manifest = tmp_path / "w.yaml"
    manifest.write_text(
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\nspec:\n  size: 3\n"
    )
    assert "created" in kubectl(server, tmp_path, "apply", "-f", str(manifest))
    manifest.write_text(manifest.read_text().replace("size: 3", "size: 4"))
    assert "configured" in kubectl(server, tmp_path, "apply", "-f", str(manifest))
    status = {"status": {"conditions": [{"type": "Accepted", "status": "True"}]}}
    api = CustomObjectsApi(server.api_client())
    api.patch_namespaced_custom_object_status("example.com", "v1", NS, "widgets", "w", status)
    table = kubectl(server, tmp_path, "get", "wd").splitlines()
    assert [line.split() for line in table] == [["NAME", "SIZE", "ACCEPTED"], ["w", "4", "True"]]


async def test_asyncio_code_in_another_loop_reaches_it(server: ApiServer, core: CoreV1Api) -> None:
    url = f"{server.url}/api/v1/namespaces/{NS}/pods/{A}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert (await response.json())["status"]["podIP"] == "10.0.0.5"
