"""Fault tests: real etcd, modelxds, Envoy and pods, each fault recorded as a row of
docs/reliability.md (tests/reliability/record.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.reliability.record import Row, record

pytestmark = pytest.mark.e2e

# fault, injected, requests, failures, converge_s, lost
Recorder = Callable[..., None]


@pytest.fixture
def fault_row(request: pytest.FixtureRequest) -> Recorder:
    """``fault_row(fault=..., injected=..., requests=..., failures=..., converge_s=...,
    lost=...)`` records this test's row; call it before asserting, so a failed run's
    numbers are on disk to look at (a failed run does not regenerate the doc)."""
    test = request.node.nodeid.removeprefix("tests/reliability/")

    def write(**fields: object) -> None:
        record(Row(test=test, **fields))  # type: ignore[arg-type]

    return write
