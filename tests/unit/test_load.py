"""The load generator: its statistics, and latency counted from the scheduled send time."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from modelxds import cli
from modelxds.bench.load import LoadSpec, go_duration, go_style, parse_duration, result_id, run
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
    assert parse_duration("1m30s") == 90
    assert parse_duration("1h") == 3600
    for bad in ("", "s", "1x", "1m30", "1.2.3s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    # and back as Go prints them, as fortio's RequestedDuration has them
    assert [go_duration(d) for d in (5, 60, 90.5, 0.25, 3725)] == [
        "5s",
        "1m0s",
        "1m30.5s",
        "250ms",
        "1h2m5s",
    ]


def test_flags_as_go_spells_them() -> None:
    assert go_style(["-jitter=False", "--qps", "100", "-grpc=true", "-a", "-t=5s"]) == [
        "-qps",
        "100",
        "-grpc",
        "-a",
        "-t=5s",
    ]
    with pytest.raises(SystemExit):
        go_style(["-jitter=maybe"])


def test_result_ids_are_fortios_file_names() -> None:
    when = datetime.datetime(2026, 12, 2, 4, 3, 26)
    assert result_id(when, "") == "2026-12-02-040326"
    assert result_id(when, "10.0.0.7:8008/v2/models/m/infer , vm") == (
        "2026-12-02-040326_10_0_0_7_8008_v2_models_m_infer_vm"
    )
    assert result_id(when, "--a  b--") == "2026-12-02-040326_a_b"
    assert len(result_id(when, "x" * 200)) == 96


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


async def test_the_seeds_fortio_flags_save_fortios_json_under_fortios_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fortio command line as users paste it, "fortio load" replaced by "modelxds bench
    # load": Go-style boolean, -a (auto-save in the current directory), repeated -H
    monkeypatch.chdir(tmp_path)
    srv, port = await _serve(SlowServer(delay=0.001))
    url = f"http://127.0.0.1:{port}/v2/models/m1/infer"
    argv = ["bench", "load", "-jitter=False", "-c", "1", "-qps", "50", "-t", "400ms", "-a"]
    argv += ["-H", "Content-Type: application/json", "-H", "model: m1"]
    argv += ["-payload", '{"inputs": []}', url]
    async with srv:
        assert await asyncio.to_thread(cli.main, argv) == 0
    (saved,) = tmp_path.iterdir()
    host = socket.gethostname().split(".", 1)[0]
    words = "_".join(re.findall("[A-Za-z0-9]+", host))
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d-\d{{6}}_127_0_0_1_{port}_v2_models_m1_infer_{words}\.json",
        saved.name,
    ), saved.name
    result = json.loads(saved.read_text())
    assert result["ID"] == saved.stem
    assert result["Labels"] == f"127.0.0.1:{port}/v2/models/m1/infer , {host}"
    assert (result["RunType"], result["URL"], result["NumThreads"]) == ("HTTP", url, 1)
    assert (result["RequestedQPS"], result["RequestedDuration"]) == ("50", "400ms")
    assert result["Jitter"] is False
    assert result["RetCodes"] == {"200": 20}
    assert datetime.datetime.fromisoformat(result["StartTime"]).tzinfo is not None
    hist = result["DurationHistogram"]
    assert hist["Count"] == 20 and sum(b["Count"] for b in hist["Data"]) == 20
    assert [p["Percentile"] for p in hist["Percentiles"]] == [50, 75, 90, 99, 99.9]
    assert result["ErrorsDurationHistogram"]["Count"] == 0
    assert "Samples" not in result


async def test_json_and_labels_flags(tmp_path: Path) -> None:
    srv, port = await _serve(SlowServer(delay=0.001))
    out = tmp_path / "run.json"
    argv = ["-qps", "40", "-t", "0.25s", "-c", "2", "-labels", "subsets run 1", "-json", str(out)]
    async with srv:
        code = await asyncio.to_thread(
            cli.main, ["bench", "load", *argv, f"http://127.0.0.1:{port}/"]
        )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["Labels"] == "subsets run 1"
    assert result["ID"].endswith("_subsets_run_1")
    assert result["DurationHistogram"]["Count"] == 10


def test_a_bad_duration_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "load", "-t", "soon", "http://127.0.0.1:1/"])
    assert "not a duration" in str(e.value)
