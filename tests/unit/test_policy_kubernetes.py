"""Routing rules as Kubernetes objects: read one by one (an invalid or colliding object is
left out, deterministically), watched through the real `kubernetes` client against the API
stand-in, served through the real controller, and reported on in their status."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from modelxds.kserve import descriptor_set_bytes
from modelxds.placement.model import Placement
from modelxds.policy import Policy, load_policy, parse_policy, read_objects
from modelxds.policy.kubernetes import (
    API_VERSION,
    GROUP,
    MESSAGE_MAX,
    PLURALS,
    VERSION,
    PolicyWatcher,
    desired_status,
)
from modelxds.policy.model import HttpRetry, OutlierDetection
from modelxds.xds.cache import SnapshotCache
from modelxds.xds.controller import Controller
from modelxds.xds.ir import Options
from modelxds.xds.subset import SubsetStrategy
from tests.kube.apiserver import ApiServer
from tests.unit.test_crds import check_custom_object, seed_objects

NS = "modelmesh-serving"
KEY = "modelmesh.asm.alibabacloud.com"
Doc = dict[str, Any]


def rule(name: str, host: str, *, created: str = "", namespace: str = NS) -> Doc:
    dr = seed_objects()[0]
    dr["metadata"] = {"name": name, "namespace": namespace}
    if created:
        dr["metadata"]["creationTimestamp"] = created
    dr["spec"]["host"] = host
    return dr


def service(
    name: str, host: str, port: int = 8008, *, created: str = "", namespace: str = NS
) -> Doc:
    vs = seed_objects()[1]
    vs["metadata"] = {"name": name, "namespace": namespace}
    if created:
        vs["metadata"]["creationTimestamp"] = created
    vs["spec"]["http"][0]["match"] = [{"port": port}]
    vs["spec"]["http"][0]["route"][0]["destination"]["host"] = host
    return vs


def key_of(obj: Doc) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])


# --- read_objects: one object at a time --------------------------------------------------


def test_the_seeds_objects_read_as_the_seeds_files() -> None:
    policy, problems = read_objects(seed_objects())
    assert problems == {key_of(o): [] for o in seed_objects()}
    assert policy.ports() == (8008,)
    (vs,) = policy.virtual_services
    assert vs.routes[0].header_keys[0].key == KEY
    assert vs.source == f"kubernetes (VirtualService {NS}/vs-modelmesh-serving-service)"


def test_an_invalid_object_is_left_out_and_the_rest_still_route() -> None:
    broken = service("broken", "modelmesh-serving", 9000)
    broken["spec"]["http"][0]["headerToDynamicSubsetKey"][0]["key"] = "not.a.key"
    policy, problems = read_objects([*seed_objects(), broken])
    assert policy.ports() == (8008,)
    assert problems[key_of(broken)] == [
        f"kubernetes (VirtualService {NS}/broken): spec.http[0].headerToDynamicSubsetKey[0].key: "
        f"'not.a.key' is not a subset key of the DestinationRule for "
        f"modelmesh-serving.{NS}.svc.cluster.local (kubernetes (DestinationRule "
        f"{NS}/modelmesh-serving)); its keys: {KEY}"
    ]
    assert all(not problems[key_of(o)] for o in seed_objects())


def test_a_field_error_names_the_object_and_the_field() -> None:
    dr = rule("r", "modelmesh-serving")
    dr["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]["fallbackPolicy"] = (
        "DEFAULT_SUBSET"
    )
    _, problems = read_objects([dr])
    assert problems[key_of(dr)] == [
        f"kubernetes (DestinationRule {NS}/r): spec.trafficPolicy.loadBalancer.dynamicSubset."
        "fallbackPolicy: DEFAULT_SUBSET needs a non-empty "
        "spec.trafficPolicy.loadBalancer.dynamicSubset.defaultSubset"
    ]


def test_a_virtual_service_whose_rule_is_invalid_is_left_out_too() -> None:
    dr, vs = seed_objects()
    del dr["spec"]["host"]
    policy, problems = read_objects([vs, dr])
    assert policy == Policy((), ())
    assert "spec.host: required" in problems[key_of(dr)][0]
    assert "no DestinationRule for 'modelmesh-serving'" in problems[key_of(vs)][0]


def test_outlier_detection_timeout_and_retries_are_read_from_the_objects() -> None:
    dr, vs = seed_objects()
    dr["spec"]["trafficPolicy"]["outlierDetection"] = {
        "consecutive5xxErrors": 3,
        "consecutiveGatewayErrors": 0,
        "interval": "1m30s",
        "baseEjectionTime": "1.5s",
        "maxEjectionPercent": 50,
        "minHealthPercent": 20,
    }
    http = vs["spec"]["http"][0]
    http["timeout"] = "500ms"
    http["retries"] = {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,reset,503"}
    for obj in (dr, vs):
        check_custom_object(obj)  # the API server takes them
    policy, problems = read_objects([dr, vs])
    assert problems == {key_of(dr): [], key_of(vs): []}
    assert policy.destination_rules[0].outlier_detection == OutlierDetection(
        3, 0, 90_000, 1500, 50, 20
    )
    route = policy.virtual_services[0].routes[0]
    assert route.timeout_ms == 500
    assert route.retries == HttpRetry(3, 2000, ("5xx", "reset", "retriable-status-codes"), (503,))
    # as the same documents read from a policy file
    from_file = parse_policy(yaml.safe_dump_all([dr, vs]))
    assert from_file.destination_rules[0].outlier_detection == (
        policy.destination_rules[0].outlier_detection
    )
    assert from_file.virtual_services[0].routes[0] == route


def test_a_retries_error_names_the_object_and_the_field() -> None:
    dr, vs = seed_objects()
    vs["spec"]["http"][0]["retries"] = {"perTryTimeout": "2s"}
    _, problems = read_objects([dr, vs])
    assert problems[key_of(vs)] == [
        f"kubernetes (VirtualService {NS}/vs-modelmesh-serving-service): "
        "spec.http[0].retries.attempts: 0 (or absent) turns retries off; perTryTimeout and "
        "retryOn need attempts of 1 or more"
    ]


def _collision() -> tuple[list[Doc], Doc, Doc]:
    """Two VirtualServices on port 8008 to different Services; `older` is older, though
    its name sorts after the other's."""
    older = service("vs-b", "svc-b", created="2025-01-01T00:00:00Z")
    newer = service("vs-a", "svc-a", created="2025-01-01T00:00:05Z")
    rules = [rule("svc-a", "svc-a"), rule("svc-b", "svc-b")]
    return [*rules, newer, older], older, newer


