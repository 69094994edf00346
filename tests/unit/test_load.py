"""The load generator: its statistics, and latency counted from the scheduled send time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from modelxds.bench.load import LoadSpec, parse_duration, run
from modelxds.bench.stats import (
    duration_histogram,
    histogram,
    percentile,
    percentiles_ms,
    summary_line,
)
from modelxds.localmesh.processes import free_port
from modelxds.localmesh.sample import SampleBackend


def test_percentiles_of_known_inputs() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0) == 1
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99.9) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of samples does not matter
    with pytest.raises(ValueError):
        percentile([], 50)


def test_histogram_counts_every_sample_once() -> None:
    values = [0.001] * 50 + [0.010] * 40 + [0.100] * 10
    buckets = histogram(values)
    assert sum(b["Count"] for b in buckets) == 100
    assert buckets[-1]["Percent"] == 100
    assert [b["Count"] for b in buckets] == [50, 40, 10]
    h = duration_histogram(values)
    assert (h["Count"], h["Min"], h["Max"]) == (100, 0.001, 0.100)
    assert h["Avg"] == pytest.approx((0.05 + 0.4 + 1.0) / 100)
    assert [p["Percentile"] for p in h["Percentiles"]] == [50, 75, 90, 99, 99.9]


def test_summary_line_reads_like_fortio() -> None:
    result = {
        "ActualQPS": 99.5,
        "RetCodes": {"200": 3},
        "DurationHistogram": duration_histogram([0.001, 0.002, 0.003]),
    }
    line = summary_line(result)
    assert line.startswith("3 requests, 99.5 qps")
    assert "p50 2.000" in line and "max 3.000" in line and "200: 3" in line


def test_durations_in_fortio_notation() -> None:
    assert parse_duration("60s") == 60
    assert parse_duration("1m") == 60
    assert parse_duration("250ms") == 0.25
    assert parse_duration("3") == 3


class SlowServer:
    """HTTP/1.1 keep-alive server; answers after ``delay``, once stalling ``stall``."""

    def __init__(self, delay: float, stall: float = 0.0) -> None:
        self.delay, self.stall, self.requests = delay, stall, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            self.requests += 1
            await asyncio.sleep(self.stall if self.requests == 5 else self.delay)
            body = json.dumps({"ok": True}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()


async def _serve(server: SlowServer) -> tuple[asyncio.Server, int]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def test_fixed_qps_and_connections_send_the_scheduled_count() -> None:
    srv, port = await _serve(SlowServer(delay=0.001))
    async with srv:
        result = await run(
            LoadSpec(
                url=f"http://127.0.0.1:{port}/v2/models/{{model}}/infer",
                qps=40,
                connections=2,
                duration=1.0,
                payload=b"{}",
                models=["a", "b"],
            )
        )
    # 40 qps for 1 s, one request every 50 ms per connection, staggered: exactly 40 scheduled
    assert result["DurationHistogram"]["Count"] == 40
    assert result["RetCodes"] == {"200": 40}


async def test_a_stall_delays_the_requests_scheduled_behind_it() -> None:
    # 20 qps on one connection; request 5 takes 0.5 s, so the ~9 requests scheduled
    # during the stall wait too. A closed loop would report one slow request; counting
    # from the scheduled send time reports all of them.
    srv, port = await _serve(SlowServer(delay=0.001, stall=0.5))
    async with srv:
        result = await run(
            LoadSpec(url=f"http://127.0.0.1:{port}/", qps=20, connections=1, duration=2.0)
        )
    latencies = sorted(p["Value"] for p in result["DurationHistogram"]["Percentiles"])
    slow = [b for b in result["DurationHistogram"]["Data"] if b["Start"] >= 0.05]
    assert sum(b["Count"] for b in slow) >= 8
    assert latencies[-1] >= 0.35  # p99.9 reflects the stall


@pytest_asyncio.fixture
async def pod() -> AsyncIterator[SampleBackend]:
    backend = SampleBackend("127.0.0.11", free_port("127.0.0.11"), "7dd689-load0")
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop(0)


async def test_grpc_load_reaches_the_pod_with_headers_and_models(pod: SampleBackend) -> None:
    result = await run(
        LoadSpec(
            url=pod.address,
            grpc=True,
            qps=50,
            connections=2,
            duration=0.5,
            headers=[("model", "{model}")],
            payload=b'{"model_name": "{model}"}',
            models=["m1", "m2"],
        )
    )
    assert result["RetCodes"] == {"OK": 25}
    assert set(pod.served) == {"m1", "m2"} and sum(pod.served.values()) == 25


def test_a_fortio_json_result_reads_like_ours() -> None:
    # the fields `bench compare --tool fortio` reads from `fortio load -json`
    fortio = {
        "ActualQPS": 99.98,
        "RetCodes": {"200": 6000},
        "DurationHistogram": {
            "Count": 6000,
            "Min": 0.0009,
            "Max": 0.0213,
            "Avg": 0.0014,
            "Sum": 8.4,
            "Percentiles": [
                {"Percentile": 50, "Value": 0.00121},
                {"Percentile": 75, "Value": 0.00135},
                {"Percentile": 90, "Value": 0.00162},
                {"Percentile": 99, "Value": 0.0041},
                {"Percentile": 99.9, "Value": 0.0118},
            ],
        },
    }
    assert percentiles_ms(fortio) == {
        "p50": 1.21,
        "p75": 1.35,
        "p90": 1.62,
        "p99": 4.1,
        "p99.9": 11.8,
    }
    assert summary_line(fortio).startswith("6000 requests, 100.0 qps")
