"""Fixtures shared by every test: a real etcd, and the Kubernetes API stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from modelxds.localmesh.processes import free_port, start_etcd
from tests.kube.apiserver import ApiServer

CRDS = Path(__file__).resolve().parent.parent / "manifests" / "crds"


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd, one per test module."""
    port = free_port()
    proc = start_etcd(tmp_path_factory.mktemp("etcd"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
def kube_api() -> Iterator[ApiServer]:
    """A running API stand-in that serves every CRD of `manifests/crds/`."""
    server = ApiServer()
    server.start()
    try:
        for path in sorted(CRDS.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    server.add_crd(doc)
        yield server
    finally:
        server.stop()
