"""Latency statistics in fortio's shape, from raw samples (seconds)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

PERCENTILES = (50.0, 75.0, 90.0, 99.0, 99.9)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), p in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def histogram(values: list[float], buckets_per_decade: int = 10) -> list[dict[str, float]]:
    """Log-spaced buckets from the smallest to the largest sample, with cumulative percent."""
    if not values:
        return []
    lo = math.floor(math.log10(min(values)) * buckets_per_decade)
    hi = math.floor(math.log10(max(values)) * buckets_per_decade)
    counts = Counter(math.floor(math.log10(v) * buckets_per_decade) for v in values)
    out, seen = [], 0
    for b in range(lo, hi + 1):
        if not counts[b]:
            continue
        seen += counts[b]
        out.append(
            {
                "Start": 10 ** (b / buckets_per_decade),
                "End": 10 ** ((b + 1) / buckets_per_decade),
                "Count": counts[b],
                "Percent": 100 * seen / len(values),
            }
        )
    return out


def duration_histogram(values: list[float]) -> dict[str, Any]:
    """fortio's ``DurationHistogram`` (seconds), so one reader serves both tools."""
    n = len(values)
    if n == 0:
        return {"Count": 0, "Percentiles": [], "Data": []}
    avg = sum(values) / n
    return {
        "Count": n,
        "Min": min(values),
        "Max": max(values),
        "Sum": sum(values),
        "Avg": avg,
        "StdDev": math.sqrt(sum((v - avg) ** 2 for v in values) / n),
        "Data": histogram(values),
        "Percentiles": [{"Percentile": p, "Value": percentile(values, p)} for p in PERCENTILES],
    }


def summary_line(result: dict[str, Any]) -> str:
    """The numbers a fortio user reads first, in milliseconds."""
    h = result["DurationHistogram"]
    if not h["Count"]:
        return "no requests completed"
    pct = {p["Percentile"]: p["Value"] * 1000 for p in h["Percentiles"]}
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(result["RetCodes"].items()))
    lag = result.get("SendLag") or {}
    lag_text = f"; send lag p50 {lag['p50'] * 1000:.3f} ms" if lag else ""
    return (
        f"{h['Count']} requests, {result['ActualQPS']:.1f} qps; ms min {h['Min'] * 1000:.3f} "
        f"avg {h['Avg'] * 1000:.3f} p50 {pct[50.0]:.3f} p75 {pct[75.0]:.3f} p90 {pct[90.0]:.3f} "
        f"p99 {pct[99.0]:.3f} p99.9 {pct[99.9]:.3f} max {h['Max'] * 1000:.3f}; codes {{{codes}}}"
        f"{lag_text}"
    )


def percentiles_ms(result: dict[str, Any]) -> dict[str, float]:
    """{"p50": ms, ...} from a fortio-shaped result (ours or fortio's own JSON)."""
    return {
        f"p{p['Percentile']:g}": round(p["Value"] * 1000, 3)
        for p in result["DurationHistogram"]["Percentiles"]
    }
