"""TLS on the xDS port: the server's certificate and, for mutual TLS, the CA that signs the
gateways' client certificates; and the client side for our own tools (`modelxds status`).

Every file is read and checked when the command starts, so a wrong path, a key that is
not the certificate's or a CA file without a certificate fails there, with the flag and
the file named, and not as a failed handshake later. Messages name files, never what
is in them: a private key never reaches a log.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes


class TlsConfigError(ValueError):
    """A TLS flag names a file that cannot serve; the message names flag and file."""


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise TlsConfigError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None


def _certificates(flag: str, path: str) -> tuple[bytes, list[x509.Certificate]]:
    data = _read(flag, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"{flag} {path}: no PEM certificate in it") from None
    return data, certs


def _private_key(flag: str, path: str) -> tuple[bytes, PrivateKeyTypes]:
    data = _read(flag, path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise TlsConfigError(
            f"{flag} {path}: the key is encrypted; give it unencrypted (PEM)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsConfigError(f"{flag} {path}: no PEM private key in it") from None
    return data, key


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_pair(cert_flag: str, cert_path: str, key_flag: str, key_path: str) -> tuple[bytes, bytes]:
    """(private key PEM, certificate chain PEM), checked to belong together: the first
    certificate of the chain is the key's."""
    chain, certs = _certificates(cert_flag, cert_path)
    key, private = _private_key(key_flag, key_path)
    if _spki(certs[0].public_key()) != _spki(private.public_key()):
        raise TlsConfigError(
            f"{key_flag} {key_path} is not the private key of the certificate in "
            f"{cert_flag} {cert_path}"
        )
    return key, chain


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None
) -> grpc.ServerCredentials | None:
    """What `serve` listens with: None (plaintext) when no flag is given; TLS with
    ``--xds-tls-cert``/``--xds-tls-key``; mutual TLS with ``--xds-client-ca`` too."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise TlsConfigError(
            "give --xds-tls-cert and --xds-tls-key together"
            + (" (--xds-client-ca is asked of clients in a TLS handshake)" if client_ca else "")
        )
    pair = key_pair("--xds-tls-cert", cert, "--xds-tls-key", key)
    if not client_ca:
        return grpc.ssl_server_credentials([pair])
    roots, _ = _certificates("--xds-client-ca", client_ca)
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=True)


def channel_credentials(ca: str, cert: str | None, key: str | None) -> grpc.ChannelCredentials:
    """How our tools reach a TLS xDS server: the CA to trust (``--tls-ca``) and, for
    mutual TLS, the client certificate and key (``--tls-cert``, ``--tls-key``)."""
    if bool(cert) != bool(key):
        raise TlsConfigError("give --tls-cert and --tls-key together")
    roots, _ = _certificates("--tls-ca", ca)
    if cert and key:
        private, chain = key_pair("--tls-cert", cert, "--tls-key", key)
        return grpc.ssl_channel_credentials(roots, private, chain)
    return grpc.ssl_channel_credentials(roots)
