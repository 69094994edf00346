"""`modelxds inspect` against a real Envoy, for both strategies: it names exactly the pods
a model's requests land on, and it reports drift from etcd while the gateway is cut off
from `modelxds serve` (keeping its last config), until serve is back."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from modelxds.localmesh.stack import Stack, pod_instance_id, wait_until
from modelxds.modelmesh.records import VModelRecord
from modelxds.modelmesh.registrar import put_vmodel
from tests.e2e.gwclient import Client

pytestmark = pytest.mark.e2e

POD0, POD1, POD2 = (pod_instance_id(i) for i in range(3))
LOADED_LONG_AGO = 1  # epoch ms: a copy whose load started long ago counts as loaded


async def inspect(stack: Stack, *args: str, etcd: bool = True) -> tuple[int, dict[str, Any]]:
    """``modelxds inspect --json`` as a user runs it: exit code and output."""
    flags = [
        *("--etcd", stack.etcd_url, "--root-prefix", stack.layout.root_prefix),
        *("--service-name", stack.layout.service_name),
        *("--policy", str(stack.workdir / "policy.yaml")),
    ]
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "modelxds.cli", "inspect", "--admin", f"http://{stack.admin}"),
        *("--json", *args, *(flags if etcd else [])),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode in (0, 1), err.decode()
    return proc.returncode, json.loads(out)


def holders(doc: dict[str, Any], name: str) -> dict[str, set[str]]:
    """Protocol -> the pods inspect says Envoy sends ``name`` to."""
    return {r["protocol"]: {p["instance"] for p in r["names"][name]} for r in doc["routes"]}


def drifted(doc: dict[str, Any]) -> set[tuple[str, str, bool]]:
    return {(d["name"], d["pod"], d["in_etcd"]) for d in doc["drift"]}


async def place(stack: Stack) -> None:
    """m-a on pods 0 and 1, m-b on pod 2, InferenceService isvc-a serving m-a."""
    await stack.pod(POD0)[1].add_copy("m-a", started_ms=LOADED_LONG_AGO)
    await stack.pod(POD1)[1].add_copy("m-a", started_ms=LOADED_LONG_AGO)
    await stack.pod(POD2)[1].add_copy("m-b", started_ms=LOADED_LONG_AGO)
    record = VModelRecord(owner="isvc", active_model="m-a", target_model="m-a")
    await put_vmodel(stack.etcd, stack.layout, "isvc-a", record)

    async def synced() -> bool:
        code, doc = await inspect(stack)
        return code == 0 and "isvc-a" in doc["routes"][0]["names"]

    await wait_until(synced, 30, "the gateway routing what etcd holds")


async def test_inspect_model_lists_exactly_the_pods_that_answer(
    stack: Stack, client: Client
) -> None:
    await place(stack)
    for name, pods in [("m-a", {POD0, POD1}), ("isvc-a", {POD0, POD1}), ("m-b", {POD2})]:
        code, doc = await inspect(stack, "--model", name, etcd=False)
        assert code == 0 and "drift" not in doc
        assert holders(doc, name) == {"grpc": pods, "rest": pods}
        # 20 requests over at most 2 holders reach each of them but for 2 in a million
        answered = {await client.grpc("x", [("model", name)]) for _ in range(20)}
        assert answered == pods
    code, doc = await inspect(stack, "--model", "nobody-has-it")
    assert code == 0 and doc["drift"] == []
    assert holders(doc, "nobody-has-it") == {"grpc": set(), "rest": set()}
    assert {r["fallback"]["policy"] for r in doc["routes"]} == {"ANY_ENDPOINT"}
    assert {len(r["fallback"]["pods"]) for r in doc["routes"]} == {3}


async def test_drift_shows_while_the_gateway_is_cut_off_and_clears_after(stack: Stack) -> None:
    await place(stack)
    stack.stop_serve()
    # m-a moves from pod 1 to pod 2; the gateway keeps its last config
    await stack.pod(POD2)[1].add_copy("m-a", started_ms=LOADED_LONG_AGO)
    await stack.pod(POD1)[1].remove_copy("m-a")
    code, doc = await inspect(stack)
    assert code == 1
    assert drifted(doc) == {
        (name, pod, in_etcd)
        for name in ("m-a", "isvc-a")
        for pod, in_etcd in ((POD2, True), (POD1, False))
    }
    assert {d["protocol"] for d in doc["drift"]} == {"grpc", "rest"}
    code, one = await inspect(stack, "--model", "m-b")
    assert code == 0 and one["drift"] == []

    await stack.start_serve()

    async def cleared() -> bool:
        return (await inspect(stack))[0] == 0

    await wait_until(cleared, 90, "the gateway back in sync with etcd")
    code, doc = await inspect(stack, "--model", "m-a")
    assert holders(doc, "m-a") == {"grpc": {POD0, POD2}, "rest": {POD0, POD2}}
