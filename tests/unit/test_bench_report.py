"""`bench report`: saved results (fortio's and ours) drawn as fortio's percentile plot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from modelxds.bench import report
from modelxds.bench.load import main as load_main
from tests.unit.test_load import SlowServer, _serve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# the shape `fortio load -json` writes (fortio 1.x: stats.HistogramData buckets with
# Start = Min in the first bucket and End = Max in the last)
FORTIO_RESULT: dict[str, Any] = {
    "RunType": "HTTP",
    "Labels": "10.0.0.7:8008/v2/models/sklearn-mnist/infer , fortio-pod",
    "StartTime": "2026-11-30T10:15:04.123456789Z",
    "RequestedQPS": "100",
    "RequestedDuration": "1m0s",
    "ActualQPS": 99.98,
    "ActualDuration": 60012345678,
    "NumThreads": 1,
    "Version": "1.69.1",
    "DurationHistogram": {
        "Count": 6000,
        "Min": 0.0009,
        "Max": 0.0213,
        "Sum": 8.4,
        "Avg": 0.0014,
        "StdDev": 0.0006,
        "Data": [
            {"Start": 0.0009, "End": 0.001, "Percent": 10.0, "Count": 600},
            {"Start": 0.001, "End": 0.0012, "Percent": 55.0, "Count": 2700},
            {"Start": 0.0012, "End": 0.0014, "Percent": 80.0, "Count": 1500},
            {"Start": 0.0014, "End": 0.0016, "Percent": 90.0, "Count": 600},
            {"Start": 0.0016, "End": 0.002, "Percent": 97.0, "Count": 420},
            {"Start": 0.004, "End": 0.005, "Percent": 99.5, "Count": 150},
            {"Start": 0.01, "End": 0.0213, "Percent": 100.0, "Count": 30},
        ],
        "Percentiles": [
            {"Percentile": 50, "Value": 0.00118},
            {"Percentile": 75, "Value": 0.00136},
            {"Percentile": 90, "Value": 0.0016},
            {"Percentile": 99, "Value": 0.0048},
            {"Percentile": 99.9, "Value": 0.0121},
        ],
    },
    "RetCodes": {"200": 6000},
    "URL": "http://10.0.0.7:8008/v2/models/sklearn-mnist/infer",
    "ID": "2026-11-30-101504_10_0_0_7_8008_v2_models_sklearn_mnist_infer_fortio_pod",
}


async def _ours(tmp_path: Path) -> Path:
    """A result saved by `bench load -json`, from a real run against a local server."""
    srv, port = await _serve(SlowServer(delay=0.002))
    out = tmp_path / "ours.json"
    argv = ["-qps", "100", "-c", "1", "-t", "1s", "-labels", "modelxds subsets", "-json", str(out)]
    async with srv:
        assert await asyncio.to_thread(load_main, [*argv, f"http://127.0.0.1:{port}/"]) == 0
    return out


def _pairs(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(round(x, 9), round(y, 9)) for x, y in points]


async def test_fortios_and_our_results_drawn_with_their_percentiles(tmp_path: Path) -> None:
    fortio = tmp_path / "fortio.json"
    fortio.write_text(json.dumps(FORTIO_RESULT))
    ours = await _ours(tmp_path)
    png = tmp_path / "out" / "latency.png"

    assert report.main([str(fortio), str(ours), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC

    results = [(p.stem, report.load(p)) for p in (fortio, ours)]
    plotted = report.draw(results, tmp_path / "again.png")
    assert [s.label for s in plotted] == [FORTIO_RESULT["Labels"], "modelxds subsets"]
    for s, (_, result) in zip(plotted, results, strict=True):
        hist = result["DurationHistogram"]
        # the marked percentiles are the result's own numbers, in ms
        assert _pairs(s.percentiles) == _pairs(
            [(p["Value"] * 1000, p["Percentile"]) for p in hist["Percentiles"]]
        )
        # the line climbs from 1/N at the fastest bucket to 100 % at the slowest
        xs, ys = [x for x, _ in s.curve], [y for _, y in s.curve]
        assert xs == sorted(xs) and ys == sorted(ys)
        assert s.curve[0] == pytest.approx((hist["Data"][0]["Start"] * 1000, 100 / hist["Count"]))
        assert s.curve[-1] == pytest.approx((hist["Data"][-1]["End"] * 1000, 100.0))
        # every bucket's cumulative percent is on the line at the bucket's end
        for b in hist["Data"]:
            assert (round(b["End"] * 1000, 9), round(b["Percent"], 9)) in _pairs(s.curve)
    # fortio's chart steps flat across an empty range: 97 % from 2 ms until 4 ms
    assert (2.0, 97.0) in _pairs(plotted[0].curve) and (4.0, 97.0) in _pairs(plotted[0].curve)
    assert "p50 1.18" in plotted[0].legend and "p99 4.80" in plotted[0].legend


def test_results_without_buckets_are_drawn_from_their_percentiles(tmp_path: Path) -> None:
    # `bench compare` keeps runs without their buckets
    trimmed = json.loads(json.dumps(FORTIO_RESULT))
    del trimmed["DurationHistogram"]["Data"]
    (s,) = report.draw([("trimmed", trimmed)], tmp_path / "t.png")
    percentiles = [(1.18, 50), (1.36, 75), (1.6, 90), (4.8, 99), (12.1, 99.9)]
    # from Min at 1/N through the percentiles to Max at 100 %
    assert _pairs(s.curve) == _pairs([(0.9, 100 / 6000), *percentiles, (21.3, 100.0)])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ('{"runs": []}', "no DurationHistogram"),
        ('{"DurationHistogram": {"Count": 0}}', "no requests completed"),
        ('{"DurationHistogram": {"Count": 3, "Data": [{"Start": "a"}]}}', "malformed"),
    ],
)
def test_a_file_that_is_not_a_result_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    png = tmp_path / "x.png"
    assert report.main([str(bad), "--png", str(png)]) == 2
    assert message in capsys.readouterr().err
    assert not png.exists()
