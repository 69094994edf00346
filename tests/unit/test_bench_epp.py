"""The endpoint picker's benchmark at a tiny size: its requests are what Envoy sends, its
picker process answers them, and its numbers come out."""

from __future__ import annotations

import asyncio

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from modelxds.bench import epp
from modelxds.epp.exchange import Exchange
from modelxds.epp.pick import Outcome, Picker
from modelxds.epp.server import Pool
from modelxds.policy import default_policy


def test_each_request_kind_is_picked_for_its_model() -> None:
    built, _ = epp.placement(60, 3)
    pool = Pool(default_policy())
    pool.update(built)
    for request in (
        epp.headers_only("model-7", rest=True),
        epp.headers_only("model-7", rest=False),
        epp.in_body("model-7"),
        epp.whole_call("model-7"),
    ):
        exchange = Exchange(pool.current, Picker(epp.TARGET_PORT), pool.headers)
        for stage in request:
            answers = [
                a for m in stage for a in exchange.handle(ep.ProcessingRequest.FromString(m))
            ]
            # one answer a message: the client waits for each
            assert len(answers) == len(stage)
        assert exchange.pick is not None and exchange.pick.outcome is Outcome.HOLDER
    body = ep.ProcessingRequest.FromString(epp.in_body("model-7")[0][1]).request_body
    assert len(body.body) == epp.BODY_BYTES and body.end_of_stream


def test_the_picker_process_answers_the_load_and_reports_its_costs() -> None:
    picker = epp.start_picker(60, 3)
    try:
        for kind in ("headers", "body", "call"):
            (row,) = asyncio.run(
                epp.drive(picker.port, picker.pid, epp.mix(60, kind, n=20), [100], 0.5, 2)
            )
            assert row["errors"] == 0
            assert row["latency"]["n"] == 50
            assert row["picker_rss_mb"] > 0
        histogram = picker.histogram()
        # warm-up (200) and the step (50), each kind
        assert histogram["count"] == 3 * (200 + 50)
    finally:
        picker.stop()
    assert not picker.process.is_alive()


def test_the_threshold_is_the_first_rate_over_it_or_failing() -> None:
    def step(rate: float, p99: float, errors: int = 0) -> dict[str, object]:
        return {"offered_per_s": rate, "errors": errors, "latency": {"p99_ms": p99}}

    assert epp.first_over([step(500, 0.4), step(1000, 0.9)], 1.0) is None
    assert epp.first_over([step(500, 0.4), step(1000, 1.2), step(2000, 0.9)], 1.0) == 1000
    assert epp.first_over([step(500, 0.4, errors=1)], 1.0) == 500


def test_the_profile_times_every_step() -> None:
    row = epp.profile(60, 3, 50)
    assert all(row[f"{k}_us"] > 0 for k in ("parse", "exchange", "serialize", "pick"))
