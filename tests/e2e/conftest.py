"""End-to-end fixtures: a real etcd, `modelxds serve`, a real Envoy and sample pods."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from modelxds.localmesh.stack import Stack
from tests.e2e.gwclient import Client

pytestmark = pytest.mark.e2e


@pytest_asyncio.fixture(params=["subset", "scale"])
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """The whole stack, once per gateway strategy (``modelxds serve --strategy``)."""
    s = Stack(tmp_path / "stack", serve_args=("--strategy", request.param))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest_asyncio.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    c = Client(stack)
    try:
        yield c
    finally:
        await c.close()
