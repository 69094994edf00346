"""The whole system on one machine: etcd, sample pods, `modelxds serve`, an Envoy gateway.

Pods bind distinct loopback addresses (127.0.0.11, .12, ...) on one port, as pods
in a cluster share a port on distinct IPs, and register in etcd as ModelMesh
pods do. `make run` and the end-to-end tests both start exactly this.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd

from modelxds.localmesh import isvc, processes
from modelxds.localmesh.processes import Process
from modelxds.localmesh.sample import SampleBackend
from modelxds.modelmesh import Layout
from modelxds.modelmesh.registrar import PodRegistration, etcd_client
from modelxds.placement.watch import PlacementWatcher
from modelxds.policy.seed import SEED_POLICY_YAML
from modelxds.xds.bootstrap import bootstrap, epp_bootstrap

SEED_GATEWAY_PORT = 8008
SEED_POD_PORT = 8033
SEED_REST_PORT = 8008  # ModelMesh Serving's REST proxy on every pod


def pod_host(index: int) -> str:
    # 127.0.0.11 on, 200 a block: 500 pods for the scale benchmark stay on loopback
    return f"127.0.{index // 200}.{11 + index % 200}"


def pod_instance_id(index: int) -> str:
    # the last 12 characters of a pod name, as ModelMesh derives instance ids
    return f"7dd689-pod{index:02d}"


def seed_policy(gateway_port: int, pod_port: int) -> str:
    """The seed's DestinationRule/VirtualService with the listener and pod ports swapped in."""
    return SEED_POLICY_YAML.replace(f"port: {SEED_GATEWAY_PORT}", f"port: {gateway_port}").replace(
        f"number: {SEED_POD_PORT}", f"number: {pod_port}"
    )