def test_of_two_colliding_objects_the_older_wins_whatever_the_order() -> None:
    objects, older, newer = _collision()
    outcomes = set()
    for order in itertools.permutations(objects):
        policy, problems = read_objects(order)
        outcomes.add((policy, tuple(sorted((k, tuple(v)) for k, v in problems.items()))))
        assert [vs.name for vs in policy.virtual_services] == ["vs-b"]
        assert problems[key_of(older)] == []
        (problem,) = problems[key_of(newer)]
        assert problem.startswith(f"kubernetes (VirtualService {NS}/vs-a): spec.http[0].match:")
        assert f"port 8008 is already routed to svc-b.{NS}.svc.cluster.local:8033 by " in problem
        assert f"(VirtualService {NS}/vs-b)" in problem
    assert len(outcomes) == 1


def test_objects_created_in_the_same_second_are_ordered_by_namespace_and_name() -> None:
    objects, _, _ = _collision()
    for obj in objects:
        obj["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    policy, _ = read_objects(objects)
    assert [vs.name for vs in policy.virtual_services] == ["vs-a"]


def test_two_routes_to_one_service_with_different_keys_collide() -> None:
    dr = rule("modelmesh-serving", "modelmesh-serving")
    dr["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]["subsetSelectors"].append(
        {"keys": ["other.key"]}
    )
    first = service("first", "modelmesh-serving", 8008, created="2025-01-01T00:00:00Z")
    second = service("second", "modelmesh-serving", 9008, created="2025-01-01T00:00:01Z")
    second["spec"]["http"][0]["headerToDynamicSubsetKey"][0]["key"] = "other.key"
    policy, problems = read_objects([second, first, dr])
    assert policy.ports() == (8008,)
    assert "its pods carry one set of model keys" in problems[key_of(second)][0]


def test_policy_files_win_over_objects(tmp_path: Path) -> None:
    files = tmp_path / "policy.yaml"
    files.write_text(yaml.safe_dump_all(seed_objects()))
    base = load_policy(files)
    same_port = service("mine", "modelmesh-serving", 8008)
    duplicate = seed_objects()[0]
    policy, problems = read_objects([same_port, duplicate], base=base)
    assert policy == base
    assert f"first defined in {files} document 1 (DestinationRule" in problems[key_of(duplicate)][0]
    assert f"by {files} document 2 (VirtualService" in problems[key_of(same_port)][0]


def test_objects_may_route_to_a_rule_from_the_files(tmp_path: Path) -> None:
    files = tmp_path / "rules.yaml"
    files.write_text(yaml.safe_dump(seed_objects()[0]))
    base = load_policy(files, allow_empty=True)
    policy, problems = read_objects([seed_objects()[1]], base=base)
    assert policy.ports() == (8008,)
    assert problems == {key_of(seed_objects()[1]): []}


# --- status -------------------------------------------------------------------------------


def test_a_condition_keeps_its_transition_time_while_its_status_stays() -> None:
    first = desired_status(None, 1, [], False, "waiting", "2025-01-01T00:00:00Z")
    assert [(c["type"], c["status"], c["reason"]) for c in first["conditions"]] == [
        ("Accepted", "True", "Accepted"),
        ("Programmed", "False", "Pending"),
    ]
    later = desired_status(first, 2, [], True, "waiting", "2025-01-01T00:01:00Z")
    accepted, programmed = later["conditions"]
    assert later["observedGeneration"] == 2 and accepted["observedGeneration"] == 2
    assert accepted["lastTransitionTime"] == "2025-01-01T00:00:00Z"  # still True
    assert programmed["lastTransitionTime"] == "2025-01-01T00:01:00Z"  # False -> True
    assert programmed["reason"] == "Programmed"


def test_programmed_stays_for_its_generation_until_this_process_publishes() -> None:
    """A restarted replica (or a second one) does not report Pending what is served."""
    served = desired_status(None, 3, [], True, "waiting", "2025-01-01T00:00:00Z")
    assert desired_status(served, 3, [], False, "waiting", "2025-01-01T00:09:00Z") == served
    edited = desired_status(served, 4, [], False, "waiting", "2025-01-01T00:09:00Z")
    assert edited["conditions"][1]["reason"] == "Pending"
    broken = desired_status(served, 3, ["bad"], False, "waiting", "2025-01-01T00:09:00Z")
    assert broken["conditions"][1]["reason"] == "Invalid"


def test_a_long_message_is_cut_to_what_a_condition_holds() -> None:
    status = desired_status(None, 1, ["x" * 40000], False, "", "2025-01-01T00:00:00Z")
    message = status["conditions"][0]["message"]
    assert len(message) <= MESSAGE_MAX and message.endswith("(truncated)")


# --- the watcher against the API stand-in -----------------------------------------------


class Served:
    """A PolicyWatcher feeding a real Controller, wired as `serve --kubernetes` wires them."""

    def __init__(self, kube_api: ApiServer, *, base: Policy | None = None, **kw: Any) -> None:
        self.controller = Controller(
            lambda: Placement,
            asyncio.Event(),
            base or Policy((), ()),
            SnapshotCache(),
            Options(descriptor_set=descriptor_set_bytes()),
            quiet=0.01,
            max_delay=0.05,
            translator=SubsetStrategy(),
        )
        self.watcher = PolicyWatcher(
            kube_api.api_client(),
            [NS],
            self.controller.set_policy,
            base=base,
            retry_s=0.2,
            **{"watch_seconds": 1, **kw},
        )
        self.controller.on_published = self.watcher.published
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Served:
        async def publish() -> None:
            await self.watcher.ready.wait()
            await self.controller.publish()
            await self.controller.run()

        self.tasks = [asyncio.create_task(self.watcher.run()), asyncio.create_task(publish())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def apply(kube_api: ApiServer, obj: Doc) -> Doc:
    """Create a custom object the API server (strict field validation) would accept."""
    check_custom_object(obj)
    return kube_api.create(copy.deepcopy(obj))


def conditions(kube_api: ApiServer, obj: Doc) -> dict[str, Doc]:
    found = kube_api.get(
        API_VERSION, obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    )
    assert found is not None
    return {c["type"]: c for c in (found.get("status") or {}).get("conditions", [])}


async def until(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def state(kube_api: ApiServer, obj: Doc) -> dict[str, tuple[str, str]]:
    return {t: (c["status"], c["reason"]) for t, c in conditions(kube_api, obj).items()}


GOOD = {"Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed")}


def status_patches(kube_api: ApiServer) -> int:
    return sum(1 for r in kube_api.requests if r.method == "PATCH" and r.path.endswith("/status"))


def custom_objects(kube_api: ApiServer) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_api.api_client())


async def test_a_valid_rule_is_accepted_and_programmed(kube_api: ApiServer, tmp_path: Path) -> None:
    objs = [apply(kube_api, o) for o in seed_objects()]
    async with Served(kube_api) as served:
        await until(lambda: all(state(kube_api, o) == GOOD for o in objs), "both programmed")
        assert served.controller.policy.ports() == (8008,)
        for obj in objs:
            stored = kube_api.get(API_VERSION, obj["kind"], NS, obj["metadata"]["name"])
            assert stored is not None
            assert stored["status"]["observedGeneration"] == stored["metadata"]["generation"]
            assert all(c["observedGeneration"] == 1 for c in stored["status"]["conditions"])
            check_custom_object(stored)  # the status fits the CRD's status schema
    out = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(kube_api.kubeconfig(tmp_path / "kubeconfig")),
            "get",
            "mvs",
            "-n",
            NS,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[:6] == ["NAME", "HOSTS", "GATEWAYS", "ACCEPTED", "PROGRAMMED", "AGE"]
    assert row.split()[0] == "vs-modelmesh-serving-service" and row.split()[3:5] == ["True", "True"]


async def test_an_invalid_object_says_what_is_wrong_and_the_valid_ones_keep_routing(
    kube_api: ApiServer,
) -> None:
    objs = [apply(kube_api, o) for o in seed_objects()]
    async with Served(kube_api) as served:
        await until(lambda: all(state(kube_api, o) == GOOD for o in objs), "both programmed")
        broken = service("broken", "modelmesh-serving", 9008)
        broken["spec"]["http"][0]["headerToDynamicSubsetKey"][0]["key"] = "not.a.key"
        apply(kube_api, broken)
        await until(lambda: "Accepted" in conditions(kube_api, broken), "status of the broken one")
        accepted = conditions(kube_api, broken)["Accepted"]
        assert (accepted["status"], accepted["reason"]) == ("False", "Invalid")
        assert "spec.http[0].headerToDynamicSubsetKey[0].key: 'not.a.key'" in accepted["message"]
        assert state(kube_api, broken)["Programmed"] == ("False", "Invalid")
        assert served.controller.policy.ports() == (8008,)
        assert all(state(kube_api, o) == GOOD for o in objs)


async def test_an_edit_applies_without_restart(kube_api: ApiServer) -> None:
    _dr, vs = (apply(kube_api, o) for o in seed_objects())
    async with Served(kube_api) as served:
        await until(lambda: state(kube_api, vs) == GOOD, "programmed")
        api = custom_objects(kube_api)
        patch = {
            "spec": {"http": [{**seed_objects()[1]["spec"]["http"][0], "match": [{"port": 9008}]}]}
        }
        await asyncio.to_thread(
            api.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURALS["VirtualService"],
            vs["metadata"]["name"],
            patch,
        )
        await until(lambda: served.controller.policy.ports() == (9008,), "the new port served")

        def programmed_again() -> bool:
            c = conditions(kube_api, vs).get("Programmed", {})
            return c.get("status") == "True" and c.get("observedGeneration") == 2

        await until(programmed_again, "generation 2 programmed")


async def test_a_watch_that_expired_relists_and_sees_what_it_missed(kube_api: ApiServer) -> None:
    _dr, vs = (apply(kube_api, o) for o in seed_objects())
    async with Served(kube_api) as served:
        await until(lambda: state(kube_api, vs) == GOOD, "programmed")
        # keep the VirtualService watch down while a change happens and history is dropped
        kube_api.inject("GET", "virtualservices", 500, times=3)
        await until(
            lambda: any(r.status == 500 and "virtualservices" in r.path for r in kube_api.requests),
            "the watch failing",
        )
        lists_before = _lists(kube_api)
        moved = service("vs-modelmesh-serving-service", "modelmesh-serving", 9008)
        current = kube_api.get(API_VERSION, "VirtualService", NS, vs["metadata"]["name"])
        assert current is not None
        moved["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await asyncio.to_thread(
            custom_objects(kube_api).replace_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURALS["VirtualService"],
            vs["metadata"]["name"],
            moved,
        )
        kube_api.compact()
        await until(lambda: served.controller.policy.ports() == (9008,), "the change seen", 20)
        assert _lists(kube_api) > lists_before  # it re-listed


async def test_bookmarks_keep_the_watch_resumable_while_nothing_changes(
    kube_api: ApiServer,
) -> None:
    _dr, vs = (apply(kube_api, o) for o in seed_objects())
    async with Served(kube_api, watch_seconds=3):
        await until(lambda: state(kube_api, vs) == GOOD, "programmed")
        for i in range(5):  # writes the VirtualService watch does not show
            kube_api.create(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"n{i}"}}
            )
        await asyncio.sleep(1.5)  # a bookmark carries the newer version
        lists = _lists(kube_api)
        kube_api.compact()
        await asyncio.sleep(4)  # the watch is renewed from the bookmark's version
        assert _lists(kube_api) == lists  # no 410, no re-list


