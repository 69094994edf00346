"""The atheris harnesses (tests/fuzz/fuzz_*.py) run in `make test`: each fuzzes for a
bounded number of runs from its committed seed corpus (tests/fuzz/corpus/<harness>),
with a fixed seed so a run repeats; an input that breaks a promise of tests/fuzz/checks.py
(an unexpected exception, an address outside the pods, a client's header left in place)
fails the test with that input's bytes.

A long session is the same command without the bounds (README, "Fuzzing"), e.g.

    .venv/bin/python tests/fuzz/fuzz_policy.py -max_total_time=600 /tmp/p tests/fuzz/corpus/policy
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelxds.policy import Policy
from tests.fuzz import checks, fuzz_etcd, fuzz_picker

FUZZ = Path(__file__).resolve().parent
CORPUS = FUZZ / "corpus"
REPO = FUZZ.parents[1]
# runs per harness: 3-8 s each on a quiet machine, 25 s for all four (the etcd harness
# translates every input four ways, the others parse); the time bound only guards a
# busy machine, where it ends a run early
RUNS = {"etcd": 1500, "policy": 6000, "isvc": 20000, "picker": 20000}
MAX_SECONDS = 15
SEED = 1
_PROGRESS = re.compile(r"#\d+\s+[A-Z]+\s")  # "#891	REDUCE cov: ...": a line per corpus change


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_coverage_guided_fuzzing_finds_no_input_that_breaks_a_promise(
    harness: str, tmp_path: Path
) -> None:
    found = tmp_path / "found"  # what the run adds to the corpus: not the committed seeds
    artifacts = tmp_path / "artifacts"
    found.mkdir()
    artifacts.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            str(FUZZ / f"fuzz_{harness}.py"),
            f"-runs={RUNS[harness]}",
            f"-max_total_time={MAX_SECONDS}",
            f"-seed={SEED}",
            "-max_len=4096",
            "-timeout=30",  # seconds for one input: a hang is a finding too
            "-rss_limit_mb=2048",
            f"-artifact_prefix={artifacts}/",
            str(found),
            str(CORPUS / harness),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=MAX_SECONDS + 60,
    )
    crashes = sorted(artifacts.iterdir())
    if run.returncode != 0 or crashes:
        raise AssertionError(_report(harness, run, crashes))
    assert "Done " in run.stderr, run.stderr[-3000:]  # it fuzzed, not just started


def _report(harness: str, run: subprocess.CompletedProcess[str], crashes: list[Path]) -> str:
    """The fuzzer's own account (the traceback), then each crashing input's bytes and how
    to replay it."""
    # atheris prints the traceback on stdout, libFuzzer its progress on stderr
    account = [
        line
        for line in (run.stdout + run.stderr).splitlines()
        if not _PROGRESS.match(line) and not line.startswith(("INFO:", "WARNING:"))
    ]
    lines = [f"fuzz_{harness} exited {run.returncode}:", "\n".join(account)[-6000:]]
    for crash in crashes:
        data = crash.read_bytes()
        lines += [
            f"{crash.name} ({len(data)} bytes): {data[:4000]!r}",
            f"replay: .venv/bin/python tests/fuzz/fuzz_{harness}.py {crash}",
        ]
    return "\n".join(lines)


def _seeds(harness: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((CORPUS / harness).iterdir())}


# ---- the seeds are the inputs they stand for: a harness starts from real ones -------


def test_the_etcd_seeds_are_a_mesh_the_watcher_routes_by() -> None:
    seeds = _seeds("etcd")
    # DESIGN §3's records as ModelMesh writes them: two pods, a model loaded on both,
    # an InferenceService serving it
    mesh = checks.check_etcd_events(fuzz_etcd.events(seeds["design-records"])).meshes[checks.NS]
    assert mesh.instances["7dd689-4zwqs"].host == "100.96.35.150"
    model = "example-mnist-isvc__isvc-6b2eb0b8bf"
    assert set(mesh.routable(model)) == {"7dd689-4zwqs", "7dd689-k2x9p"}
    assert mesh.routable("example-mnist-isvc") == mesh.routable(model)
    mesh = checks.check_etcd_events(fuzz_etcd.events(seeds["mesh"])).meshes[checks.NS]
    assert mesh.routable("example-mnist-isvc") == ("7dd689-4zwqs",)
    mesh = checks.check_etcd_events(fuzz_etcd.events(seeds["delete-pod"])).meshes[checks.NS]
    assert not mesh.instances


def test_the_policy_seeds_are_read_and_the_lone_surrogate_refused() -> None:
    seeds = _seeds("policy")
    read = {name: checks.check_policy_text(data.decode()) for name, data in seeds.items()}
    assert [name for name, policy in read.items() if not isinstance(policy, Policy)] == [
        "surrogate.yaml"
    ]


def test_the_inference_service_seeds_are_read_and_the_lone_surrogate_refused() -> None:
    read = {name: checks.check_isvc_text(data.decode()) for name, data in _seeds("isvc").items()}
    assert {name: [s.name for s in services] for name, services in read.items()} == {
        "mnist.yaml": ["example-mnist-isvc"],
        "two.yaml": ["example-mnist-isvc", "other"],
        "surrogate.yaml": [],
    }


def test_the_picker_seeds_reach_the_pod_holding_their_model() -> None:
    picks = {
        name: checks.check_exchange(*fuzz_picker.request(data), fuzz_picker.DESTINATION)
        for name, data in _seeds("picker").items()
    }
    holder = "10.0.0.2:8033"  # pod-1 holds "m"; the forged destination headers lose
    for name in ("grpc-body", "model-infer", "rest", "rest-data"):
        assert picks[name][0] == holder, (name, picks[name])
    # the hint narrows the pick to the one live pod it names, which does not hold "m"
    assert picks["headers"] == ("[fd00::3]:8033",)
