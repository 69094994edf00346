"""The command line as an operator uses it: bootstrap Envoy accepts, flags from env, placement."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelxds import cli
from modelxds.localmesh import processes


def _modelxds(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelxds.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_bootstrap_is_a_config_envoy_accepts(tmp_path: Path) -> None:
    out = _modelxds(
        "bootstrap",
        "--xds",
        "127.0.0.1:18000",
        "--node-id",
        "gw-a",
        "--admin-address",
        "127.0.0.1:15000",
    )
    assert out.returncode == 0, out.stderr
    config = tmp_path / "bootstrap.yaml"
    config.write_text(out.stdout)
    check = subprocess.run(
        [processes.binary("envoy"), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "gw-a" in out.stdout


def test_bootstrap_rejects_a_bad_address() -> None:
    out = _modelxds("bootstrap", "--xds", "no-port-here")
    assert out.returncode == 2
    assert "expected HOST:PORT" in out.stderr and "no-port-here" in out.stderr


def test_every_serve_flag_is_documented_with_its_environment_variable() -> None:
    out = _modelxds("serve", "--help")
    assert out.returncode == 0
    help_text = " ".join(out.stdout.split())
    for flag in (
        "--etcd",
        "--root-prefix",
        "--service-name",
        "--policy",
        "--xds-address",
        "--metrics-address",
        "--debounce-quiet-ms",
        "--debounce-max-ms",
        "--loaded-after-ms",
    ):
        assert flag in help_text
        assert "MODELXDS_" + flag[2:].upper().replace("-", "_") in help_text


def test_flags_default_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELXDS_ETCD", "http://10.1.2.3:2379")
    monkeypatch.setenv("MODELXDS_ROOT_PREFIX", "rp-a, rp-a/mm_ns/team-b")
    monkeypatch.setenv("MODELXDS_DEBOUNCE_QUIET_MS", "25")
    args = cli.build_parser().parse_args(["serve"])
    assert args.etcd == "http://10.1.2.3:2379"
    assert args.debounce_quiet_ms == 25
    assert [(ns, lay.root_prefix) for ns, lay in cli._layouts(args)] == [
        ("modelmesh-serving", "rp-a"),
        ("team-b", "rp-a/mm_ns/team-b"),
    ]
    # a flag on the command line still wins over the environment
    assert cli.build_parser().parse_args(["serve", "--etcd", "http://x:1"]).etcd == "http://x:1"


def test_serve_reports_an_invalid_policy_and_exits(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
        "metadata: {name: vs}\nspec: {http: [{route: []}]}\n"
    )
    out = _modelxds("serve", "--policy", str(bad), "--metrics-address", "")
    assert out.returncode == 2
    assert "policy.yaml" in out.stderr and "document 1" in out.stderr


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = processes.free_port()
    proc = processes.start_etcd(tmp_path_factory.mktemp("etcd"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def _put(etcd: str, key: str, value: str) -> None:
    subprocess.run(
        [processes.binary("etcdctl"), "--endpoints", etcd, "put", key, value],
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_placement_shows_what_the_server_sees(etcd: str) -> None:
    rp = "rp-placement/mm/modelmesh-serving"
    _put(etcd, f"{rp}/instances/7dd689-4zwqs", '{"startTime":1,"zone":"z1"}')
    _put(
        etcd,
        "rp-placement/litelinks/modelmesh-serving/100.96.35.150_8080_1",
        '{"hostname":"100.96.35.150","instanceId":"7dd689-4zwqs","port":8080}',
    )
    _put(etcd, f"{rp}/registry/mnist__isvc-1", '{"instanceIds":{"7dd689-4zwqs":1,"gone-pod":1}}')
    _put(
        etcd,
        f"{rp}/vmodels/example-mnist-isvc",
        '{"o":"isvc","amid":"mnist__isvc-1","tmid":"mnist__isvc-2"}',
    )
    _put(etcd, f"{rp}/registry/broken", "not json")

    out = _modelxds("placement", "--etcd", etcd, "--root-prefix", "rp-placement", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    mesh = report["namespaces"]["modelmesh-serving"]
    assert mesh["instances"]["7dd689-4zwqs"]["address"] == "100.96.35.150"
    assert mesh["models"]["mnist__isvc-1"]["loaded"] == ["7dd689-4zwqs"]
    assert mesh["models"]["mnist__isvc-1"]["dead"] == ["gone-pod"]
    assert mesh["vmodels"]["example-mnist-isvc"]["state"] == "InProgress"
    assert mesh["vmodels"]["example-mnist-isvc"]["routable"] == ["7dd689-4zwqs"]
    assert list(report["invalid_records"]) == [f"{rp}/registry/broken"]

    text = _modelxds("placement", "--etcd", etcd, "--root-prefix", "rp-placement")
    assert "vmodel example-mnist-isvc -> mnist__isvc-1 (InProgress" in text.stdout
    assert "skipped malformed record" in text.stdout


def test_placement_shows_fields_it_ignored_in_records_it_kept(etcd: str) -> None:
    rp = "rp-ignored/mm/modelmesh-serving"
    pod = f"{rp}/instances/7dd689-4zwqs"
    _put(etcd, pod, '{"startTime":1,"vers":"abc","rpm":2}')
    _put(
        etcd,
        "rp-ignored/litelinks/modelmesh-serving/100.96.35.150_8080_1",
        '{"hostname":"100.96.35.150","instanceId":"7dd689-4zwqs","port":8080}',
    )

    out = _modelxds("placement", "--etcd", etcd, "--root-prefix", "rp-ignored", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report) == {"revision", "namespaces", "invalid_records", "ignored_fields"}
    assert report["invalid_records"] == {}
    assert list(report["ignored_fields"]) == [pod]
    assert "'vers'" in report["ignored_fields"][pod]
    # the record is kept: the pod still serves
    assert list(report["namespaces"]["modelmesh-serving"]["instances"]) == ["7dd689-4zwqs"]

    text = _modelxds("placement", "--etcd", etcd, "--root-prefix", "rp-ignored")
    assert text.returncode == 0, text.stderr
    assert f"kept record {pod}, ignoring field 'vers'" in text.stdout
    assert "skipped malformed record" not in text.stdout


def test_placement_names_an_unreachable_etcd() -> None:
    port = processes.free_port()
    out = _modelxds("placement", "--etcd", f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr
