"""What the fault tests compare: where a real gateway sends each name (its Envoy admin
config dump, read as `modelxds inspect` reads it) against a fresh read of etcd (`modelxds
placement --json`, a new process), as sets of endpoints, both ways; and small helpers to
break and mend the real processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aetcd

from modelxds import inspect
from modelxds.localmesh import processes
from modelxds.localmesh.stack import Stack

# (listener port, protocol, name or "*" for the gateway's pods, instance id, pod host)
Endpoint = tuple[int, str, str, str, str]
PROTOCOLS = ("grpc", "rest")
ANY = "*"  # the pods a gateway knows at all (the ANY_ENDPOINT fallback's pods)


async def fresh_read(stack: Stack, *, loaded_after_ms: int | None = None) -> dict[str, Any]:
    """`modelxds placement --json` against the stack's etcd, as an operator runs it."""
    extra = ["--loaded-after-ms", str(loaded_after_ms)] if loaded_after_ms is not None else []
    out = await asyncio.to_thread(
        subprocess.run,
        [
            *(sys.executable, "-m", "modelxds.cli", "placement", "--json"),
            *("--etcd", stack.etcd_url, "--root-prefix", stack.layout.root_prefix),
            *("--service-name", stack.layout.service_name, *extra),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def expected_endpoints(report: dict[str, Any], port: int) -> set[Endpoint]:
    """Where `placement --json` says requests go, on listener ``port``: each model to its
    loaded copies (else its loading ones), each InferenceService to its ``routable``,
    and every live pod as a pod of the gateway."""
    (mesh,) = report["namespaces"].values()
    hosts = {iid: inst["address"] for iid, inst in mesh["instances"].items()}
    routes: dict[str, list[str]] = {}
    for name, copies in mesh["models"].items():
        routes[name] = copies["loaded"] or copies["loading"]
    for name, vmodel in mesh["vmodels"].items():
        routes.setdefault(name, vmodel["routable"])  # a model id wins over a vmodel id
    out: set[Endpoint] = set()
    for protocol in PROTOCOLS:
        out |= {(port, protocol, ANY, iid, host) for iid, host in hosts.items()}
        for name, pods in routes.items():
            out |= {(port, protocol, name, iid, hosts[iid]) for iid in pods}
    return out


def gateway_endpoints(admin: str) -> set[Endpoint]:
    """Where the gateway at Envoy ``admin`` sends each name, and the pods it knows."""
    _, routes = inspect.read_gateway(admin)
    out: set[Endpoint] = set()
    for r in routes:
        pods = [(ANY, p) for p in r.fallback.pods] + [
            (name, p) for name, held in r.names.items() for p in held
        ]
        out |= {
            (r.port, r.protocol, name, p.instance, p.address.rsplit(":", 1)[0]) for name, p in pods
        }
    return out


@dataclass(frozen=True)
class Diff:
    lost: frozenset[Endpoint]  # in etcd, not at the gateway
    phantom: frozenset[Endpoint]  # at the gateway, not in etcd

    @classmethod
    def of(cls, want: set[Endpoint], got: set[Endpoint]) -> Diff:
        return cls(frozenset(want - got), frozenset(got - want))

    def __bool__(self) -> bool:
        return bool(self.lost or self.phantom)

    def describe(self, limit: int = 3) -> str:
        """For the reliability table: "none", or what is missing and what made up."""
        if not self:
            return "none"
        parts = []
        for what, ends in (("lost", self.lost), ("phantom", self.phantom)):
            if ends:
                shown = ", ".join(
                    f"{n}@{iid}:{p}/{proto}" for p, proto, n, iid, _ in sorted(ends)[:limit]
                )
                more = f" +{len(ends) - limit}" if len(ends) > limit else ""
                parts.append(f"{len(ends)} {what} ({shown}{more})")
        return "; ".join(parts)


async def compare(stack: Stack, admin: str | None = None, **read: Any) -> Diff:
    """The gateway at ``admin`` (the stack's) against a fresh read of etcd, on the
    stack's listener port."""
    want = expected_endpoints(await fresh_read(stack, **read), stack.gateway_port)
    return Diff.of(want, await _at_gateway(stack, admin))


async def until_exact(stack: Stack, timeout: float, admin: str | None = None, **read: Any) -> Diff:
    """Wait until the gateway equals etcd, or ``timeout`` s passed: the last Diff.

    etcd is read once and the gateway polled against it, so the wait ends soon after
    the gateway got there (a fresh read takes a new process, a second or so); a second
    fresh read then confirms etcd had not moved on meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        want = expected_endpoints(await fresh_read(stack, **read), stack.gateway_port)
        while True:
            diff = Diff.of(want, await _at_gateway(stack, admin))
            if not diff or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if diff:
            return diff
        diff = await compare(stack, admin, **read)
        if not diff or time.monotonic() > deadline:
            return diff


async def _at_gateway(stack: Stack, admin: str | None) -> set[Endpoint]:
    got = await asyncio.to_thread(gateway_endpoints, admin or stack.admin)
    return {e for e in got if e[0] == stack.gateway_port}


def counter(metrics_text: str, name: str) -> float:
    """One sample of a Prometheus text page (0 when absent): ``name`` with its labels."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def restart(stack: Stack, proc: processes.Process, port: int) -> processes.Process:
    """Start ``proc`` again with the same command line (data dir, ports), in its place
    in ``stack.processes``; it listens on ``port`` when this returns."""
    # spawned on this (the main) thread: a child dies with the thread that started it
    args = [str(a) for a in proc.popen.args]  # type: ignore[union-attr]
    again = processes.spawn(proc.name, args, proc.log_path.parent)
    stack.processes[stack.processes.index(proc)] = again
    await asyncio.to_thread(processes.wait_for_port, again, "127.0.0.1", port)
    return again


@contextmanager
def stopped(proc: processes.Process) -> Iterator[None]:
    """SIGSTOP ``proc`` (its sockets stay open: a half-open peer) until the block ends."""
    proc.popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.popen.send_signal(signal.SIGCONT)


def connected_ports(pid: int) -> set[int]:
    """Remote loopback ports process ``pid`` has established TCP connections to."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    ports = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            peer = line.split()[3]
            ports.add(int(peer.rsplit(":", 1)[1]))
    return ports


def synced(rows: list[dict[str, Any]], gateway: str) -> bool:
    """Whether ``gateway`` is listed and ACKed every type it was sent."""
    mine = [r for r in rows if r["gateway"] == gateway]
    cells = [
        v for r in mine for k, v in r.items() if k not in ("gateway", "behind_seconds", "errors")
    ]
    return bool(mine) and all(re.match(r"SYNCED|NOT REQUESTED", c) for c in cells)


async def prompt_pod_client(stack: Stack) -> None:
    """Give the stack's pods (and its writes) an etcd client that reconnects within a
    second once etcd is back, as a pod that must keep its lease does.

    etcd keeps leases across its own restart (a new leader extends every lease by its
    TTL), but the pods must renew within that TTL; gRPC's default reconnect backoff
    (1 s, x1.6 per failure) has grown past it after 30 s of refused connections: with
    the stack's own client the pods reconnected 13 s after etcd was back, and lost
    their 10 s leases.
    """
    prompt = aetcd.Client(
        host="127.0.0.1",
        port=stack.etcd_port,
        options={"grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1000},
    )
    await prompt.connect()
    old, stack.client = stack.client, prompt
    for reg in stack.registrations:
        reg.client = prompt
    if old is not None:
        await old.close()
