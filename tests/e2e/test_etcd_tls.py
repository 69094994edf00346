"""modelxds against an etcd that wants mutual TLS and a password, as ModelMesh Serving sets up.

One real etcd serves most tests here: TLS with a server certificate for 127.0.0.1 and
localhost, client certificates required (``--client-cert-auth``), authentication on
(user root) and simple tokens that expire after 2 idle seconds. The certificates are
made at test time; the client certificate's common name is not an etcd user, so only
the password can authenticate us. A second one, set up the same way, issues JWTs
(``--auth-token jwt``), which etcd refuses once its users or roles change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aetcd import rpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh import processes
from modelxds.localmesh.sample import SampleBackend
from modelxds.localmesh.stack import seed_policy, wait_until
from modelxds.modelmesh import (
    InstanceRecord,
    Layout,
    LitelinksRecord,
    ModelRecord,
    Table,
    encode,
)
from modelxds.modelmesh.keys import litelinks_item
from modelxds.placement.etcd import EtcdConnection, EtcdSession, EtcdUnavailable
from modelxds.placement.watch import PlacementWatcher
from modelxds.xds.bootstrap import bootstrap
from tests.certs import Certs, make_certs

pytestmark = pytest.mark.e2e

PASSWORD = "tls-e2e-Pa55word"
TOKEN_TTL_S = 2
NS = "modelmesh-serving"
LONG_AGO = int(time.time() * 1000) - 600_000  # a load that started long ago: loaded


# ---- a TLS etcd with authentication ---------------------------------------------------


@dataclass
class SecureEtcd:
    workdir: Path
    port: int
    peer_port: int
    certs: Certs
    proc: processes.Process | None = None
    auth_token: str = "simple"  # etcd's --auth-token

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        c = self.certs
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = processes.spawn(
            "etcd-tls",
            [
                processes.binary("etcd"),
                "--name",
                "tls",
                "--data-dir",
                str(self.workdir / "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"tls={peer}",
                "--cert-file",
                str(c.server_cert),
                "--key-file",
                str(c.server_key),
                "--trusted-ca-file",
                str(c.ca),
                "--client-cert-auth",
                "--auth-token",
                self.auth_token,
                "--auth-token-ttl",
                str(TOKEN_TTL_S),
                "--log-level",
                "warn",
            ],
            self.workdir,
        )
        processes.wait_for_port(self.proc, "127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def etcdctl(self, *args: str) -> None:
        c = self.certs
        subprocess.run(
            [
                processes.binary("etcdctl"),
                "--endpoints",
                self.url,
                "--cacert",
                str(c.ca),
                "--cert",
                str(c.client_cert),
                "--key",
                str(c.client_key),
                *args,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )


def _secure_etcd(workdir: Path, auth_token: str = "simple") -> Iterator[SecureEtcd]:
    server = SecureEtcd(
        workdir,
        processes.free_port(),
        processes.free_port(),
        make_certs(workdir / "certs"),
        auth_token=auth_token,
    )
    server.start()
    try:
        server.etcdctl("user", "add", "root", f"--new-user-password={PASSWORD}")
        server.etcdctl("auth", "enable")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    yield from _secure_etcd(tmp_path_factory.mktemp("etcd-tls"))


@pytest.fixture(scope="module")
def jwt_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    """The same etcd issuing JWTs: each carries the auth store revision it was issued
    at, so any user/role/grant change makes etcd refuse every earlier one."""
    workdir = tmp_path_factory.mktemp("etcd-jwt")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (workdir / "jwt.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (workdir / "jwt.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    yield from _secure_etcd(
        workdir,
        f"jwt,pub-key={workdir / 'jwt.pub'},priv-key={workdir / 'jwt.key'},sign-method=RS256",
    )


def connection_file(etcd: SecureEtcd, folder: Path, root_prefix: str, **changes: str) -> Path:
    """conn.json as ModelMesh Serving's secret holds it, with the PEM files beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for pem in ("ca.pem", "other-ca.pem", "client.crt", "client.key"):
        (folder / pem).write_bytes((etcd.certs.folder / pem).read_bytes())
    doc = {
        "endpoints": etcd.url,
        "userid": "root",
        "password": PASSWORD,
        "root_prefix": root_prefix,
        "certificate_file": "ca.pem",
        "client_key_file": "client.key",
        "client_certificate_file": "client.crt",
        **changes,
    }
    path = folder / "conn.json"
    path.write_text(json.dumps(doc))
    return path


@contextlib.asynccontextmanager
async def session(connection: EtcdConnection) -> AsyncIterator[EtcdSession]:
    s = EtcdSession(connection)
    channel = s.open()
    try:
        yield s
    finally:
        await channel.close()


async def put(s: EtcdSession, key: str, value: bytes) -> None:
    kv = rpc.KVStub(s.channel)
    await s.call(kv.Put, rpc.PutRequest(key=key.encode(), value=value), timeout=10)


POD_ID, POD_HOST = "7dd689-tlsaa", "127.0.9.7"


