"""docs/reliability.md is the table of the fault suite's last run: every fault test has
its row, and no row names a test that is gone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.reliability.record import COMMAND, DOC, Row, render

SUITE = Path(__file__).resolve().parents[1] / "reliability"


def fault_tests() -> set[str]:
    """file::function of each test that records a row (takes the fault_row fixture)."""
    out = set()
    for path in sorted(SUITE.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                a.arg == "fault_row" for a in node.args.args
            ):
                out.add(f"{path.name}::{node.name}")
    return out


def documented_tests() -> set[str]:
    # a row's last cell is `file::function[params]`
    return {
        m.group(1) for m in re.finditer(r"\| `([^`\[]+)(?:\[[^`]*\])?` \|$", DOC.read_text(), re.M)
    }


def test_every_fault_test_has_its_row_and_every_row_its_test() -> None:
    expected, rows = fault_tests(), documented_tests()
    assert expected, "the fault suite records no rows"
    assert expected - rows == set(), f"run `{COMMAND}`: no row for {sorted(expected - rows)}"
    assert rows - expected == set(), (
        f"run `{COMMAND}`: rows of tests gone {sorted(rows - expected)}"
    )
    assert COMMAND in DOC.read_text()


def test_a_row_renders_its_cells_and_escapes_pipes() -> None:
    row = Row("test_x.py::test_y[a]", "etcd down | 30 s", "SIGKILL", 3000, 0, 1.234, "none")
    text = render([row])
    assert (
        "| etcd down \\| 30 s | SIGKILL | 3000 | 0 | 1.23 | none | `test_x.py::test_y[a]` |" in text
    )