def _lists(kube_api: ApiServer) -> int:
    return sum(
        1
        for r in kube_api.requests
        if r.method == "GET"
        and r.path.endswith("/virtualservices")
        and "watch" not in r.query
        and r.status == 200
    )


async def test_colliding_objects_one_accepted_the_same_after_a_restart(
    kube_api: ApiServer,
) -> None:
    apply(kube_api, rule("svc-a", "svc-a"))
    apply(kube_api, rule("svc-b", "svc-b"))
    older = apply(kube_api, service("vs-b", "svc-b"))
    await asyncio.sleep(1.1)  # creationTimestamp counts seconds
    newer = apply(kube_api, service("vs-a", "svc-a"))
    async with Served(kube_api):
        await until(lambda: state(kube_api, older) == GOOD, "the older one programmed")
        await until(lambda: "Accepted" in conditions(kube_api, newer), "the newer one's status")
        message = conditions(kube_api, newer)["Accepted"]["message"]
        assert "port 8008 is already routed" in message and f"VirtualService {NS}/vs-b" in message
        assert state(kube_api, newer) == {
            "Accepted": ("False", "Invalid"),
            "Programmed": ("False", "Invalid"),
        }
    written = status_patches(kube_api)
    async with Served(kube_api) as again:
        await until(lambda: again.controller.policy.ports() == (8008,), "served again")
        await asyncio.sleep(0.5)
        assert [v.name for v in again.controller.policy.virtual_services] == ["vs-b"]
    assert status_patches(kube_api) == written  # nothing changed, nothing written


