"""`modelxds serve --kubernetes`: routing rules read from Kubernetes objects program a real
Envoy, and an invalid object is reported in its status while the valid rule keeps routing."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from modelxds.localmesh import processes
from modelxds.localmesh.stack import Stack, pod_host, pod_instance_id, wait_until
from tests.e2e.gwclient import Client
from tests.kube.apiserver import ApiServer
from tests.unit.test_crds import check_custom_object, seed_objects

pytestmark = pytest.mark.e2e

NS = "modelmesh-serving"  # the stack's root prefix maps to it: serve watches it by default
LOADED_LONG_AGO = 1  # epoch ms: a copy whose load started long ago counts as loaded


def _apply(kube_api: ApiServer, obj: dict[str, Any]) -> dict[str, Any]:
    check_custom_object(obj)
    return kube_api.create(copy.deepcopy(obj))


def _conditions(kube_api: ApiServer, kind: str, name: str) -> dict[str, dict[str, Any]]:
    obj = kube_api.get("modelxds.io/v1alpha1", kind, NS, name) or {}
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


async def test_an_invalid_rule_is_reported_and_the_valid_one_keeps_routing(
    tmp_path: Path, kube_api: ApiServer
) -> None:
    gateway_port, pod_port = processes.free_port(), processes.free_port(pod_host(0))
    rule, service = seed_objects()  # the seed's spec, apiVersion modelxds.io/v1alpha1
    service["spec"]["http"][0]["match"] = [{"port": gateway_port}]
    service["spec"]["http"][0]["route"][0]["destination"]["port"] = {"number": pod_port}
    _apply(kube_api, rule)
    _apply(kube_api, service)
    kubeconfig = kube_api.kubeconfig(tmp_path / "kubeconfig")
    stack = Stack(
        tmp_path / "stack",
        gateway_port=gateway_port,
        pod_port=pod_port,
        policy_file=False,
        serve_args=("--kubernetes", "--kubeconfig", str(kubeconfig)),
    )
    await stack.start()  # returns once the gateway listens on the VirtualService's port
    client = Client(stack)
    try:
        holder = pod_instance_id(1)
        await stack.pod(holder)[1].add_copy("model-a", started_ms=LOADED_LONG_AGO)

        async def routed_to_holder() -> bool:
            for _ in range(6):
                if await client.grpc("ignored", [("model", "model-a")]) != holder:
                    return False
            return True

        await wait_until(routed_to_holder, 15, "model-a routed to its holder")
        name = service["metadata"]["name"]
        await wait_until(
            _async(
                lambda: (
                    _conditions(kube_api, "VirtualService", name)["Programmed"]["status"] == "True"
                )
            ),
            10,
            "the VirtualService Programmed",
        )

        # a newer VirtualService claiming the same gateway port for another Service
        other_rule = copy.deepcopy(rule)
        other_rule["metadata"]["name"] = "other"
        other_rule["spec"]["host"] = "other"
        intruder = copy.deepcopy(service)
        intruder["metadata"] = {"name": "intruder", "namespace": NS}
        intruder["spec"]["http"][0]["route"][0]["destination"]["host"] = "other"
        _apply(kube_api, other_rule)
        _apply(kube_api, intruder)

        await wait_until(
            _async(lambda: "Accepted" in _conditions(kube_api, "VirtualService", "intruder")),
            10,
            "the intruder's status",
        )
        accepted = _conditions(kube_api, "VirtualService", "intruder")["Accepted"]
        assert (accepted["status"], accepted["reason"]) == ("False", "Invalid")
        assert f"spec.http[0].match: port {gateway_port} is already routed" in accepted["message"]
        assert f"(VirtualService {NS}/{name})" in accepted["message"]
        assert _conditions(kube_api, "VirtualService", name)["Accepted"]["status"] == "True"
        assert 'modelxds_policy_objects{accepted="false",kind="VirtualService"} 1.0' in (
            stack.metrics()
        )
        for _ in range(20):
            assert await client.grpc("ignored", [("model", "model-a")]) == holder
    finally:
        await client.close()
        await stack.stop()


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run
