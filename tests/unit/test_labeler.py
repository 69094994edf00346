"""The labeler against the Kubernetes API stand-in: the real `kubernetes` client (and
`kubectl`) over HTTP, pods listed, watched and merge-patched as on a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client
from prometheus_client import REGISTRY

from modelxds.labeler import pods as pods_module
from modelxds.labeler.labels import label_name
from modelxds.labeler.leader import Leadership
from modelxds.labeler.sync import Labeler, Target
from modelxds.modelmesh import InstanceRecord, LitelinksRecord, ModelRecord, VModelRecord
from modelxds.placement.model import Placement, build_mesh
from tests.kube.apiserver import ApiServer, pod

NS = "modelmesh-serving"
KEY = "modelmesh.asm.alibabacloud.com"
SERVICE = "modelmesh-serving"
NOW_MS = int(time.time() * 1000)
OLD = NOW_MS - 600_000
DEADLINE_S = 10.0
# three ModelMesh runtime pods: the instance id is the last 12 characters of the name
PODS = {
    "modelmesh-serving-mlserver-1.x-7c5d8b9f4d-x2kzq": "10.1.0.11",
    "modelmesh-serving-mlserver-1.x-7c5d8b9f4d-b7wlp": "10.1.0.12",
    "modelmesh-serving-mlserver-1.x-7c5d8b9f4d-m9tcn": "10.1.0.13",
}
A, B, C = PODS


def iid(name: str) -> str:
    return name[-12:]


def placement(
    copies: dict[str, list[str]],
    *,
    loading: dict[str, list[str]] | None = None,
    vmodels: dict[str, str] | None = None,
    pods: dict[str, str] = PODS,
) -> Placement:
    """Models on pods (by pod name), loaded long ago or (``loading``) just now."""
    registry = {}
    for model in {*copies, *(loading or {})}:
        ids = {iid(p): OLD for p in copies.get(model, [])}
        ids.update({iid(p): int(time.time() * 1000) for p in (loading or {}).get(model, [])})
        registry[model] = ModelRecord(instance_ids=ids)
    instances = {iid(p): InstanceRecord(start_time=OLD) for p in pods}
    litelinks = {
        f"{ip}_8080_{OLD:x}": LitelinksRecord(ip, iid(p), 8080, registration_time=OLD)
        for p, ip in pods.items()
    }
    vms = {v: VModelRecord(active_model=m, target_model=m) for v, m in (vmodels or {}).items()}
    mesh = build_mesh(NS, registry, vms, instances, litelinks, int(time.time() * 1000))
    return Placement({NS: mesh})


def ours(kube: ApiServer, name: str) -> dict[str, str]:
    """The labels under our prefix a pod carries now."""
    obj = kube.get("v1", "Pod", NS, name)
    assert obj is not None
    return {
        k[len(KEY) + 1 :]: v
        for k, v in (obj["metadata"].get("labels") or {}).items()
        if k.startswith(f"{KEY}/")
    }


def carries(kube: ApiServer, name: str, want: dict[str, str]) -> bool:
    return ours(kube, name) == want


def metadata(kube: ApiServer, name: str) -> dict[str, Any]:
    obj = kube.get("v1", "Pod", NS, name)
    assert obj is not None
    meta: dict[str, Any] = obj["metadata"]
    return meta


def patches(kube: ApiServer, name: str | None = None) -> list[Any]:
    """The PATCH requests to pods (to one pod), as the server logged them."""
    return [
        r
        for r in kube.requests
        if r.method == "PATCH"
        and "/pods/" in r.path
        and (name is None or r.path.endswith(f"/pods/{name}"))
    ]


async def until(check: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


Start = Callable[..., Awaitable[Labeler]]


@pytest.fixture
def kube(kube_api: ApiServer) -> Iterator[ApiServer]:
    for name, ip in PODS.items():
        kube_api.create(pod(name, NS, ip, {"app": "model-serving"}))
    yield kube_api


@pytest_asyncio.fixture
async def start(kube: ApiServer) -> AsyncIterator[Start]:
    """Start labelers (pod watch and patch loop running) against the stand-in."""
    tasks: list[asyncio.Task[None]] = []

    async def make(
        *,
        max_model_labels: int = 200,
        patch_interval: float = 0.1,
        may_patch: Callable[[], bool] = lambda: True,
        api: ApiServer = kube,
    ) -> Labeler:
        labeler = Labeler(
            api.api_client(),
            [Target(NS, SERVICE, KEY)],
            max_model_labels=max_model_labels,
            patch_interval=patch_interval,
            may_patch=may_patch,
        )
        tasks.append(asyncio.create_task(labeler.run()))
        await asyncio.wait_for(labeler.watches[NS].listed.wait(), DEADLINE_S)
        return labeler

    yield make
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


async def test_labels_follow_loads_and_unloads(kube: ApiServer, start: Start) -> None:
    labeler = await start()
    await labeler.apply(placement({"mnist": [A, B], "iris": [B]}, loading={"fresh": [C]}))
    await until(lambda: ours(kube, A) == {"mnist": "loaded"}, "A holds mnist")
    await until(lambda: ours(kube, B) == {"mnist": "loaded", "iris": "loaded"}, "B: both")
    await until(lambda: ours(kube, C) == {"fresh": "loading"}, "C is loading fresh")

    await labeler.apply(placement({"mnist": [B], "fresh": [C]}))  # A unloads; C's load done
    await until(lambda: ours(kube, A) == {}, "A's label for mnist removed")
    await until(lambda: ours(kube, B) == {"mnist": "loaded"}, "B lost iris")
    await until(lambda: ours(kube, C) == {"fresh": "loaded"}, "C loaded fresh")
    models = json.loads(metadata(kube, B)["annotations"][f"{KEY}/models"])
    assert models == {"loaded": ["mnist"], "loading": []}


async def test_an_inference_service_name_labels_the_pods_of_its_active_model(
    kube: ApiServer, start: Start
) -> None:
    labeler = await start()
    await labeler.apply(
        placement({"mnist__isvc-1a2b3c": [A]}, vmodels={"mnist": "mnist__isvc-1a2b3c"})
    )
    await until(
        lambda: ours(kube, A) == {"mnist": "loaded", "mnist__isvc-1a2b3c": "loaded"},
        "A labeled with the InferenceService and its model",
    )


async def test_only_our_keys_are_touched(kube: ApiServer, start: Start) -> None:
    others = {
        "app": "model-serving",
        "team.example.com/owner": "fraud",
        f"{KEY}x/not-ours": "loaded",  # a longer prefix is someone else's
        f"{KEY}/stale-model": "loaded",  # left by an earlier run: ours, and wrong now
    }
    kube.delete("v1", "Pod", NS, A)
    kube.create(pod(A, NS, PODS[A], others))
    obj = kube.get("v1", "Pod", NS, A)
    assert obj is not None
    obj["metadata"]["annotations"] = {"prometheus.io/scrape": "true", f"{KEY}x/models": "[]"}
    kube.delete("v1", "Pod", NS, A)
    kube.create(obj)
    labeler = await start()
    await labeler.apply(placement({"mnist": [A]}))
    await until(lambda: ours(kube, A) == {"mnist": "loaded"}, "A labeled, stale label gone")
    meta = metadata(kube, A)
    for k, v in others.items():
        if k != f"{KEY}/stale-model":
            assert meta["labels"][k] == v
    assert meta["labels"]["modelmesh-service"] == SERVICE
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["annotations"][f"{KEY}x/models"] == "[]"
    for r in patches(kube, A):
        touched = {
            **r.body["metadata"].get("labels", {}),
            **r.body["metadata"].get("annotations", {}),
        }
        assert all(k.startswith(f"{KEY}/") for k in touched), r.body
        assert r.content_type == "application/merge-patch+json"


async def test_a_pod_that_is_no_live_instance_carries_none_of_our_keys(
    kube: ApiServer, start: Start
) -> None:
    labeler = await start()
    await labeler.apply(placement({"mnist": [A, B]}))
    await until(lambda: ours(kube, B) == {"mnist": "loaded"}, "B labeled")
    # B's pod left etcd (its lease expired): whatever it shows, it is no holder
    await labeler.apply(placement({"mnist": [A]}, pods={A: PODS[A], C: PODS[C]}))
    await until(lambda: ours(kube, B) == {}, "B's labels removed")
    assert f"{KEY}/models" not in (metadata(kube, B).get("annotations") or {})
    assert ours(kube, A) == {"mnist": "loaded"}


async def test_a_pod_with_another_ip_than_its_instance_is_not_labeled(
    kube: ApiServer, start: Start
) -> None:
    labeler = await start()
    moved = {**PODS, A: "10.9.9.9"}  # etcd still has the address of the pod before
    await labeler.apply(placement({"mnist": [A, B]}, pods=moved))
    await until(lambda: ours(kube, B) == {"mnist": "loaded"}, "B labeled")
    await asyncio.sleep(0.3)
    assert ours(kube, A) == {}


async def test_long_and_odd_names_get_the_hashed_form(kube: ApiServer, start: Start) -> None:
    long = "sentiment-analysis-bert-large-uncased-finetuned-on-customer-reviews-2024"
    odd = "team/fraud model"
    labeler = await start()
    await labeler.apply(placement({long: [A], odd: [A], "plain": [A]}))
    want = {label_name(long): "loaded", label_name(odd): "loaded", "plain": "loaded"}
    await until(lambda: ours(kube, A) == want, "A labeled with the hashed forms")
    assert label_name(long) != long and len(label_name(long)) <= 63
    models = json.loads(metadata(kube, A)["annotations"][f"{KEY}/models"])
    assert models["loaded"] == sorted([long, odd, "plain"])


async def test_the_cap_holds_and_the_annotation_still_lists_every_name(
    kube: ApiServer, start: Start
) -> None:
    names = [f"model-{i:02}" for i in range(30)]
    labeler = await start(max_model_labels=10)
    await labeler.apply(placement({n: [A] for n in names}, loading={"zz-first-loading": [A]}))
    want = {n: "loaded" for n in names[:10]} | {"overflow": "true", "model-count": "31"}
    await until(lambda: ours(kube, A) == want, "A carries 10 model labels and the overflow")
    models = json.loads(metadata(kube, A)["annotations"][f"{KEY}/models"])
    assert models == {"loaded": names, "loading": ["zz-first-loading"]}
    assert REGISTRY.get_sample_value("modelxds_labeler_overflowing_pods", {"namespace": NS}) == 1


async def test_a_burst_of_placement_changes_is_one_patch_per_pod_per_interval(
    kube: ApiServer, start: Start
) -> None:
    interval = 0.5
    labeler = await start(patch_interval=interval)
    before = {p: len(patches(kube, p)) for p in PODS}
    began = time.monotonic()
    for i in range(100):  # 100 placement changes in one second
        holders = [A, B, C][: 1 + i % 3]
        await labeler.apply(placement({f"model-{i % 7}": holders, "steady": [A, B, C]}))
        await asyncio.sleep(0.01)
    final = {f"model-{99 % 7}": [A, B, C][: 1 + 99 % 3], "steady": [A, B, C]}
    for p in PODS:
        want = {m: "loaded" for m, holders in final.items() if p in holders}
        await until(partial(carries, kube, p, want), f"{p} carries the final state")
    elapsed = time.monotonic() - began
    await asyncio.sleep(interval * 2)  # nothing more is sent once the pods match
    for p in PODS:
        sent = len(patches(kube, p)) - before[p]
        assert 1 <= sent <= int(elapsed / interval) + 1, (p, sent, elapsed)


async def test_a_conflict_is_retried_and_converges(kube: ApiServer, start: Start) -> None:
    conflicts = counter("modelxds_labeler_patches_total", outcome="conflict")
    kube.inject("PATCH", "pods", 409, times=2)
    labeler = await start()
    await labeler.apply(placement({"mnist": [A]}))
    await until(lambda: ours(kube, A) == {"mnist": "loaded"}, "A labeled after the conflicts")
    statuses = [r.status for r in patches(kube)]
    assert statuses[:2] == [409, 409] and statuses[-1] == 200
    assert counter("modelxds_labeler_patches_total", outcome="conflict") == conflicts + 2


async def test_throttling_waits_for_retry_after(kube: ApiServer, start: Start) -> None:
    kube.inject("PATCH", "pods", 429, times=1, retry_after=2)
    labeler = await start(patch_interval=0.05)
    began = time.monotonic()
    await labeler.apply(placement({"mnist": [A]}, pods={A: PODS[A]}))  # A's the one patch
    await until(lambda: any(r.status == 429 for r in patches(kube)), "the 429")
    await until(lambda: ours(kube, A) == {"mnist": "loaded"}, "A labeled after the pause")
    assert time.monotonic() - began >= 1.9
    assert [r.status for r in patches(kube)].count(429) == 1


async def test_a_pod_that_is_gone_is_skipped(kube: ApiServer, start: Start) -> None:
    labeler = await start()
    await labeler.apply(placement({"mnist": [A, B]}))
    await until(lambda: ours(kube, A) == ours(kube, B) == {"mnist": "loaded"}, "both labeled")
    kube.delete("v1", "Pod", NS, A)
    await until(lambda: A not in labeler.watches[NS].pods, "A's deletion seen")
    sent_to_a = len(patches(kube, A))
    kube.inject("PATCH", "pods", 404, times=1)  # B: deleted between our look and our patch
    await labeler.apply(placement({"iris": [A, B]}))
    await until(lambda: any(r.status == 404 for r in patches(kube)), "the 404")
    await until(lambda: B not in labeler.watches[NS].pods, "B dropped")
    await asyncio.sleep(0.5)  # five patch intervals: a retry would have come
    assert [r.status for r in patches(kube, B)][-1:] == [404]
    assert len(patches(kube, A)) == sent_to_a  # nothing is sent to a deleted pod
    # and the labeler goes on serving the pods that are there
    d = "modelmesh-serving-mlserver-1.x-7c5d8b9f4d-q4r5s"
    kube.create(pod(d, NS, "10.1.0.14"))
    await labeler.apply(placement({"iris": [d]}, pods={**PODS, d: "10.1.0.14"}))
    await until(lambda: ours(kube, d) == {"iris": "loaded"}, "a new pod labeled")


async def test_kubectl_lists_exactly_the_holders(
    kube: ApiServer, start: Start, tmp_path: Path
) -> None:
    labeler = await start()
    await labeler.apply(placement({"mnist": [A, C], "iris": [B]}, loading={"fresh": [B]}))
    await until(lambda: ours(kube, C) == {"mnist": "loaded"}, "C labeled")
    await until(lambda: ours(kube, B) == {"iris": "loaded", "fresh": "loading"}, "B labeled")
    config = kube.kubeconfig(tmp_path / "kubeconfig")

    def kubectl_get(selector: str) -> list[str]:
        out = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(config),
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                selector,
                "-o",
                "name",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return sorted(out.split())

    assert kubectl_get(f"{KEY}/mnist=loaded") == sorted([f"pod/{A}", f"pod/{C}"])
    assert kubectl_get(f"{KEY}/iris=loaded") == [f"pod/{B}"]
    assert kubectl_get(f"{KEY}/fresh=loaded") == []
    assert kubectl_get(f"{KEY}/fresh") == [f"pod/{B}"]


@pytest.fixture
def quiet_kube() -> Iterator[ApiServer]:
    """A stand-in that sends no bookmarks: nothing moves a watch's resourceVersion on."""
    server = ApiServer(bookmark_interval=3600)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_watch_too_old_for_the_server_lists_again_and_follows(
    quiet_kube: ApiServer, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pods_module, "WATCH_TIMEOUT_S", 1)  # each watch resumes within 1 s
    kube = quiet_kube
    kube.create(pod(A, NS, PODS[A]))
    gone = counter("modelxds_labeler_pod_watch_restarts_total", reason="gone")
    labeler = await start(api=kube)
    kube.create(pod("unrelated", "elsewhere", "10.2.0.1"))
    kube.compact()  # the watch's resourceVersion is older than what the server keeps
    await until(
        lambda: counter("modelxds_labeler_pod_watch_restarts_total", reason="gone") > gone,
        "a 410 Gone and a fresh list",
    )
    await labeler.apply(placement({"mnist": [A]}, pods={A: PODS[A]}))
    await until(lambda: ours(kube, A) == {"mnist": "loaded"}, "A labeled after the re-list")
    kube.delete("v1", "Pod", NS, A)  # and the new watch follows
    await until(lambda: A not in labeler.watches[NS].pods, "A's deletion seen")