async def test_a_status_is_written_only_when_it_changes(kube_api: ApiServer) -> None:
    objs = [apply(kube_api, o) for o in seed_objects()]
    async with Served(kube_api):
        await until(lambda: all(state(kube_api, o) == GOOD for o in objs), "both programmed")
        await asyncio.sleep(0.3)
        written = status_patches(kube_api)
        # a label is not part of the rule: the object changes, its status does not
        await asyncio.to_thread(
            custom_objects(kube_api).patch_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURALS["DestinationRule"],
            objs[0]["metadata"]["name"],
            {"metadata": {"labels": {"team": "ml"}}},
        )
        await asyncio.sleep(0.5)
        assert status_patches(kube_api) == written


async def test_deleting_the_last_route_keeps_the_gateways_as_they_were(
    kube_api: ApiServer,
) -> None:
    dr, vs = (apply(kube_api, o) for o in seed_objects())
    async with Served(kube_api) as served:
        await until(lambda: state(kube_api, vs) == GOOD, "programmed")
        handed = served.controller.policy
        kube_api.delete(API_VERSION, "VirtualService", NS, vs["metadata"]["name"])
        await asyncio.sleep(0.5)
        assert served.controller.policy is handed
        assert state(kube_api, dr) == GOOD


async def test_with_allow_empty_policy_deleting_the_last_route_applies(
    kube_api: ApiServer,
) -> None:
    _dr, vs = (apply(kube_api, o) for o in seed_objects())
    async with Served(kube_api, allow_empty=True) as served:
        await until(lambda: state(kube_api, vs) == GOOD, "programmed")
        kube_api.delete(API_VERSION, "VirtualService", NS, vs["metadata"]["name"])
        await until(lambda: served.controller.policy.ports() == (), "no port routed")


