"""`modelxds label` end to end: ModelMesh records in a real etcd, the labeler as its own
process (leader-elected, kubeconfig), pods in the Kubernetes API stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aetcd
import pytest
import pytest_asyncio

from modelxds.modelmesh import Layout, VModelRecord
from modelxds.modelmesh.registrar import PodRegistration, etcd_client, now_ms, put_vmodel
from tests.kube.apiserver import ApiServer, pod

pytestmark = pytest.mark.e2e

NS = "modelmesh-serving"
KEY = "modelmesh.asm.alibabacloud.com"
A = "modelmesh-serving-mlserver-1.x-7c5d8b9f4d-x2kzq"
B = "modelmesh-serving-mlserver-1.x-7c5d8b9f4d-b7wlp"
IPS = {A: "10.1.0.11", B: "10.1.0.12"}
LONG_AGO = now_ms() - 600_000  # a load that started long ago: loaded
DEADLINE_S = 20.0


@pytest_asyncio.fixture
async def etcd(etcd_url: str) -> AsyncIterator[aetcd.Client]:
    c = etcd_client(etcd_url)
    await c.connect()
    try:
        yield c
    finally:
        await c.close()


@contextlib.contextmanager
def labeler(
    etcd_url: str, layout: Layout, kubeconfig: Path, log: Path, *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "POD_NAME": "labeler-0", "POD_NAMESPACE": NS}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelxds.cli",
                "label",
                "--etcd",
                etcd_url,
                "--root-prefix",
                layout.root_prefix,
                "--kubeconfig",
                str(kubeconfig),
                "--patch-interval-ms",
                "200",
                "--loaded-after-ms",
                "1000",
                "--metrics-address",
                "",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ours(kube: ApiServer, name: str) -> dict[str, str]:
    obj = kube.get("v1", "Pod", NS, name)
    assert obj is not None
    labels = obj["metadata"].get("labels") or {}
    return {k[len(KEY) + 1 :]: v for k, v in labels.items() if k.startswith(f"{KEY}/")}


async def until(check: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S}s: {what}\n{log.read_text()[-3000:]}")
        await asyncio.sleep(0.05)


async def test_the_labeler_follows_modelmesh_placement_in_etcd(
    etcd_url: str, etcd: aetcd.Client, kube_api: ApiServer, tmp_path: Path
) -> None:
    layout = Layout(f"test-{uuid.uuid4().hex[:10]}")
    for name, ip in IPS.items():
        kube_api.create(pod(name, NS, ip, {"app": "model-serving"}))
    a = PodRegistration(etcd, layout, A[-12:], IPS[A])
    b = PodRegistration(etcd, layout, B[-12:], IPS[B])
    log = tmp_path / "label.log"
    with labeler(etcd_url, layout, kube_api.kubeconfig(tmp_path / "kubeconfig"), log) as proc:
        try:
            await a.register()
            await b.register()
            await a.add_copy("mnist__isvc-6b2eb0b8bf", LONG_AGO)
            await b.add_copy("iris__isvc-0c1d2e3f4a", LONG_AGO)
            await put_vmodel(
                etcd,
                layout,
                "mnist",
                VModelRecord(
                    active_model="mnist__isvc-6b2eb0b8bf", target_model="mnist__isvc-6b2eb0b8bf"
                ),
            )
            await until(
                lambda: (
                    ours(kube_api, A) == {"mnist": "loaded", "mnist__isvc-6b2eb0b8bf": "loaded"}
                ),
                "A labeled with the InferenceService and its model",
                log,
            )
            await until(
                lambda: ours(kube_api, B) == {"iris__isvc-0c1d2e3f4a": "loaded"}, "B labeled", log
            )

            await b.add_copy("mnist__isvc-6b2eb0b8bf")  # a second copy, loading for 1 s
            await until(
                lambda: ours(kube_api, B).get("mnist__isvc-6b2eb0b8bf") == "loaded",
                "B's new copy counted loaded by the clock",
                log,
            )
            await a.remove_copy("mnist__isvc-6b2eb0b8bf")  # A evicts it
            await until(lambda: ours(kube_api, A) == {}, "A's labels removed", log)
            await b.stop()  # B's pod leaves etcd: its lease is gone
            await until(lambda: ours(kube_api, B) == {}, "B no longer labeled", log)
            lease = kube_api.get("coordination.k8s.io/v1", "Lease", NS, "modelxds-labeler")
            assert lease is not None and lease["spec"]["holderIdentity"] == "labeler-0"
        finally:
            await a.stop()
            with contextlib.suppress(Exception):
                await b.stop()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    lease = kube_api.get("coordination.k8s.io/v1", "Lease", NS, "modelxds-labeler")
    assert lease is not None and not lease["spec"].get("holderIdentity")  # handed back


def test_a_subset_key_that_cannot_prefix_a_label_stops_the_start(
    etcd_url: str, kube_api: ApiServer, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        """apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: modelmesh-serving, namespace: modelmesh-serving}
spec:
  host: modelmesh-serving
  trafficPolicy:
    loadBalancer:
      dynamicSubset:
        subsetSelectors:
        - keys: [Model_Key]
"""
    )
    log = tmp_path / "label.log"
    with labeler(
        etcd_url,
        Layout("unused"),
        kube_api.kubeconfig(tmp_path / "kubeconfig"),
        log,
        "--policy",
        str(policy),
    ) as proc:
        assert proc.wait(timeout=30) == 2
    assert "subset key 'Model_Key' cannot prefix a Kubernetes label" in log.read_text()
