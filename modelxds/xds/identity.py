"""Which node ids a gateway's client certificate lets it use (serve --xds-client-ca).

The CA proves a certificate is one of ours; this binds a gateway's node id to it, so a
gateway cannot pose as another in logs, `modelxds status` or anything keyed by node. A
node id is accepted when it is exactly one of the certificate's

* DNS subject alternative names,
* URI subject alternative names,
* last path segments of a ``spiffe://`` URI (``spiffe://td/ns/NS/sa/SA`` gives ``SA``,
  the service account of a workload identity),
* or its common name, when it has no subject alternative name at all (as gRPC itself
  treats the common name: the peer identity only of a certificate without SANs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

SPIFFE = "spiffe://"


@dataclass(frozen=True)
class Identity:
    """What one client certificate names."""

    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    common_name: str = ""
    # any subject alternative name (IP and email included): the common name no longer counts
    has_sans: bool = False

    @classmethod
    def from_pem(cls, pem: bytes) -> Identity:
        cert = x509.load_pem_x509_certificate(pem)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = None
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else ""
        return cls(
            dns=tuple(sans.get_values_for_type(x509.DNSName)) if sans else (),
            uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)) if sans else (),
            common_name=cn if isinstance(cn, str) else cn.decode(errors="replace"),
            has_sans=bool(sans and len(sans)),
        )

    @classmethod
    def of_peer(cls, auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
        """The identity of a gRPC peer, from ``ServicerContext.auth_context()``; no client
        certificate (a plaintext or one-way TLS peer) is an identity that allows nothing."""
        pems = auth_context.get("x509_pem_cert")
        return cls.from_pem(pems[0]) if pems else cls()

    def node_ids(self) -> dict[str, str]:
        """Every node id this certificate allows -> which part of it says so."""
        allowed: dict[str, str] = {}
        for name in self.dns:
            allowed.setdefault(name, "DNS SAN")
        for uri in self.uris:
            allowed.setdefault(uri, "URI SAN")
            segment = spiffe_name(uri)
            if segment:
                allowed.setdefault(segment, f"last segment of {uri}")
        if not self.has_sans and self.common_name:
            allowed.setdefault(self.common_name, "CN, no SANs")
        return allowed

    def allows(self, node_id: str) -> bool:
        return bool(node_id) and node_id in self.node_ids()

    def __str__(self) -> str:
        named = [f"{name!r} ({why})" for name, why in self.node_ids().items()]
        return ", ".join(named) or "none (no DNS or URI SAN, and no CN)"


def spiffe_name(uri: str) -> str:
    """The last path segment of a SPIFFE ID (``spiffe://trust-domain/path``), else ""."""
    if not uri.startswith(SPIFFE):
        return ""
    _, slash, path = uri[len(SPIFFE) :].partition("/")
    return path.rsplit("/", 1)[-1] if slash else ""