async def test_a_failed_status_write_is_retried(kube_api: ApiServer) -> None:
    kube_api.inject("PATCH", "virtualservices", 500, times=2, subresource="status")
    _dr, vs = (apply(kube_api, o) for o in seed_objects())
    async with Served(kube_api):
        await until(lambda: state(kube_api, vs) == GOOD, "programmed after the failures")


def test_serve_without_a_usable_kubeconfig_says_which_and_exits(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kubeconfig"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelxds.cli",
            "serve",
            "--kubernetes",
            "--kubeconfig",
            str(missing),
            "--metrics-address",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"cannot configure a Kubernetes client ({missing})" in out.stderr


async def test_policy_files_read_again_are_served_with_the_objects(
    kube_api: ApiServer, tmp_path: Path
) -> None:
    """SIGHUP with --kubernetes: the new files join the objects."""
    files = tmp_path / "rules.yaml"
    files.write_text(yaml.safe_dump(seed_objects()[0]))
    vs = apply(kube_api, seed_objects()[1])
    async with Served(kube_api, base=load_policy(files, allow_empty=True)) as served:
        await until(lambda: state(kube_api, vs) == GOOD, "routed through the files' rule")
        changed = seed_objects()[0]
        changed["spec"]["trafficPolicy"]["loadBalancer"]["dynamicSubset"]["fallbackPolicy"] = (
            "NO_FALLBACK"
        )
        files.write_text(yaml.safe_dump(changed))
        served.watcher.set_base(load_policy(files, allow_empty=True))
        await until(
            lambda: (
                served.controller.policy.destination_rules[0].fallback_policy.value == "NO_FALLBACK"
            ),
            "the new files served",
        )
        assert served.controller.policy.ports() == (8008,)