@dataclass
class Stack:
    workdir: Path
    pods: int = 3
    pod_port: int = 0
    # the pods' REST proxy; 0: ModelMesh's 8008 beside its 8033, else any free port
    rest_port: int = 0
    gateway_port: int = 0
    xds_port: int = 0
    admin_port: int = 0
    metrics_port: int = 0
    etcd_port: int = 0
    listen_address: str = "127.0.0.1"
    policy_text: str | None = None
    # False: serve gets no --policy file (its rules come from Kubernetes, in serve_args)
    policy_file: bool = True
    # serve --policy-poll-ms: 0 (reload on SIGHUP only) keeps tests that signal exact
    policy_poll_ms: int = 0
    serve_args: tuple[str, ...] = ()
    # "sample": in-process stand-in pods that answer with their name (control-plane tests);
    # "sample-process": the same pods, a process each that keeps its own lease (pod faults:
    # SIGKILL one and its lease runs out); "mlserver": mesh nodes, one process each, with
    # a real MLServer runtime
    runtime: str = "sample"
    storage_dir: Path | None = None  # the "localMinIO" storage of the mesh nodes
    node_capacity: int = 8
    # (runtime HTTP, runtime gRPC, node metrics) ports on each pod address; None: any free
    node_ports: tuple[int, int, int] | None = None
    lease_ttl: int = 10
    # False: an etcd the caller runs (a cluster, say) already listens on etcd_port
    own_etcd: bool = True
    gateway_workers: int = 2  # the gateway Envoy's --concurrency
    # "xds": `modelxds serve` programs the gateway; "epp": the gateway is a static
    # bootstrap (`modelxds bootstrap --epp`) asking `modelxds epp` for each request
    gateway_kind: str = "xds"
    epp_failure_mode: str = "FailClose"
    epp_gateways: list[EppGateway] = field(default_factory=list)
    nodes: dict[str, processes.Process] = field(default_factory=dict)
    node_metrics_ports: dict[str, int] = field(default_factory=dict)
    layout: Layout = field(default_factory=Layout)
    backends: list[SampleBackend] = field(default_factory=list)
    registrations: list[PodRegistration] = field(default_factory=list)
    processes: list[processes.Process] = field(default_factory=list)
    client: aetcd.Client | None = None

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def gateway(self) -> str:
        host = "127.0.0.1" if self.listen_address == "0.0.0.0" else self.listen_address
        return f"{host}:{self.gateway_port}"

    @property
    def etcd(self) -> aetcd.Client:
        assert self.client is not None, "stack not started"
        return self.client

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pick = processes.free_port
        self.pod_port = self.pod_port or pick(pod_host(0))
        if not self.rest_port:
            # fixed ModelMesh ports (`make run`) get ModelMesh's REST port; tests get a
            # free one, as they do for every other port
            fixed = self.pod_port == SEED_POD_PORT
            self.rest_port = SEED_REST_PORT if fixed else pick(pod_host(0))
            while self.rest_port == self.pod_port:
                self.rest_port = pick(pod_host(0))
        self.gateway_port = self.gateway_port or pick()
        self.xds_port, self.admin_port = self.xds_port or pick(), self.admin_port or pick()
        self.metrics_port, self.etcd_port = self.metrics_port or pick(), self.etcd_port or pick()
        try:
            if self.own_etcd:
                self.processes.append(processes.start_etcd(self.workdir, self.etcd_port))
            self.client = etcd_client(self.etcd_url)
            await self.client.connect()
            if self.runtime in ("mlserver", "sample-process"):
                spawn = self.spawn_node if self.runtime == "mlserver" else self.spawn_sample
                for i in range(self.pods):
                    spawn(i)
                for iid in list(self.nodes):
                    await self.wait_node(iid)
            else:
                for i in range(self.pods):
                    await self.add_pod(i)
            if self.gateway_kind == "epp":
                await self.add_epp_gateway(
                    self.pod_port,
                    gateway_port=self.gateway_port,
                    admin_port=self.admin_port,
                    metrics_port=self.metrics_port,
                )
            else:
                await self._start_serve()
                self.processes.append(
                    processes.start_envoy(
                        "envoy",
                        bootstrap(f"127.0.0.1:{self.xds_port}", "gateway-0", self.admin),
                        self.workdir,
                        concurrency=self.gateway_workers,
                    )
                )
            await self._wait_gateway_listening()
        except BaseException:
            await self.stop()
            raise

    async def add_pod(self, index: int, *, ttl: int = 10) -> PodRegistration:
        backend = SampleBackend(
            pod_host(index), self.pod_port, pod_instance_id(index), self.rest_port
        )
        await backend.start()
        reg = PodRegistration(self.etcd, self.layout, backend.instance_id, backend.host, ttl=ttl)
        await reg.register()
        self.backends.append(backend)
        self.registrations.append(reg)
        return reg

    def spawn_sample(self, index: int) -> str:
        """Start sample pod ``index`` as a process of its own, registered in etcd under
        its own lease (``lease_ttl``); see wait_node."""
        iid = pod_instance_id(index)
        args = [
            *(sys.executable, "-m", "modelxds.localmesh.sample", "--host", pod_host(index)),
            *("--port", str(self.pod_port), "--rest-port", str(self.rest_port)),
            *("--instance-id", iid, "--etcd", self.etcd_url, "--lease-ttl", str(self.lease_ttl)),
            *("--root-prefix", self.layout.root_prefix),
            *("--service-name", self.layout.service_name),
        ]
        proc = processes.spawn(iid, args, self.workdir)
        self.nodes[iid] = proc
        self.processes.append(proc)
        return iid

    def spawn_node(self, index: int) -> str:
        """Start mesh node ``index`` (its MLServer comes up with it); see wait_node."""
        host, iid = pod_host(index), pod_instance_id(index)
        if self.storage_dir is None:
            raise ValueError("a mesh node needs storage_dir (the sample models)")
        http_port, grpc_port, metrics_port = self.node_ports or (
            processes.free_port(host),
            processes.free_port(host),
            processes.free_port(host),
        )
        args = [
            sys.executable,
            "-m",
            "modelxds.localmesh.node",
            "--host",
            host,
            "--port",
            str(self.pod_port),
            "--rest-port",
            str(self.rest_port),
            "--instance-id",
            iid,
            "--etcd",
            self.etcd_url,
            "--root-prefix",
            self.layout.root_prefix,
            "--service-name",
            self.layout.service_name,
            "--storage",
            f"localMinIO={self.storage_dir}",
            "--capacity",
            str(self.node_capacity),
            "--lease-ttl",
            str(self.lease_ttl),
            "--runtime-http-port",
            str(http_port),
            "--runtime-grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
            "--workdir",
            str(self.workdir / iid),
        ]
        if index == 0:
            args.append("--leader")  # drives InferenceService transitions, as ModelMesh's leader
        proc = processes.spawn(iid, args, self.workdir)
        self.nodes[iid] = proc
        self.node_metrics_ports[iid] = metrics_port
        self.processes.append(proc)
        return iid

    async def wait_node(self, instance_id: str, timeout: float = 120) -> None:
        index = int(instance_id.rsplit("pod", 1)[1])
        await asyncio.to_thread(
            processes.wait_for_port,
            self.nodes[instance_id],
            pod_host(index),
            self.pod_port,
            timeout,
        )

    def node_counters(self, instance_id: str) -> dict[str, float]:
        """The node's Prometheus counters, by metric name (labels dropped)."""
        index = int(instance_id.rsplit("pod", 1)[1])
        text = processes.admin_get(
            f"{pod_host(index)}:{self.node_metrics_ports[instance_id]}", "/metrics"
        )
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name.split("{", 1)[0]] = float(value)
        return out

    def rest_address(self, instance_id: str) -> str:
        """host:port of a pod's KServe V2 REST proxy (sample or mesh node)."""
        return f"{pod_host(int(instance_id.rsplit('pod', 1)[1]))}:{self.rest_port}"

    def pod_addresses(self) -> dict[str, str]:
        """instance id -> host:port of every pod, sample or mesh node."""
        ids = list(self.nodes) or [b.instance_id for b in self.backends]
        return {iid: f"{pod_host(int(iid.rsplit('pod', 1)[1]))}:{self.pod_port}" for iid in ids}

    async def isvc_status(self) -> list[dict[str, Any]]:
        """`modelxds mesh status` rows, read from etcd now."""
        watcher = PlacementWatcher(self.etcd_url, [("mesh", self.layout)])
        await watcher.list_once()
        return isvc.status_rows(watcher.tables[0].vmodels, watcher.snapshot().meshes["mesh"])

    def pod(self, instance_id: str) -> tuple[SampleBackend, PodRegistration]:
        for b, r in zip(self.backends, self.registrations, strict=True):
            if b.instance_id == instance_id:
                return b, r
        raise KeyError(instance_id)

    def stop_serve(self) -> None:
        """Stop `modelxds serve`: the gateways keep their last config, cut off from the
        control plane, until start_serve."""
        for proc in [p for p in self.processes if p.name == "modelxds"]:
            proc.stop()
            self.processes.remove(proc)

    async def start_serve(self, xds_port: int = 0, metrics_port: int = 0) -> Process:
        """`modelxds serve` again, on the same ports, after stop_serve; given other ports,
        another replica beside the stack's (stop_serve leaves it running)."""
        return await self._start_serve(xds_port, metrics_port)

    async def _start_serve(self, xds_port: int = 0, metrics_port: int = 0) -> Process:
        xds_port, metrics_port = xds_port or self.xds_port, metrics_port or self.metrics_port
        policy = self.workdir / "policy.yaml"
        policy.write_text(self.policy_text or seed_policy(self.gateway_port, self.pod_port))
        policy_args = ("--policy", str(policy)) if self.policy_file else ()
        own = xds_port == self.xds_port
        proc = processes.spawn(
            "modelxds" if own else f"modelxds-{xds_port}",
            [
                sys.executable,
                "-m",
                "modelxds.cli",
                "serve",
                "--etcd",
                self.etcd_url,
                "--root-prefix",
                self.layout.root_prefix,
                "--service-name",
                self.layout.service_name,
                *policy_args,
                "--xds-address",
                f"127.0.0.1:{xds_port}",
                "--metrics-address",
                f"127.0.0.1:{metrics_port}",
                "--listen-address",
                self.listen_address,
                "--rest-port",
                str(self.rest_port),
                "--policy-poll-ms",
                str(self.policy_poll_ms),
                *self.serve_args,
            ],
            self.workdir,
        )
        self.processes.append(proc)
        await asyncio.to_thread(processes.wait_for_port, proc, "127.0.0.1", xds_port)
        return proc

    async def add_epp_gateway(
        self,
        target_port: int,
        *,
        app_protocol: str = "kubernetes.io/h2c",
        gateway_port: int = 0,
        admin_port: int = 0,
        metrics_port: int = 0,
        policy_text: str | None = None,
        failure_mode: str | None = None,
    ) -> EppGateway:
        """`modelxds epp` for the pods' ``target_port`` and an Envoy from `modelxds bootstrap
        --epp` in front of it; the pool is the pods started so far. The policy is the
        stack's unless ``policy_text`` is given."""
        n = len(self.epp_gateways)
        gw = EppGateway(
            epp_port=processes.free_port(),
            gateway_port=gateway_port or processes.free_port(),
            admin_port=admin_port or processes.free_port(),
            metrics_port=metrics_port or processes.free_port(),
        )
        policy = self.workdir / f"policy-epp-{n}.yaml"
        policy.write_text(
            policy_text or self.policy_text or seed_policy(self.gateway_port, self.pod_port)
        )
        gw.epp = processes.spawn(
            f"epp-{n}",
            [
                sys.executable,
                *("-m", "modelxds.cli", "epp", "--etcd", self.etcd_url),
                *("--root-prefix", self.layout.root_prefix),
                *("--service-name", self.layout.service_name, "--policy", str(policy)),
                *("--epp-address", f"127.0.0.1:{gw.epp_port}", "--plaintext"),
                *("--target-port", str(target_port)),
                *("--metrics-address", f"127.0.0.1:{gw.metrics_port}"),
            ],
            self.workdir,
        )
        self.processes.append(gw.epp)
        await asyncio.to_thread(processes.wait_for_port, gw.epp, "127.0.0.1", gw.epp_port)
        indexes = range(self.pods)
        config = epp_bootstrap(
            f"127.0.0.1:{gw.epp_port}",
            [f"{pod_host(i)}:{target_port}" for i in indexes],
            admin_address=f"127.0.0.1:{gw.admin_port}",
            listen_address=self.listen_address,
            listen_port=gw.gateway_port,
            node_id=f"epp-gateway-{n}",
            epp_plaintext=True,
            failure_mode=failure_mode or self.epp_failure_mode,
            app_protocol=app_protocol,
        )
        gw.envoy = processes.start_envoy(
            f"envoy-epp-{n}", config, self.workdir, concurrency=self.gateway_workers
        )
        self.processes.append(gw.envoy)
        self.epp_gateways.append(gw)
        return gw

    async def _wait_gateway_listening(self, timeout: float = 30) -> None:
        async def listening() -> bool:
            # admin lists a listener while it still warms (waits for its routes), before
            # it accepts connections: ask the port itself
            host, port = self.gateway.rsplit(":", 1)
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await wait_until(listening, timeout, f"gateway listener on port {self.gateway_port}")

    def metrics(self) -> str:
        return processes.admin_get(f"127.0.0.1:{self.metrics_port}", "/metrics")

    async def stop(self) -> None:
        for reg in self.registrations:
            with contextlib.suppress(Exception):
                await reg.stop(revoke=False)
        for backend in self.backends:
            await backend.stop(0)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()


@dataclass
class EppGateway:
    """An endpoint picker and the Envoy that asks it (`Stack.add_epp_gateway`)."""

    epp_port: int
    gateway_port: int
    admin_port: int
    metrics_port: int
    epp: processes.Process | None = None
    envoy: processes.Process | None = None

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def metrics(self) -> str:
        return processes.admin_get(f"127.0.0.1:{self.metrics_port}", "/metrics")


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
