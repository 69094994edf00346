"""The rows of docs/reliability.md: each fault test records what it injected and what
the users saw, and `make reliability` renders the rows of one run as the table.

A row is written only when MODELXDS_RELIABILITY_DIR is set (`make reliability` sets it),
as one JSON file named after the test, so a re-run overwrites its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ENV = "MODELXDS_RELIABILITY_DIR"
DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
COMMAND = "make reliability"


@dataclass(frozen=True)
class Row:
    test: str  # file::function[param], from pytest's node id
    fault: str  # what broke, in an operator's words
    injected: str  # how the test broke it, with real processes
    requests: int  # requests sent through the gateways while it was broken and after
    failures: int
    converge_s: float | None  # from the fault (or its end) to the exact state again
    lost: str  # "none", or what was lost or made up; the test asserts "none"


def record(row: Row) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", row.test)
    (path / f"{name}.json").write_text(json.dumps(asdict(row), indent=1) + "\n")


def render(rows: list[Row]) -> str:
    lines = [
        "# Reliability: faults injected into real processes",
        "",
        "Each row is one test of `tests/reliability/` with a real etcd, `modelxds serve` or",
        "`modelxds epp`, Envoy gateways and mesh pods; the test breaks something the way it",
        "breaks in a cluster and asserts what a user would see. *Requests* counts what the",
        "test sent through the gateways while the fault lasted and until the state was exact",
        "again; *converge* is the time from the fault (or its end, as the row says) until",
        "the gateways' config equals a fresh read of etcd; *lost* must be none: no endpoint",
        "missing, none made up, no change dropped.",
        "",
        "Bad input and security have tests of their own, in `make test` too: hostile",
        "etcd records, policies, InferenceServices and requests (`tests/unit/test_fuzz_inputs.py`,",
        "the atheris harnesses of `tests/fuzz`, and a real Envoy validating configs made from",
        "hostile input: `tests/fuzz/test_envoy_takes_hostile_configs.py`), and TLS, mutual",
        "TLS and node identity on the xDS port (`tests/e2e/test_xds_tls.py`,",
        "[security.md](security.md)).",
        "",
        f"Regenerate with `{COMMAND}` (it runs the suite and writes this file).",
        f"Machine of this run: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}.",
        "",
        "| fault | injected | requests | failures | converge (s) | lost | test |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.test):
        converge = "" if r.converge_s is None else f"{r.converge_s:.2f}"
        cells = [r.fault, r.injected, str(r.requests), str(r.failures), converge, r.lost]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + f" | `{r.test}` |")
    return "\n".join(lines) + "\n"


def load(folder: Path) -> list[Row]:
    return [Row(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render recorded fault rows as the doc")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args(argv)
    rows = load(args.folder)
    if not rows:
        print(f"no rows in {args.folder}: run the suite with {ENV} set", file=sys.stderr)
        return 1
    args.out.write_text(render(rows))
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
