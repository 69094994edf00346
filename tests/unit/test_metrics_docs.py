"""docs/metrics.md lists exactly the metrics modelxds defines, and the dashboard and alert
rules ask only for series that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from modelxds import metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_ROW = re.compile(r"^\| `(modelxds_\w+)` \| (\w+) \| ([^|]*) \| (.*) \|$", re.M)
# PromQL words that are not series names
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def defined() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Name as scraped (counters with ``_total``) -> (type, label names)."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = (value._type, tuple(value._labelnames))
    return found


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    text = (DOCS / "metrics.md").read_text()
    rows = {}
    for name, kind, labels, meaning in _ROW.findall(text):
        assert name not in rows, f"{name} is documented twice"
        assert meaning.strip(), f"{name} has no meaning"
        rows[name] = (kind, tuple(re.findall(r"`(\w+)`", labels)))
    return rows


def series() -> set[str]:
    """Every series name a query may use: histograms by their bucket, sum and count."""
    names: set[str] = set()
    for name, (kind, _) in defined().items():
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The series names in a PromQL expression, read loosely: what is left once strings,
    label matchers, ranges, grouping clauses, function calls and keywords are gone."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr)
    return {w for w, call in words if not call and w not in _KEYWORDS}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DOCS / "grafana" / "modelxds.json").read_text())

    def walk(panels: list[dict[str, Any]]) -> list[str]:
        out = []
        for p in panels:
            out += [t["expr"] for t in p.get("targets", [])]
            out += walk(p.get("panels", []))
        return out

    return walk(dash["panels"])


def alert_exprs() -> list[str]:
    doc = yaml.safe_load((DOCS / "prometheus" / "alerts.yaml").read_text())
    rules = [r for group in doc["groups"] for r in group["rules"]]
    assert all(r.get("alert") and r.get("expr") for r in rules), "every rule alerts on an expr"
    return [str(r["expr"]) for r in rules]


def test_every_metric_is_documented_with_its_type_and_labels() -> None:
    docs, code = documented(), defined()
    assert sorted(code.keys() - docs.keys()) == [], "defined in modelxds/metrics.py, not in docs"
    assert sorted(docs.keys() - code.keys()) == [], "in docs/metrics.md, not defined"
    wrong = {n: (docs[n], code[n]) for n in code if docs[n] != code[n]}
    assert wrong == {}, "documented (type, labels) differ from the code's"


def test_no_metric_has_a_label_for_unbounded_names() -> None:
    unbounded = {"model", "model_id", "vmodel", "isvc", "pod", "instance_id", "node_id", "key"}
    assert {n: ls for n, (_, ls) in defined().items() if unbounded & set(ls)} == {}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_expression_names_only_metrics_that_exist(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    known = series()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{sorted(names - known)} in {expr!r} do not exist"


def test_the_expression_reader_finds_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{x="y z"}[5m]))) > 5 '
        "and on (type) b_total offset 5m"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total"}
