"""Convergence is observed once per version, when the last gateway connected at its
publication takes it; a rejection or a departure is counted instead."""

from __future__ import annotations

from types import MappingProxyType

from prometheus_client import REGISTRY

from modelxds.xds.cache import TypeSnapshot
from modelxds.xds.convergence import Convergence
from modelxds.xds.resources import CLUSTER, ENDPOINT, PUSH_ORDER


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def observed() -> float:
    return REGISTRY.get_sample_value("modelxds_xds_convergence_seconds_count") or 0.0


def total() -> float:
    return REGISTRY.get_sample_value("modelxds_xds_convergence_seconds_sum") or 0.0


def unobserved(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "modelxds_xds_convergence_unobserved_total", {"reason": reason}
    )
    return value or 0.0


def config(
    before: MappingProxyType[str, TypeSnapshot] | None, changed_at: float | None, **versions: str
) -> MappingProxyType[str, TypeSnapshot]:
    """``before`` with the types named by short name (cds, eds) at new versions."""
    types = dict(before or {t: TypeSnapshot(t, "", {}) for t in PUSH_ORDER})
    for short, version in versions.items():
        t = {"cds": CLUSTER, "eds": ENDPOINT}[short]
        types[t] = TypeSnapshot(t, version, {}, changed_at=changed_at)
    return MappingProxyType(types)


BOTH = {1: {CLUSTER, ENDPOINT}, 2: {CLUSTER, ENDPOINT}}


def test_a_version_counts_once_every_gateway_took_it_or_a_later_one() -> None:
    clock = Clock()
    conv = Convergence(clock=clock)
    start = observed(), total()
    v1 = config(None, 99.0, cds="c1", eds="e1")
    conv.published(v1, BOTH)
    v2 = config(v1, 99.5, eds="e2")
    conv.published(v2, BOTH)
    clock.now = 101.0
    for stream in (1, 2):
        conv.acked(stream, CLUSTER, "c1")
    conv.acked(1, ENDPOINT, "e2")
    assert observed() == start[0]  # gateway 2 has yet to take any endpoints
    conv.acked(2, ENDPOINT, "e2")  # skipping e1: e2 contains its change too
    assert observed() == start[0] + 2
    assert total() - start[1] == (101.0 - 99.0) + (101.0 - 99.5)
    conv.acked(2, ENDPOINT, "e2")  # an ACK again observes nothing again
    assert observed() == start[0] + 2


def test_a_rejected_version_and_a_gateway_leaving_are_counted_not_observed() -> None:
    conv = Convergence(clock=Clock())
    start = observed(), unobserved("nacked"), unobserved("disconnected")
    v1 = config(None, 99.0, cds="c1")
    conv.published(v1, BOTH)
    conv.nacked(1, CLUSTER, "c1")
    conv.acked(2, CLUSTER, "c1")
    v2 = config(v1, 99.0, cds="c2")
    conv.published(v2, BOTH)
    conv.acked(1, CLUSTER, "c2")
    conv.disconnected(2)
    assert observed() == start[0]
    assert unobserved("nacked") == start[1] + 1
    assert unobserved("disconnected") == start[2] + 1


def test_a_version_without_an_etcd_change_or_without_gateways_is_not_observed() -> None:
    conv = Convergence(clock=Clock())
    start = observed(), unobserved("no_gateways")
    v1 = config(None, None, cds="c1")  # a policy change, a copy loaded by the clock
    conv.published(v1, BOTH)
    conv.acked(1, CLUSTER, "c1")
    conv.acked(2, CLUSTER, "c1")
    conv.published(config(v1, 99.0, cds="c2"), {})
    assert observed() == start[0]
    assert unobserved("no_gateways") == start[1] + 1
