"""The example gateway configurations in `envoy/` are what `modelxds bootstrap` prints today
for the commands envoy/README.md gives, and the Envoy the tests run accepts each."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from modelxds.localmesh import processes

EXAMPLES = Path(__file__).resolve().parents[2] / "envoy"
# `modelxds bootstrap ... > envoy/NAME.yaml`, possibly continued over lines with `\`
COMMAND = re.compile(r"^modelxds (bootstrap\b.*?) > envoy/([\w.-]+\.yaml)$", re.M | re.S)


def commands() -> dict[str, list[str]]:
    """The example file each README command writes, and the command's arguments."""
    readme = (EXAMPLES / "README.md").read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for match in COMMAND.finditer(readme):
        assert match[2] not in out, f"two commands write envoy/{match[2]}"
        out[match[2]] = shlex.split(match[1])
    return out


def test_every_example_says_how_it_was_made() -> None:
    files = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert files == set(commands()), "each envoy/*.yaml needs its command in envoy/README.md"
    assert {"xds-gateway.yaml", "epp-gateway.yaml"} <= files


@pytest.mark.parametrize("name", sorted(commands()))
def test_the_example_is_what_modelxds_bootstrap_prints(name: str) -> None:
    args = commands()[name]
    out = subprocess.run(
        [sys.executable, "-m", "modelxds.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"modelxds {shlex.join(args)}: {out.stderr}"
    assert (EXAMPLES / name).read_text() == out.stdout, (
        f"envoy/{name} is stale; regenerate it with\n  modelxds {shlex.join(args)} > envoy/{name}"
    )


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_envoy_accepts_the_example(name: str) -> None:
    check = subprocess.run(
        [
            processes.binary("envoy"),
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-c",
            str(EXAMPLES / name),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
