"""Fixtures shared by every test: the Kubernetes API stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.kube.apiserver import ApiServer

CRDS = Path(__file__).resolve().parent.parent / "manifests" / "crds"


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
