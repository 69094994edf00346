"""The endpoint picker's serving certificate: the operator's files, or a self-signed one
made at start, as the GIE chart runs its EPP (gateways reach it with TLS and do not
verify it: Istio's DestinationRule says ``insecureSkipVerify: true``)."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc


def server_credentials(cert_file: str | None, key_file: str | None) -> grpc.ServerCredentials:
    if bool(cert_file) != bool(key_file):
        raise ValueError("give both --cert-file and --key-file, or neither")
    if cert_file and key_file:
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    else:
        cert, key = self_signed()
    return grpc.ssl_server_credentials([(key, cert)])


def self_signed(host: str = "modelxds-epp") -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM), valid for ten years."""
    # imported here: only a picker serving TLS without files needs it
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