async def write_pod_and_model(s: EtcdSession, layout: Layout, model: str) -> None:
    """A live pod (litelinks + instance record) holding ``model``, as ModelMesh writes it."""
    iid, host = POD_ID, POD_HOST
    started = int(time.time() * 1000)
    reg = LitelinksRecord(hostname=host, instance_id=iid, port=8080, registration_time=started)
    await put(s, layout.key(Table.LITELINKS, litelinks_item(host, 8080, started)), encode(reg))
    await put(s, layout.key(Table.INSTANCES, iid), encode(InstanceRecord(start_time=started)))
    record = ModelRecord(instance_ids={iid: LONG_AGO})
    await put(s, layout.key(Table.REGISTRY, model), encode(record))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MODELXDS_")}


def modelxds(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelxds.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


# ---- tests ----------------------------------------------------------------------------


async def test_placement_reads_through_mutual_tls_and_authentication(
    etcd: SecureEtcd, tmp_path: Path
) -> None:
    conn = connection_file(etcd, tmp_path / "secret", "rp-tls-placement")
    async with session(EtcdConnection.from_file(conn)) as s:
        await write_pod_and_model(s, Layout("rp-tls-placement"), "mnist__isvc-1")
    # root_prefix comes from the connection file: no --root-prefix
    out = modelxds("placement", "--etcd-connection", str(conn), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["namespaces"][NS]["models"]["mnist__isvc-1"]["loaded"] == ["7dd689-tlsaa"]
    assert PASSWORD not in out.stdout + out.stderr


async def test_serve_routes_what_it_reads_through_a_real_envoy(
    etcd: SecureEtcd, tmp_path: Path
) -> None:
    conn = connection_file(etcd, tmp_path / "secret", "rp-tls-serve")
    async with session(EtcdConnection.from_file(conn)) as s:
        await write_pod_and_model(s, Layout("rp-tls-serve"), "served-model")
    pod = SampleBackend(POD_HOST, processes.free_port(POD_HOST), POD_ID)
    await pod.start()
    gateway_port, xds, admin = (processes.free_port() for _ in range(3))
    policy = tmp_path / "policy.yaml"
    policy.write_text(seed_policy(gateway_port, pod.port))
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelxds.cli",
                "serve",
                "--etcd-connection",
                str(conn),
                "--policy",
                str(policy),
                "--listen-address",
                "127.0.0.1",
                "--xds-address",
                f"127.0.0.1:{xds}",
                "--metrics-address",
                "",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    envoy = processes.start_envoy(
        "envoy", bootstrap(f"127.0.0.1:{xds}", "gateway-0", f"127.0.0.1:{admin}"), tmp_path
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def routed() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    await stub.ModelInfer(
                        pb.ModelInferRequest(model_name="served-model"),
                        metadata=(("model", "served-model"),),
                        timeout=2,
                    )
                except grpc.aio.AioRpcError:
                    return False
                return pod.served["served-model"] > 0

            await wait_until(routed, 20, "a request routed to the pod read over TLS")
        assert f"watching etcd {etcd.url}: {NS}=rp-tls-serve" in log.read_text()
    finally:
        envoy.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        await pod.stop()
    assert PASSWORD not in log.read_text()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"password": "not-the-password"}, "authentication failed for user 'root'"),
        ({"certificate_file": "other-ca.pem"}, "TLS handshake failed: certificate verify failed"),
    ],
    ids=["wrong-password", "wrong-ca"],
)
def test_serve_fails_at_start_on_a_wrong_password_or_ca(
    etcd: SecureEtcd, tmp_path: Path, change: dict[str, str], says: str
) -> None:
    conn = connection_file(etcd, tmp_path / "secret", "rp-tls-wrong", **change)
    started = time.monotonic()
    out = modelxds(
        "serve",
        "--etcd-connection",
        str(conn),
        "--xds-address",
        f"127.0.0.1:{processes.free_port()}",
        "--metrics-address",
        "",
        timeout=20,
    )
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 10
    assert f"etcd {etcd.url}: {says}" in out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR modelxds" in line]
    assert len(errors) == 1, out.stderr  # one clear line
    for secret in (PASSWORD, "not-the-password"):
        assert secret not in out.stdout + out.stderr


