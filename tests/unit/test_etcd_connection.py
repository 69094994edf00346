"""The etcd connection document ModelMesh Serving keeps in its model-serving-etcd secret."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelxds import cli
from modelxds.placement.etcd import (
    Endpoint,
    EtcdConfigError,
    EtcdConnection,
    EtcdSession,
    _fatal,
    _token_rejected,
    auth_related,
    describe,
)

PASSWORD = "pw-d0-not-print"
KEY_BODY = "S3CRETKEYMATERIAL"
CA = "-----BEGIN CERTIFICATE-----\nQ0FDRVJU\n-----END CERTIFICATE-----\n"
CERT = "-----BEGIN CERTIFICATE-----\nQ0xJRU5U\n-----END CERTIFICATE-----\n"
KEY = f"-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n-----END PRIVATE KEY-----\n"


def write(folder: Path, doc: dict[str, Any], name: str = "etcd_connection") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


def assert_no_secrets(text: str) -> None:
    assert PASSWORD not in text
    assert KEY_BODY not in text


def error_of(path: Path) -> str:
    with pytest.raises(EtcdConfigError) as e:
        EtcdConnection.from_file(path)
    assert_no_secrets(str(e.value))
    return str(e.value)


def test_every_field_with_files_relative_to_the_documents_folder(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "ca.pem").write_text(CA)
    (secret / "client.crt").write_text(CERT)
    (secret / "client.key").write_text(KEY)
    path = write(
        secret,
        {
            "endpoints": "https://etcd-0:2379, https://etcd-1:2379,",
            "userid": "root",
            "password": PASSWORD,
            "root_prefix": "modelmesh-serving",
            "certificate_file": "ca.pem",
            "client_key_file": "client.key",
            "client_certificate_file": str(secret / "client.crt"),  # absolute works too
            "override_authority": "etcd.example",
        },
    )
    c = EtcdConnection.from_file(path)
    assert c.endpoints == (
        Endpoint("https://etcd-0:2379", "etcd-0:2379", tls=True),
        Endpoint("https://etcd-1:2379", "etcd-1:2379", tls=True),
    )
    assert (c.userid, c.password, c.root_prefix) == ("root", PASSWORD, "modelmesh-serving")
    assert c.ca_certificate == CA.encode()
    assert c.client_certificate == CERT.encode()
    assert c.client_key == KEY.encode()
    assert c.override_authority == "etcd.example"
    assert c.source == str(path)
    assert c.display == "https://etcd-0:2379,https://etcd-1:2379"
    for shown in (repr(c), str(c), f"{c}"):
        assert_no_secrets(shown)
        assert "root" in shown and "etcd-0:2379" in shown


def test_embedded_pem_needs_no_files(tmp_path: Path) -> None:
    doc = {"endpoints": "https://e:1", "certificate": CA, "client_certificate": CERT}
    c = EtcdConnection.from_json(json.dumps({**doc, "client_key": KEY}))
    assert (c.ca_certificate, c.client_certificate, c.client_key) == (
        CA.encode(),
        CERT.encode(),
        KEY.encode(),
    )
    assert c.userid is None and c.password is None and c.root_prefix is None
    assert_no_secrets(repr(c))


def test_only_endpoints_is_required_and_bare_endpoints_follow_the_certificate() -> None:
    plain = EtcdConnection.from_json('{"endpoints": "etcd:2379,10.0.0.1,[::1]:2380"}')
    assert plain.endpoints == (
        Endpoint("http://etcd:2379", "etcd:2379", tls=False),
        Endpoint("http://10.0.0.1:2379", "10.0.0.1:2379", tls=False),
        Endpoint("http://[::1]:2380", "[::1]:2380", tls=False),
    )
    # as etcd-java: a bare endpoint is TLS exactly when a certificate is configured
    tls = EtcdConnection.from_json(json.dumps({"endpoints": "etcd:2379", "certificate": CA}))
    assert tls.endpoints == (Endpoint("https://etcd:2379", "etcd:2379", tls=True),)


def test_http_endpoints_stay_plaintext_with_a_certificate_and_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    doc = {"endpoints": "http://etcd:2379", "certificate": CA, "password": PASSWORD}
    with caplog.at_level(logging.WARNING):
        c = EtcdConnection.from_json(json.dumps(doc))
    assert c.endpoints == (Endpoint("http://etcd:2379", "etcd:2379", tls=False),)
    assert "plaintext" in caplog.text
    # a password without a user id authenticates nobody, as in etcd-java
    assert c.password is None and "without userid" in caplog.text
    assert_no_secrets(caplog.text)


def test_unknown_fields_are_ignored_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    doc = {"endpoints": "http://e:1", "compose_deployment": "x", "tls_mode": "TLS"}
    with caplog.at_level(logging.WARNING):
        EtcdConnection.from_json(json.dumps(doc))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "compose_deployment, tls_mode" in warnings[0].getMessage()


def test_from_url_takes_several_endpoints() -> None:
    c = EtcdConnection.from_url("http://a:1, https://b:2/")
    assert [(e.url, e.tls) for e in c.endpoints] == [("http://a:1", False), ("https://b:2", True)]
    assert c.userid is None and c.ca_certificate is None


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({}, "endpoints: required"),
        ({"endpoints": " , "}, "endpoints: no endpoint given"),
        ({"endpoints": 5}, "endpoints: must be a string"),
        ({"endpoints": "unix:///run/etcd.sock"}, "only http:// and https://"),
        ({"endpoints": "http://a:99999"}, "bad port"),
        ({"endpoints": "http://a:1/v3"}, "expected [http[s]://]host[:port]"),
        ({"endpoints": "[::1:2379"}, "expected [http[s]://]host[:port]"),
        ({"endpoints": "::1:2379"}, "put an IPv6 address in brackets"),
        ({"endpoints": "e:1", "certificate": CA, "certificate_file": "ca.pem"}, "not both"),
        ({"endpoints": "e:1", "certificate": "not pem"}, "certificate: no PEM certificate"),
        ({"endpoints": "e:1", "client_key": KEY}, "client_key given without client_certificate"),
        (
            {"endpoints": "e:1", "client_certificate": CERT},
            "client_certificate given without client_key",
        ),
        (
            {"endpoints": "e:1", "client_certificate": CERT, "client_key": f"x{KEY_BODY}x"},
            "client_key: no PEM private key",
        ),
        (
            {"endpoints": "e:1", "client_certificate": CERT, "client_key": KEY, "password": 7},
            "password: must be a string",
        ),
        (
            {
                "endpoints": "e:1",
                "client_certificate": CERT,
                "client_key": KEY.replace("PRIVATE", "ENCRYPTED PRIVATE"),
            },
            "encrypted private keys are not supported",
        ),
    ],
)
def test_errors_name_the_field(tmp_path: Path, doc: dict[str, Any], says: str) -> None:
    doc = {"userid": "root", "password": PASSWORD, **doc}
    message = error_of(write(tmp_path, doc))
    assert says in message
    assert str(tmp_path / "etcd_connection") in message


def test_unreadable_files_are_named_by_path(tmp_path: Path) -> None:
    path = write(tmp_path, {"endpoints": "https://e:1", "certificate_file": "missing/ca.pem"})
    message = error_of(path)
    assert f"certificate_file {tmp_path / 'missing' / 'ca.pem'}: cannot read" in message
    (tmp_path / "cert.pem").write_text(CERT)
    path = write(
        tmp_path,
        {"endpoints": "e:1", "client_certificate_file": "cert.pem", "client_key_file": "k.pem"},
    )
    assert f"client_key_file {tmp_path / 'k.pem'}: cannot read" in error_of(path)
    assert "cannot read" in error_of(tmp_path / "no-such-document")


def test_malformed_json_names_the_position_not_the_content(tmp_path: Path) -> None:
    path = tmp_path / "etcd_connection"
    path.write_text('{"endpoints": "e:1", "password": "' + PASSWORD + '" "userid": "root"}')
    assert "not valid JSON" in error_of(path)
    path.write_text(json.dumps(["endpoints"]))
    assert "not a JSON object" in error_of(path)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "details", "says", "fatal"),
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: authentication failed, invalid user ID or password",
            "authentication failed for user 'root'",
            True,
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2379: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer",
            "certificate verify failed (check certificate/certificate_file)",
            True,
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2379: "
            "Custom verification check failed with error: UNAUTHENTICATED: Hostname "
            "Verification Check failed.",
            "check override_authority",
            True,
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "last error: UNKNOWN: ipv4:127.0.0.1:2379: Tls handshake failed "
            "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:10000412:SSL routines:"
            "OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE",
            "check client_key/client_certificate",
            True,
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: user name is empty",
            "etcd requires authentication",
            True,
        ),
        # a JWT issued before a user/role change, refused again after a fresh login:
        # retrying can help (the next Authenticate gets a current token)
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: revision of auth store is old",
            "etcd refused the auth token of user 'root'",
            False,
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: invalid auth token",
            "etcd refused the auth token of user 'root'",
            False,
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "etcdserver: permission denied",
            "user 'root' is not allowed to read here: etcdserver: permission denied",
            True,
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2: "
            "Failed to connect to remote host: Connection refused",
            "ipv4:127.0.0.1:2: Failed to connect to remote host: Connection refused",
            False,
        ),
    ],
)
def test_rpc_errors_are_explained_in_one_line(
    code: grpc.StatusCode, details: str, says: str, fatal: bool
) -> None:
    c = EtcdConnection.from_json(
        json.dumps({"endpoints": "https://e:1", "userid": "root", "password": PASSWORD})
    )
    e = _rpc_error(code, details)
    text = describe(e, c)
    assert says in text and "\n" not in text
    assert_no_secrets(text)
    assert _fatal(e) is fatal


@pytest.mark.parametrize(
    ("code", "details", "rejected", "related"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: revision of auth store is old", 1, 1),
        (grpc.StatusCode.UNKNOWN, "auth: revision in header is old", 1, 1),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: invalid auth token", 1, 1),
        (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: anything", 1, 1),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty", 1, 1),
        (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", 0, 1),
        (grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: authentication is not enabled", 0, 1),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader", 0, 0),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided", 0, 0),
    ],
)
def test_which_errors_cost_the_token(
    code: grpc.StatusCode, details: str, rejected: int, related: int
) -> None:
    e = _rpc_error(code, details)
    assert _token_rejected(e) is bool(rejected)  # EtcdSession.call logs in again, retries
    assert auth_related(e) is bool(related)  # PlacementWatcher.run forgets the token


async def test_session_rotates_endpoints_and_drops_the_token() -> None:
    s = EtcdSession(EtcdConnection.from_url("http://a:1,http://b:2"))
    assert s.endpoint.url == "http://a:1"
    assert await s.metadata() is None  # no user: no token, no Authenticate call
    s.rotate()
    assert s.endpoint.url == "http://b:2"
    s.rotate()
    assert s.endpoint.url == "http://a:1"


def test_cli_reads_the_connection_file_and_its_root_prefix(tmp_path: Path) -> None:
    path = write(tmp_path, {"endpoints": "http://10.0.0.1:2379", "root_prefix": "rp-from-file"})
    args = cli.build_parser().parse_args(["placement", "--etcd-connection", str(path)])
    assert [lay.root_prefix for _, lay in cli._layouts(args)] == ["rp-from-file"]
    assert cli.etcd_connection(args).display == "http://10.0.0.1:2379"
    assert args.etcd == "http://10.0.0.1:2379"  # what messages name
    args = cli.build_parser().parse_args(
        ["placement", "--etcd-connection", str(path), "--root-prefix", "rp-flag"]
    )
    assert [lay.root_prefix for _, lay in cli._layouts(args)] == ["rp-flag"]
    default = cli.build_parser().parse_args(["placement"])
    assert cli.etcd_connection(default).display == cli.DEFAULT_ETCD


def test_cli_refuses_etcd_and_a_connection_file_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {"endpoints": "http://10.0.0.1:2379"})
    args = cli.build_parser().parse_args(
        ["serve", "--etcd", "http://x:1", "--etcd-connection", str(path)]
    )
    with pytest.raises(SystemExit) as e:
        cli.etcd_connection(args)
    assert e.value.code == 2
    assert "not both" in capsys.readouterr().err


def test_cli_reports_a_bad_connection_file_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {"userid": "root", "password": PASSWORD})
    args = cli.build_parser().parse_args(["serve", "--etcd-connection", str(path)])
    with pytest.raises(SystemExit) as e:
        cli._layouts(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "endpoints: required" in err
    assert_no_secrets(err)


def test_help_shows_the_flag_and_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {"endpoints": "e:1", "password": PASSWORD})
    monkeypatch.setenv("MODELXDS_ETCD_CONNECTION", str(path))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--etcd-connection" in out and "MODELXDS_ETCD_CONNECTION" in out
    assert_no_secrets(out)


# ---- user info in endpoint URLs: never echoed --------------------------------------------

URL_SECRET = "s3cret-in-url"


@pytest.mark.parametrize(
    "endpoints",
    [
        f"https://root:{URL_SECRET}@etcd:2379",
        f"root:{URL_SECRET}@etcd:2379",
        f"http://a:1, https://root:{URL_SECRET}@etcd:2379",
        # the password itself holds ',' and '@': no split point is safe to show
        "https://root:s3,cret-in-url@x@etcd:2379",
        f"https://root:{URL_SECRET}@/",
    ],
)
def test_user_info_in_an_endpoint_is_refused_without_echoing_it(
    tmp_path: Path, endpoints: str
) -> None:
    with pytest.raises(EtcdConfigError) as e:
        EtcdConnection.from_url(endpoints)
    message = str(e.value)
    for part in (URL_SECRET, "s3", "cret", "root"):
        assert part not in message
    assert "userid and password" in message and message.startswith("--etcd: ")
    doc = {"endpoints": endpoints, "userid": "root", "password": PASSWORD}
    message = error_of(write(tmp_path, doc))
    assert URL_SECRET not in message and "s3" not in message and "cret" not in message
    assert "endpoints: user info (user:password@) is not allowed" in message


def test_cli_names_no_password_given_in_the_etcd_url(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["serve", "--etcd", f"https://root:{URL_SECRET}@e:1"])
    with pytest.raises(SystemExit) as e:
        cli.etcd_connection(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--etcd: user info" in err and URL_SECRET not in err and "root" not in err


# ---- hostile documents: always an EtcdConfigError naming the field ----------------------


@pytest.mark.parametrize(
    ("endpoints", "says"),
    [
        ("h:²", "bad port '²'"),  # str.isdigit() takes it, int() does not
        ("h:٣", "bad port"),  # int() would read 3
        ("h:" + "1" * 5000, "bad port"),  # past int()'s digit limit
        ("http://:2379", "bad host ''"),
        ("http://a b:1", "bad host 'a b'"),
        ("http://a\x00b:1", "bad host"),
        ("http://é:1", "bad host"),
        ("[::1]x", "expected [http[s]://]host[:port]"),
    ],
)
def test_bad_hosts_and_ports_are_config_errors(endpoints: str, says: str) -> None:
    with pytest.raises(EtcdConfigError, match="--etcd: ") as e:
        EtcdConnection.from_url(endpoints)
    assert says in str(e.value)


LONE = "\ud800"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"endpoints": f"http://h{LONE}:1"}, "endpoints"),
        ({"endpoints": "e:1", "userid": f"ro{LONE}ot"}, "userid"),
        ({"endpoints": "e:1", "userid": "root", "password": f"{PASSWORD}{LONE}"}, "password"),
        ({"endpoints": "e:1", "root_prefix": f"rp{LONE}"}, "root_prefix"),
        ({"endpoints": "e:1", "override_authority": f"a{LONE}"}, "override_authority"),
        ({"endpoints": "e:1", "certificate": CA.replace("Q0FD", f"Q0FD{LONE}")}, "certificate"),
        ({"endpoints": "e:1", "certificate_file": f"ca{LONE}.pem"}, "certificate_file"),
        (
            {"endpoints": "e:1", "client_certificate": CERT, "client_key": KEY + LONE},
            "client_key",
        ),
    ],
)
def test_a_lone_surrogate_names_the_field_not_its_value(
    tmp_path: Path, doc: dict[str, Any], field: str
) -> None:
    # json.dumps writes the surrogate as the escape \ud800, which json.loads reads back
    message = error_of(write(tmp_path, doc))
    # the field and the reason, nothing of the value
    assert message.endswith(f": {field}: not valid Unicode text (a lone surrogate)")


def test_hostile_json_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "etcd_connection"
    deep = 200_000
    path.write_text('{"endpoints": ' + "[" * deep + "]" * deep + "}")
    assert "nested too deeply" in error_of(path)
    path.write_text('{"endpoints": 1' + "0" * 5000 + "}")
    assert "a number is too long" in error_of(path)
    path.write_bytes(b'{"endpoints": "\xff"}')
    assert "not UTF-8" in error_of(path)


def test_files_must_be_small_regular_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.pem")  # opening it must not wait for a writer
    (tmp_path / "dir.pem").mkdir()
    (tmp_path / "big.pem").write_bytes(CA.encode() + b"x" * (1024 * 1024))
    for name, says in [
        ("fifo.pem", "cannot read: not a regular file"),
        ("dir.pem", "cannot read: not a regular file"),
        ("big.pem", "larger than 1024 KiB"),
        ("nul\x00.pem", "cannot read: not a valid file name"),
    ]:
        path = write(tmp_path, {"endpoints": "e:1", "certificate_file": name})
        assert f"certificate_file {tmp_path / name}: {says}" in error_of(path)
    os.mkfifo(tmp_path / "fifo.json")
    assert "not a regular file" in error_of(tmp_path / "fifo.json")


_HOSTILE_TEXT = st.lists(
    st.characters() | st.sampled_from([LONE, "\udfff", "\x00", "@", ":", ",", "²", "[", "]"]),
    max_size=30,
).map("".join)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_HOSTILE_TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            name: _JSON | _HOSTILE_TEXT
            for name in (
                "endpoints",
                "userid",
                "password",
                "root_prefix",
                "certificate",
                "client_key",
                "client_certificate",
                "override_authority",
            )
        },
    )
)
def test_any_document_parses_or_is_a_config_error(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    try:
        c = EtcdConnection.from_json(text)
    except EtcdConfigError as e:
        message = str(e)
        message.encode()  # printable as it is
        password = doc.get("password")
        others = repr({k: v for k, v in doc.items() if k != "password"})
        if isinstance(password, str) and len(password) > 3 and password not in others:
            assert password not in message
        return
    # what parsed can be used: every text encodes, every endpoint makes a channel
    for value in (c.userid, c.password, c.root_prefix, c.override_authority):
        if value is not None:
            value.encode()
    for endpoint in c.endpoints:
        endpoint.target.encode()
