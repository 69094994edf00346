"""The image's contents, built here as its Dockerfile builds them (no container engine
runs on these machines): the builder stage's files make the wheels, a clean virtualenv
installs them offline as the runtime stage does, and the commands the manifests run
start from it. Slow (it resolves and installs every dependency), so it has its own
timeout; pip's cache makes reruns quick.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"

# The commands this test mirrors; the Dockerfile must keep running them.
BUILD = "python -m pip wheel --wheel-dir /wheels ."
INSTALL = "python -m pip install --no-index --find-links /wheels modelxds"


def stages() -> list[list[str]]:
    """The Dockerfile's instructions per stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            out.append([])
        if out and line and not line.startswith("#"):
            out[-1].append(line)
    return out


def builder_sources() -> list[str]:
    """What the builder stage copies from the build context."""
    sources = []
    for line in stages()[0]:
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # nothing from this checkout or its virtualenv may leak into the clean one
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_RETRIES"] = "5"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_dockerfile_builds_the_wheel_and_installs_it_offline() -> None:
    builder, runtime = stages()
    assert any(BUILD in line for line in builder), f"the builder stage runs `{BUILD}`"
    assert any(INSTALL in line for line in runtime), f"the runtime stage runs `{INSTALL}`"
    assert sorted(builder_sources()) == ["README.md", "modelxds", "pyproject.toml"]


def test_the_image_runs_modelxds_as_a_numeric_non_root_user() -> None:
    builder, runtime = stages()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert base, "the base image is one pinned ARG"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base[1]), base[1]
    assert builder[0] == "FROM ${PYTHON_IMAGE} AS builder" and runtime[0] == "FROM ${PYTHON_IMAGE}"
    (user,) = [line for line in runtime if line.startswith("USER ")]
    uid, gid = user.split()[1].split(":")
    assert int(uid) > 0 and int(gid) > 0
    assert 'ENTRYPOINT ["modelxds"]' in runtime
    assert any("PYTHONDONTWRITEBYTECODE=1" in line for line in runtime)


def test_dockerignore_keeps_only_the_package_in_the_build_context() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert kept == set(builder_sources())


@pytest.mark.timeout(900)
def test_the_wheel_the_image_installs_runs_serve_and_label(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for source in builder_sources():
        src = ROOT / source
        if src.is_dir():
            ignored = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(src, context / src.name, ignore=ignored)
        else:
            shutil.copy(src, context / src.name)
    wheels = tmp_path / "wheels"
    build = BUILD.replace("/wheels", str(wheels)).split()[1:]
    built = run([sys.executable, *build], cwd=context, timeout=840)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert list(wheels.glob("modelxds-*.whl")), sorted(p.name for p in wheels.iterdir())

    venv = tmp_path / "venv"
    created = run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    install = INSTALL.replace("/wheels", str(wheels)).split()[1:]
    installed = run([str(python), *install], cwd=tmp_path, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    for command in ("serve", "label"):
        out = run([str(venv / "bin" / "modelxds"), command, "--help"], cwd=tmp_path, timeout=60)
        assert out.returncode == 0, f"modelxds {command} --help: {out.stderr}"
        assert "--etcd-connection" in out.stdout
    # the code that ran is the wheel's, not this checkout's
    where = run(
        [str(python), "-c", "import modelxds; print(modelxds.__file__)"], cwd=tmp_path, timeout=60
    )
    assert where.stdout.startswith(str(venv)), where.stdout
