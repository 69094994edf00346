"""How to reach etcd: endpoints, TLS and authentication, configured as ModelMesh Serving does.

ModelMesh Serving hands ModelMesh its etcd through the ``etcd_connection`` key of the
``model-serving-etcd`` secret: a JSON document in IBM etcd-java's schema (DESIGN §3).
`EtcdConnection.from_file` reads that document; `EtcdConnection.from_url` is the plain
``--etcd URL[,URL...]`` form. Both give the same immutable description; `EtcdSession`
is one client's use of it (which endpoint, which auth token).

Plaintext or TLS is decided per endpoint, as etcd-java's automatic TLS mode does:
``https://`` is TLS, ``http://`` is plaintext even when certificates are configured
(they are then unused, and a warning says so), and a bare ``host:port`` is TLS exactly
when TLS material (``certificate`` or a client certificate) is configured. etcd-java
takes that decision once, from the first endpoint; here each endpoint keeps its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aetcd import rpc

log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # one etcd transaction can carry many records
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
)

_KNOWN_FIELDS = frozenset(
    {
        "endpoints",
        "root_prefix",
        "userid",
        "password",
        "certificate",
        "certificate_file",
        "client_key",
        "client_key_file",
        "client_certificate",
        "client_certificate_file",
        "override_authority",
    }
)
# Never echoed in a message, whatever went wrong with them.
_SECRET_FIELDS = frozenset({"password", "client_key"})
# A Kubernetes Secret holds at most 1 MiB, so no real connection document or PEM file is
# larger; the limit keeps a path like /dev/zero from filling memory at start-up.
MAX_FILE_BYTES = 1024 * 1024
# A host name or IPv4 address, or an IPv6 address (with an optional zone) in brackets:
# what gRPC can resolve. ASCII only, so nothing unprintable ends up in a gRPC target.
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Za-z:.%_-]+\]")
# etcd's answers to a token it no longer accepts. Simple tokens expire when idle and
# vanish when etcd restarts ("invalid auth token", or "user name is empty" once etcd no
# longer knows the token's user); a JWT carries the auth store revision it was issued at,
# so any user, role or grant change makes every earlier JWT "old": INVALID_ARGUMENT
# "etcdserver: revision of auth store is old", or, from etcd 3.5's Range, UNKNOWN with
# the auth package's own text "auth: revision in header is old". A new token cures all.
_TOKEN_STALE = (
    "revision of auth store is old",
    "revision in header is old",
    "invalid auth token",
)
_TOKEN_REJECTED = (*_TOKEN_STALE, "user name is empty")
# gRPC metadata etcd reads on a Watch stream (rpctypes.MetadataRequireLeaderKey): without
# it a member cut off from quorum keeps the stream open and silent; with it etcd ends
# the stream ("no leader") as soon as the member loses its leader.
REQUIRE_LEADER: tuple[tuple[str, str], ...] = (("hasleader", "true"),)

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]


class EtcdConfigError(ValueError):
    """An etcd connection document or --etcd value that cannot be used."""


class EtcdUnavailable(Exception):
    """No endpoint answered; ``fatal`` when retrying cannot help (credentials, TLS)."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class Endpoint:
    url: str  # always with its scheme: what messages show
    target: str  # host:port, for gRPC
    tls: bool