async def test_watcher_outlives_its_auth_token(
    etcd: SecureEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = Layout("rp-tls-token")
    connection = EtcdConnection.from_file(connection_file(etcd, tmp_path / "secret", "x"))
    watcher = PlacementWatcher(connection, [(NS, layout)], loaded_after_ms=0, max_backoff=0.5)

    async def sees(model: str) -> None:
        while model not in watcher.snapshot().meshes[NS].models:
            watcher.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher.changed.wait(), 0.25)

    caplog.set_level(logging.INFO, logger="modelxds.placement")
    task = asyncio.create_task(watcher.run())
    try:
        async with session(connection) as writer:
            other = PlacementWatcher(connection, [(NS, layout)])
            await asyncio.wait_for(watcher.synced.wait(), 10)
            await other.list_once()
            await asyncio.sleep(TOKEN_TTL_S + 1)  # both tokens idle: expired
            await write_pod_and_model(writer, layout, "after-expiry")
            await asyncio.wait_for(sees("after-expiry"), 5)
            assert "authenticating again" not in caplog.text  # the open watch goes on

            # A unary call with the expired token: etcd refuses it, we authenticate again.
            await other.list_once()
            assert "auth token refused" in caplog.text
            assert "authenticating again" in caplog.text
            assert "after-expiry" in other.snapshot().meshes[NS].models

            # etcd restarts: simple tokens are gone, the stream breaks, the watcher
            # re-lists with a token etcd no longer knows, and authenticates again.
            caplog.clear()
            etcd.stop()
            etcd.start()
            writer.forget_token()
            await write_pod_and_model(writer, layout, "after-restart")
            await asyncio.wait_for(sees("after-restart"), 10)
            assert "authenticating again" in caplog.text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert PASSWORD not in caplog.text


async def test_a_dead_endpoint_is_left_for_the_next(etcd: SecureEtcd, tmp_path: Path) -> None:
    dead = f"https://127.0.0.1:{processes.free_port()}"
    conn = connection_file(
        etcd, tmp_path / "secret", "rp-tls-rotate", endpoints=f"{dead},{etcd.url}"
    )
    connection = EtcdConnection.from_file(conn)
    layout = Layout("rp-tls-rotate")
    watcher = PlacementWatcher(connection, [(NS, layout)], max_backoff=0.2)
    await watcher.check()  # the start-up check tries every endpoint
    await watcher.list_once()
    assert watcher.endpoint == etcd.url
    watcher = PlacementWatcher(connection, [(NS, layout)], max_backoff=0.2)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 5)
        assert watcher.endpoint == etcd.url
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sees(watcher: PlacementWatcher, model: str) -> None:
    while model not in watcher.snapshot().meshes[NS].models:
        watcher.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher.changed.wait(), 0.25)


async def test_jwts_issued_before_a_user_change_are_replaced(
    jwt_etcd: SecureEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = Layout("rp-jwt")
    connection = EtcdConnection.from_file(connection_file(jwt_etcd, tmp_path / "secret", "x"))
    watcher = PlacementWatcher(connection, [(NS, layout)], loaded_after_ms=0, max_backoff=0.5)
    caplog.set_level(logging.INFO, logger="modelxds.placement")
    task = asyncio.create_task(watcher.run())
    try:
        async with session(connection) as writer:
            other = PlacementWatcher(connection, [(NS, layout)])
            await asyncio.wait_for(watcher.synced.wait(), 10)
            await other.list_once()  # both hold a JWT now

            # any auth change bumps the auth store revision: both JWTs are now "old"
            jwt_etcd.etcdctl(
                "--user", f"root:{PASSWORD}", "user", "add", "someone", "--new-user-password=x"
            )
            await asyncio.wait_for(other.list_once(), 10)
            assert "is old" in caplog.text  # etcd's words for a JWT from before the change

            # a JWT outlives an etcd restart: the watcher re-lists with its old one, is
            # refused, and must log in again rather than retry that token forever
            caplog.clear()
            jwt_etcd.stop()
            jwt_etcd.start()
            writer.forget_token()
            await write_pod_and_model(writer, layout, "after-user-change")
            await asyncio.wait_for(_sees(watcher, "after-user-change"), 15)
            assert "is old" in caplog.text  # etcd's words for a JWT from before the change
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert PASSWORD not in caplog.text


async def test_check_names_the_prefix_a_role_may_not_read(etcd: SecureEtcd, tmp_path: Path) -> None:
    layout = Layout("rp-tls-role")
    as_root = ("--user", f"root:{PASSWORD}")
    etcd.etcdctl(*as_root, "role", "add", "mm-only")
    etcd.etcdctl(
        *as_root, "role", "grant-permission", "mm-only", "--prefix", "read", layout.mm_prefix
    )
    etcd.etcdctl(*as_root, "user", "add", "mm-reader", "--new-user-password=reader-Pa55")
    etcd.etcdctl(*as_root, "user", "grant-role", "mm-reader", "mm-only")
    conn = connection_file(
        etcd, tmp_path / "secret", "rp-tls-role", userid="mm-reader", password="reader-Pa55"
    )
    watcher = PlacementWatcher(EtcdConnection.from_file(conn), [(NS, layout)])
    # mm/ alone is readable: a check of the first prefix only would pass, and every
    # re-list would then fail on litelinks/
    with pytest.raises(EtcdUnavailable) as e:
        await watcher.check()
    assert e.value.fatal
    assert f"user 'mm-reader' is not allowed to read keys under {layout.litelinks_prefix!r}" in str(
        e.value
    )
    assert "reader-Pa55" not in str(e.value)
    etcd.etcdctl(
        *as_root, "role", "grant-permission", "mm-only", "--prefix", "read", layout.litelinks_prefix
    )
    await watcher.check()