# --- leader election ------------------------------------------------------------------


def leadership(kube: ApiServer, identity: str) -> Leadership:
    return Leadership(
        kube.api_client(),
        name="modelxds-labeler",
        namespace=NS,
        identity=identity,
        lease_duration=4,
        renew_deadline=3,
        retry_period=1,
    )


@pytest.fixture
def elections() -> Iterator[list[Leadership]]:
    made: list[Leadership] = []
    yield made
    for e in made:
        e.stop()


async def test_two_replicas_never_both_patch(
    kube: ApiServer, start: Start, elections: list[Leadership]
) -> None:
    # Each replica sees a different placement, so each PATCH says who sent it.
    replicas = {}
    for name in ("one", "two"):
        election = leadership(kube, name)
        elections.append(election)
        labeler = await start(may_patch=election.may_patch)
        election.start(labeler.leadership_changed)
        await labeler.apply(placement({f"seen-by-{name}": [A]}))
        replicas[name] = (election, labeler)

    def sender(r: Any) -> str:
        labels = [k for k, v in r.body["metadata"].get("labels", {}).items() if v]
        return str(labels[0]).rsplit("-", 1)[-1] if len(labels) == 1 else f"unclear: {r.body}"

    await until(lambda: any(e.leading for e, _ in replicas.values()), "a leader")
    leader = next(n for n, (e, _) in replicas.items() if e.leading)
    follower = next(n for n in replicas if n != leader)
    await until(lambda: ours(kube, A) == {f"seen-by-{leader}": "loaded"}, "the leader's labels")
    await asyncio.sleep(5)  # longer than the lease: the follower keeps waiting
    assert {sender(r) for r in patches(kube, A)} == {leader}
    assert not replicas[follower][0].leading

    replicas[leader][0].stop()  # hands the Lease back
    sent_by_leader = len(patches(kube, A))
    await until(lambda: ours(kube, A) == {f"seen-by-{follower}": "loaded"}, "the new leader's")
    assert {sender(r) for r in patches(kube, A)[sent_by_leader:]} == {follower}


async def test_a_replica_that_loses_its_lease_stops_patching(
    kube: ApiServer, start: Start, elections: list[Leadership]
) -> None:
    election = leadership(kube, "one")
    elections.append(election)
    labeler = await start(may_patch=election.may_patch)
    election.start(lambda leading: None)
    await until(lambda: election.leading, "leading")
    await labeler.apply(placement({"mnist": [A]}))
    await until(lambda: ours(kube, A) == {"mnist": "loaded"}, "A labeled")

    coordination = client.CoordinationV1Api(kube.api_client())
    lease = coordination.read_namespaced_lease("modelxds-labeler", NS)
    lease.spec.holder_identity = "someone-else"
    lease.spec.lease_duration_seconds = 3600
    coordination.replace_namespaced_lease("modelxds-labeler", NS, lease)
    await until(lambda: not election.may_patch(), "no longer patching", timeout=8)
    sent = len(patches(kube))
    await labeler.apply(placement({"iris": [A]}))
    await asyncio.sleep(1.5)
    assert len(patches(kube)) == sent
    assert ours(kube, A) == {"mnist": "loaded"}