@dataclass(frozen=True, repr=False)
class EtcdConnection:
    """Where etcd is and how to prove who we are; secrets never appear in str/repr."""

    endpoints: tuple[Endpoint, ...]
    root_prefix: str | None = None
    userid: str | None = None
    password: str | None = None
    ca_certificate: bytes | None = None  # PEM; None: the system's roots
    client_certificate: bytes | None = None  # PEM chain
    client_key: bytes | None = None  # PEM, PKCS#8
    override_authority: str | None = None  # TLS host name checked for every endpoint
    source: str | None = None  # the document it came from, for messages

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise EtcdConfigError("no etcd endpoint given")
        if (self.client_key is None) != (self.client_certificate is None):
            raise EtcdConfigError(
                "client_key and client_certificate must be given together (mutual TLS)"
            )

    @classmethod
    def from_url(cls, urls: str) -> EtcdConnection:
        """``--etcd``: one or more comma-separated endpoints, no TLS material, no user."""
        return cls(_parse_endpoints(urls, tls_material=False, what="--etcd"))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EtcdConnection:
        """An ``etcd_connection`` document; its file names are relative to its folder."""
        p = Path(path)
        text = _read_small_file(p, f"etcd connection {p}")
        return cls.from_json(text, base_dir=p.parent, source=str(p))

    @classmethod
    def from_json(
        cls,
        text: str | bytes,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        source: str = "etcd_connection",
    ) -> EtcdConnection:
        """Parse etcd-java's JSON schema (only ``endpoints`` is required)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            # e.msg and the position only: the document holds secrets
            raise EtcdConfigError(
                f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        except UnicodeDecodeError:
            raise EtcdConfigError(f"{source}: not valid JSON: not UTF-8 text") from None
        except RecursionError:
            # json recurses once per nesting level; no etcd_connection nests at all
            raise EtcdConfigError(f"{source}: not valid JSON: nested too deeply") from None
        except ValueError:
            # an integer past Python's digit limit; its message would quote the document
            raise EtcdConfigError(f"{source}: not valid JSON: a number is too long") from None
        if not isinstance(doc, dict):
            raise EtcdConfigError(f"{source}: not a JSON object")
        unknown = sorted(set(doc) - _KNOWN_FIELDS)
        if unknown:
            # repr escapes what a log line should not carry (lone surrogates, controls)
            names = ", ".join(repr(n[:80])[1:-1] for n in unknown)
            log.warning("%s: ignoring unknown fields: %s", source, names)
        fields = _Fields(doc, source, Path(base_dir) if base_dir is not None else None)
        ca = fields.pem("certificate", "CERTIFICATE")
        cert = fields.pem("client_certificate", "CERTIFICATE")
        key = fields.pem("client_key", "PRIVATE KEY")
        endpoints_text = fields.text("endpoints")
        if endpoints_text is None:
            raise EtcdConfigError(f"{source}: endpoints: required")
        endpoints = _parse_endpoints(
            endpoints_text,
            tls_material=ca is not None or cert is not None,
            what=f"{source}: endpoints",
        )
        userid, password = fields.text("userid"), fields.text("password")
        if password is not None and userid is None:
            # etcd-java authenticates only with a user id; keep its behaviour, visibly
            log.warning("%s: password given without userid: not authenticating", source)
            password = None
        if key is not None and cert is None:
            raise EtcdConfigError(f"{source}: client_key given without client_certificate")
        if cert is not None and key is None:
            raise EtcdConfigError(f"{source}: client_certificate given without client_key")
        tls_material = ca is not None or cert is not None
        if tls_material and not any(e.tls for e in endpoints):
            log.warning(
                "%s: certificates are configured but every endpoint is http://: "
                "connecting in plaintext (use https:// endpoints for TLS)",
                source,
            )
        return cls(
            endpoints,
            root_prefix=fields.text("root_prefix"),
            userid=userid,
            password=None if userid is None else (password or ""),
            ca_certificate=ca,
            client_certificate=cert,
            client_key=key,
            override_authority=fields.text("override_authority"),
            source=source,
        )

    @property
    def display(self) -> str:
        """The endpoints, comma-separated: what a log line names."""
        return ",".join(e.url for e in self.endpoints)

    def __repr__(self) -> str:
        parts = [f"endpoints={self.display!r}"]
        if self.root_prefix is not None:
            parts.append(f"root_prefix={self.root_prefix!r}")
        if self.userid is not None:
            parts.append(f"userid={self.userid!r}, password=<hidden>")
        if self.ca_certificate is not None:
            parts.append("certificate=<PEM>")
        if self.client_certificate is not None:
            parts.append("client_certificate=<PEM>, client_key=<hidden>")
        if self.override_authority is not None:
            parts.append(f"override_authority={self.override_authority!r}")
        return f"EtcdConnection({', '.join(parts)})"

    __str__ = __repr__

    def channel(self, endpoint: Endpoint) -> grpc.aio.Channel:
        """A new channel to ``endpoint`` (not yet connected)."""
        options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
        if not endpoint.tls:
            return grpc.aio.insecure_channel(endpoint.target, options=options)
        if self.override_authority:
            options.append(("grpc.ssl_target_name_override", self.override_authority))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_certificate,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )
        return grpc.aio.secure_channel(endpoint.target, credentials, options=options)


class _Fields:
    """Typed access to the document's fields, with errors that name the field."""

    def __init__(self, doc: Mapping[str, Any], source: str, base_dir: Path | None) -> None:
        self.doc, self.source, self.base_dir = doc, source, base_dir

    def text(self, name: str, *, raw: bool = False) -> str | None:
        value = self.doc.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise EtcdConfigError(f"{self.source}: {name}: must be a string")
        if not _is_utf8(value):
            # JSON's \ud800 escape gives a lone surrogate, which cannot be sent (gRPC,
            # protobuf) or opened as a file: refuse it now, without quoting the value
            raise EtcdConfigError(
                f"{self.source}: {name}: not valid Unicode text (a lone surrogate)"
            )
        # an empty value means unset, as in etcd-java; secrets and PEM stay byte for byte
        return (value if raw or name in _SECRET_FIELDS else value.strip()) or None

    def pem(self, name: str, kind: str) -> bytes | None:
        """``name`` (embedded PEM) or ``name_file`` (a PEM file), not both."""
        embedded, file_name = self.text(name, raw=True), self.text(f"{name}_file")
        if embedded is not None and file_name is not None:
            raise EtcdConfigError(f"{self.source}: give {name} or {name}_file, not both")
        if embedded is not None:
            data, where = embedded.encode(), name
        elif file_name is not None:
            path = Path(file_name).expanduser()
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            where = f"{name}_file {path}"
            data = _read_small_file(path, f"{self.source}: {where}")
        else:
            return None
        if f"-----BEGIN {kind}-----".encode() not in data and not (
            kind == "PRIVATE KEY" and b"PRIVATE KEY-----" in data
        ):
            raise EtcdConfigError(f"{self.source}: {where}: no PEM {kind.lower()} found")
        if kind == "PRIVATE KEY" and b"ENCRYPTED PRIVATE KEY" in data:
            raise EtcdConfigError(
                f"{self.source}: {where}: encrypted private keys are not supported"
            )
        return data


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _read_small_file(path: Path, where: str) -> bytes:
    """A regular file of at most MAX_FILE_BYTES; `EtcdConfigError` starting ``where``."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise EtcdConfigError(f"{where}: cannot read: {e.strerror}") from None
    except (ValueError, UnicodeError):  # a NUL in the name, or a name the OS cannot take
        raise EtcdConfigError(f"{where}: cannot read: not a valid file name") from None
    chunks: list[bytes] = []
    size = 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EtcdConfigError(f"{where}: cannot read: not a regular file")
        while size <= MAX_FILE_BYTES:  # one byte past the limit is enough to refuse
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise EtcdConfigError(f"{where}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise EtcdConfigError(f"{where}: larger than {MAX_FILE_BYTES // 1024} KiB")
    return b"".join(chunks)


def _parse_endpoints(text: str, *, tls_material: bool, what: str) -> tuple[Endpoint, ...]:
    if "@" in text:
        # user:password@host. A password may hold ',', '@' or anything else, so no part
        # of the value is known to be free of it: the message repeats none of it.
        raise EtcdConfigError(
            f"{what}: user info (user:password@) is not allowed in an endpoint URL; give "
            "userid and password in the etcd connection JSON (--etcd-connection)"
        )
    if not _is_utf8(text):
        raise EtcdConfigError(f"{what}: not valid Unicode text (a lone surrogate)")
    out = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        scheme, sep, rest = item.partition("://")
        if not sep:
            scheme, rest = "", item
        scheme = scheme.lower()
        if scheme not in ("", "http", "https"):
            raise EtcdConfigError(f"{what}: {item!r}: only http:// and https:// are supported")
        rest = rest.rstrip("/")
        if not rest or "/" in rest:
            raise EtcdConfigError(f"{what}: {item!r}: expected [http[s]://]host[:port]")
        host, port = _split_host_port(rest, item, what)
        tls = scheme == "https" or (scheme == "" and tls_material)
        target = f"{host}:{port}"
        out.append(Endpoint(f"{'https' if tls else 'http'}://{target}", target, tls))
    if not out:
        raise EtcdConfigError(f"{what}: no endpoint given")
    return tuple(out)


def _split_host_port(hostport: str, item: str, what: str) -> tuple[str, int]:
    if hostport.startswith("["):  # [IPv6]:port
        host, bracket, tail = hostport.partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise EtcdConfigError(f"{what}: {item!r}: expected [http[s]://]host[:port]")
        host, port_text = host + "]", tail.removeprefix(":")
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    elif ":" in hostport:
        raise EtcdConfigError(f"{what}: {item!r}: put an IPv6 address in brackets")
    else:
        host, port_text = hostport, ""
    if not _HOST.fullmatch(host):
        raise EtcdConfigError(f"{what}: {item!r}: bad host {host!r}")
    if not port_text:
        return host, DEFAULT_PORT
    # str.isdigit also takes '²' (int() refuses it) and '٣' (int() reads 3): ASCII only,
    # and short enough that int() never meets Python's digit limit
    if (
        not (port_text.isascii() and port_text.isdigit())
        or len(port_text) > 5
        or not 0 < int(port_text) < 65536
    ):
        raise EtcdConfigError(f"{what}: {item!r}: bad port {port_text!r}")
    return host, int(port_text)


def _token_rejected(e: grpc.aio.AioRpcError) -> bool:
    """etcd no longer accepts our token: authenticating again can cure it."""
    details = e.details() or ""
    return e.code() == grpc.StatusCode.UNAUTHENTICATED or any(s in details for s in _TOKEN_REJECTED)


def _stale_token(e: grpc.aio.AioRpcError) -> bool:
    """A token etcd once issued and now refuses (not a missing one: "user name is empty")."""
    details = e.details() or ""
    return e.code() == grpc.StatusCode.UNAUTHENTICATED or any(s in details for s in _TOKEN_STALE)


def auth_related(e: grpc.aio.AioRpcError) -> bool:
    """An error about who we are or what we may read: the token is suspect, drop it.

    Broader than `_token_rejected`: a permission error after a role change, or an auth
    error this code does not know yet, must not leave a retry loop resending the same
    token forever; a new one costs a single Authenticate call.
    """
    details = (e.details() or "").lower()
    return (
        _token_rejected(e)
        or e.code() == grpc.StatusCode.PERMISSION_DENIED
        or "auth" in details
        or "permission" in details
    )


def describe(
    e: grpc.aio.AioRpcError,
    connection: EtcdConnection,
    endpoint: Endpoint | None = None,
    prefix: str | None = None,
) -> str:
    """One line saying what went wrong and which setting to check.

    ``prefix``: the key prefix the failed call read, named by a permission error.
    """
    details = (e.details() or "").strip()
    code = e.code()
    where = f"keys under {prefix!r}" if prefix is not None else "here"
    if "authentication failed" in details:
        return f"authentication failed for user '{connection.userid}'"
    if "user name is empty" in details:
        return "etcd requires authentication: set userid and password (--etcd-connection)"
    if "authentication is not enabled" in details:
        return "authentication is not enabled on this etcd (remove userid/password)"
    if _stale_token(e):
        return f"etcd refused the auth token of user '{connection.userid}': {details}"
    if code == grpc.StatusCode.PERMISSION_DENIED and connection.userid is None:
        # with --client-cert-auth etcd takes the certificate's common name as the user
        return f"{details} reading {where}: no userid configured (set userid and password)"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"user '{connection.userid}' is not allowed to read {where}: {details}"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            "TLS handshake failed: certificate verify failed (check certificate/certificate_file)"
        )
    if "Hostname Verification" in details:
        name = connection.override_authority or "the endpoint's host"
        return (
            f"TLS handshake failed: the server certificate is not valid for {name} "
            "(check override_authority)"
        )
    if any(s in details for s in ("BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA")):
        return (
            "TLS handshake failed: the server rejected our client certificate "
            "(check client_key/client_certificate)"
        )
    if "handshake" in details.lower():
        return f"TLS handshake failed: {_last_error(details)}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    if details.endswith("Socket closed") and endpoint is not None and not endpoint.tls:
        return "the server closed the connection (if it serves TLS, use https://)"
    return _last_error(details) or code.name


def _last_error(details: str) -> str:
    # gRPC prefixes "failed to connect to all addresses; last error: UNKNOWN: ipv4:...:"
    _, sep, last = details.rpartition("last error: ")
    return last if sep else details


def _fatal(e: grpc.aio.AioRpcError) -> bool:
    """Fails the same way on retry: a configuration mistake, not an outage."""
    details = e.details() or ""
    if _stale_token(e):
        return False  # a JWT issued before a user or role change: the next one works
    if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
        return True
    if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "authentication" in details:
        return True
    return "handshake" in details.lower() or "Hostname Verification" in details


class EtcdSession:
    """One client's use of an `EtcdConnection`: the endpoint in use and its auth token.

    Used from one task at a time (the watcher's loop), so it needs no lock.
    """

    def __init__(self, connection: EtcdConnection) -> None:
        self.connection = connection
        self._index = 0
        self._token: str | None = None  # "" once etcd said auth is off
        self._channel: grpc.aio.Channel | None = None

    @property
    def endpoint(self) -> Endpoint:
        return self.connection.endpoints[self._index]

    def open(self) -> grpc.aio.Channel:
        """A new channel to the current endpoint; authentication goes over it."""
        self._channel = self.connection.channel(self.endpoint)
        return self._channel

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel `open` made last."""
        if self._channel is None:
            raise RuntimeError("EtcdSession.open() first")
        return self._channel

    def rotate(self) -> None:
        """Leave a failed endpoint for the next one."""
        self._index = (self._index + 1) % len(self.connection.endpoints)
        self._token = None

    def forget_token(self) -> None:
        self._token = None

    async def metadata(self, timeout: float = 10.0) -> Metadata | None:
        """The ``token`` metadata every KV/Watch call carries; authenticates when needed."""
        c = self.connection
        if c.userid is None:
            return None
        if self._token is None:
            try:
                resp = await rpc.AuthStub(self.channel).Authenticate(
                    rpc.AuthenticateRequest(name=c.userid, password=c.password or ""),
                    timeout=timeout,
                )
                self._token = resp.token
            except grpc.aio.AioRpcError as e:
                if "authentication is not enabled" not in (e.details() or ""):
                    raise
                log.warning(
                    "etcd %s: authentication is not enabled; using no token", self.endpoint.url
                )
                self._token = ""
        return (("token", self._token),) if self._token else None

    async def call(self, method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``method(*args, metadata=<token>, **kwargs)``: a unary call, retried once with
        a new token when etcd no longer accepts ours.

        A ``timeout`` bounds the Authenticate call too (at most its usual 10 s: a long
        deadline meant for a big Range should not let a hung Authenticate stall as long).
        """
        timeout = kwargs.get("timeout")
        auth_timeout = 10.0 if timeout is None else min(timeout, 10.0)
        try:
            return await method(*args, metadata=await self.metadata(auth_timeout), **kwargs)
        except grpc.aio.AioRpcError as e:
            if self.connection.userid is None or not _token_rejected(e):
                raise
            why = e.details() or e.code().name
        log.info(
            "etcd %s: auth token refused (%s); authenticating again",
            self.endpoint.url,
            why,
        )
        self.forget_token()
        return await method(*args, metadata=await self.metadata(auth_timeout), **kwargs)


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


async def check_connection(
    connection: EtcdConnection, prefixes: Sequence[str], *, timeout: float = 3.0
) -> Endpoint:
    """Authenticate and read one key under each prefix, trying each endpoint until one
    answers all of them.

    Every prefix is read because etcd grants permissions per key range: a user that may
    read one prefix and not the next would pass a one-prefix check and then fail every
    re-list forever. ``timeout`` bounds each endpoint's whole check, Authenticate
    included. Returns the endpoint that answered; raises `EtcdUnavailable` naming every
    endpoint that failed and why (``fatal`` when one failed for a reason retrying can't
    fix), and the prefix a permission error was about.
    """
    problems: list[str] = []
    fatal = False
    session = EtcdSession(connection)
    loop = asyncio.get_running_loop()
    for _ in connection.endpoints:
        endpoint = session.endpoint
        channel = session.open()
        deadline = loop.time() + timeout
        prefix: str | None = None
        try:
            kv = rpc.KVStub(channel)
            for prefix in prefixes or ("\0",):
                key = prefix.encode()
                req = rpc.RangeRequest(
                    key=key, range_end=prefix_range_end(key), limit=1, keys_only=True
                )
                # what is left of this endpoint's time; a spent budget fails at once
                left = max(deadline - loop.time(), 0.001)
                await session.call(kv.Range, req, timeout=left)
            return endpoint
        except grpc.aio.AioRpcError as e:
            fatal |= _fatal(e)
            problems.append(f"etcd {endpoint.url}: {describe(e, connection, endpoint, prefix)}")
        finally:
            await channel.close()
        session.rotate()
    raise EtcdUnavailable("; ".join(problems), fatal=fatal)
