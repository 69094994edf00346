"""Certificates made at test time: a CA, a server certificate for 127.0.0.1 and localhost,
and client certificates with the subject alternative names a test asks for."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(
    subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def authority(name: str) -> CA:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def leaf(
    ca: CA,
    name: str,
    usage: list[x509.ObjectIdentifier],
    names: Sequence[x509.GeneralName] = (),
) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) signed by ``ca``, common name ``name``."""
    key = _key()
    builder = _builder(name, ca[1].subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage(usage), critical=False
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return _pkcs8(key), pem(builder.sign(ca[0], hashes.SHA256()))


def sans(dns: Sequence[str] = (), uris: Sequence[str] = ()) -> list[x509.GeneralName]:
    """Subject alternative names: DNS names, then URIs (``spiffe://...``)."""
    return [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]


@dataclass(frozen=True)
class Certs:
    folder: Path
    ca: Path
    other_ca: Path  # trusted by nobody here
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of a client ``make_certs`` was asked for."""
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"


def make_certs(
    folder: Path, clients: Mapping[str, Sequence[x509.GeneralName]] | None = None
) -> Certs:
    """The CA, a server certificate, a client certificate without alternative names, and
    one more client certificate per ``clients`` entry: common name -> its names
    (``Certs.client(name)``); plus a CA nobody trusts, with a client of its own,
    ``stranger``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = authority("modelxds test CA")
    server_key, server_cert = leaf(
        ca,
        "etcd",
        [ExtendedKeyUsageOID.SERVER_AUTH],
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = leaf(ca, "modelxds-test-client", [ExtendedKeyUsageOID.CLIENT_AUTH])
    other = authority("someone else's CA")
    stranger_key, stranger_cert = leaf(other, "stranger", [ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "ca.pem": pem(ca[1]),
        "other-ca.pem": pem(other[1]),
        "server.crt": server_cert,
        "server.key": server_key,
        "client.crt": client_cert,
        "client.key": client_key,
        "stranger.crt": stranger_cert,
        "stranger.key": stranger_key,
    }
    for name, names in (clients or {}).items():
        key, cert = leaf(ca, name, [ExtendedKeyUsageOID.CLIENT_AUTH], names)
        files[f"{name}.crt"], files[f"{name}.key"] = cert, key
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Certs(
        folder,
        ca=folder / "ca.pem",
        other_ca=folder / "other-ca.pem",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
    )
