"""Saved load results drawn as fortio's UI draws them: the latency distribution.

    modelxds bench report 2026-12-02-040326_subsets.json fortio-run.json --png latency.png

Each result (``bench load -json``/``-a``, or fortio's own ``-json``/``-a`` file: the
same shape) is one line: response time in ms on a log x axis, the cumulative percent
of requests answered within it on y, from the result's ``DurationHistogram.Data``
buckets the way fortio's chart joins them; the result's ``Percentiles`` are marked on
it. Lines are labelled by the results' ``Labels``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ReportError(ValueError):
    """A file that is not a load result."""


@dataclass(frozen=True)
class Series:
    """What one result contributes to the plot."""

    label: str
    legend: str
    curve: list[tuple[float, float]]  # (ms, cumulative %)
    percentiles: list[tuple[float, float]]  # (ms, percentile), as the result lists them


def load(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON: {e}") from None
    hist = result.get("DurationHistogram") if isinstance(result, dict) else None
    if not isinstance(hist, dict) or not isinstance(hist.get("Count"), int):
        raise ReportError(f"{path}: no DurationHistogram: not a fortio-shaped load result")
    if not hist["Count"]:
        raise ReportError(f"{path}: no requests completed")
    rows: list[tuple[object, tuple[str, ...]]]
    rows = [(b, ("Start", "End", "Percent")) for b in hist.get("Data") or []]
    rows += [(q, ("Percentile", "Value")) for q in hist.get("Percentiles") or []]
    for row, keys in rows:
        if not isinstance(row, dict) or not all(_number(row.get(k)) for k in keys):
            raise ReportError(f"{path}: malformed DurationHistogram entry {row!r}")
    loaded: dict[str, Any] = result
    return loaded


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def curve(hist: dict[str, Any]) -> list[tuple[float, float]]:
    """Cumulative percent by latency (ms), joined as fortio's chart joins the buckets:
    1/N at the first bucket's start, each bucket's cumulative percent at its end, and a
    flat step over gaps between buckets. Without buckets (compare's trimmed results),
    the percentiles between min and max."""
    count = hist["Count"]
    buckets = hist.get("Data") or []
    if not buckets:
        points = [(p["Value"] * 1000, p["Percentile"]) for p in hist.get("Percentiles") or []]
        if "Min" in hist:
            points.insert(0, (hist["Min"] * 1000, 100 / count))
        if "Max" in hist:
            points.append((hist["Max"] * 1000, 100.0))
        return points
    points = [(buckets[0]["Start"] * 1000, 100 / count)]
    for b in buckets:
        start = b["Start"] * 1000
        if start != points[-1][0]:
            points.append((start, points[-1][1]))
        points.append((b["End"] * 1000, float(b["Percent"])))
    return points


def series(result: dict[str, Any], fallback_label: str = "") -> Series:
    hist = result["DurationHistogram"]
    label = result.get("Labels") or fallback_label
    pct = [(p["Value"] * 1000, float(p["Percentile"])) for p in hist.get("Percentiles") or []]
    quoted = ", ".join(f"p{p:g} {ms:.2f}" for ms, p in pct if p in (50, 99, 99.9))
    qps = result.get("ActualQPS")
    rate = f", {qps:.1f} qps" if isinstance(qps, int | float) else ""
    legend = f"{label}: {quoted} ms{rate}" if quoted else f"{label}{rate}"
    return Series(label=label, legend=legend, curve=curve(hist), percentiles=pct)


def draw(results: Sequence[tuple[str, dict[str, Any]]], png: Path, title: str = "") -> list[Series]:
    """Plot (name, result) pairs to ``png``; returns exactly what was plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plotted = [series(result, name) for name, result in results]
    fig, ax = plt.subplots(figsize=(9, 5))
    for s in plotted:
        (line,) = ax.plot([x for x, _ in s.curve], [y for _, y in s.curve], label=s.legend)
        ax.plot(
            [x for x, _ in s.percentiles],
            [y for _, y in s.percentiles],
            "o",
            color=line.get_color(),
            markersize=4,
        )
    ax.set_xscale("log")
    # 1, 2, 5, 10, 20 ... ms written out, as fortio's axis has them, not powers of ten
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Response time in ms (log scale)")
    ax.set_ylabel("cumulative %")
    ax.set_ylim(0, 100.5)
    ax.set_title(title or "Response time distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return plotted


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="modelxds bench report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", type=Path, help="result JSON files (ours or fortio's)")
    p.add_argument("--png", required=True, type=Path, help="where to write the plot")
    p.add_argument("--title", default="", help="the plot's title")
    args = p.parse_args(argv)
    try:
        results = [(path.stem, load(path)) for path in args.results]
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in draw(results, args.png, args.title):
        print(s.legend)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
