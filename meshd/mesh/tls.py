# -*- test-case-name: tests.test_mesh_trust tests.test_mesh_security tests.test_tls -*-
"""Mutual TLS for mesh links: both sides present a certificate the cluster CA signed.

A node certificate names its node: a URI subject alternative name
``meshd://node/UUID`` (:func:`meshd.mesh.certs.node_uri`, written by
``meshctl certs node``).  A link whose LinkHello claims another node id than
its peer's certificate names is refused (:meth:`meshd.mesh.service.Mesh.check_hello`).

TLS 1.2 is limited to forward-secret AEAD suites (ECDHE with AES-GCM or
ChaCha20-Poly1305); TLS 1.3, whose suites all are, stays as OpenSSL offers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from uuid import UUID

from cryptography import x509
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from meshd.mesh.certs import IdentityError, node_id_of
from meshd.tls import AEAD_CIPHERS

__all__ = ["Credentials", "CredentialsError", "IdentityError", "LINK_CIPHERS", "node_id_of", "peer_certificate"]

# The TLS layer of links (records of one write gathered into one send()) is
# meshd._io.LinkTLSFactory.

#: The TLS 1.2 suites links accept (TLS 1.3 suites are not chosen by this string).
LINK_CIPHERS = AEAD_CIPHERS
_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(LINK_CIPHERS)


class CredentialsError(ValueError):
    """A certificate or key file that cannot be used."""


def peer_certificate(transport) -> Optional[x509.Certificate]:
    """The certificate the other end of a TLS ``transport`` presented, or None (no TLS, no certificate)."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    return cert.to_cryptography() if cert is not None else None


@dataclass(frozen=True)
class Credentials:
    ca: Certificate
    own: PrivateCertificate

    @classmethod
    def load(cls, ca: "str | Path", cert: "str | Path", key: "str | Path") -> "Credentials":
        def read(path: "str | Path", what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise CredentialsError(f"{path}: cannot read the {what}: {e.strerror}") from None

        try:
            ca_cert = Certificate.loadPEM(read(ca, "cluster CA certificate"))
        except Exception as e:
            raise CredentialsError(f"{ca}: not a PEM certificate: {e}") from None
        try:
            own = PrivateCertificate.loadPEM(read(cert, "node certificate") + b"\n" + read(key, "node key"))
        except Exception as e:
            raise CredentialsError(f"{cert} / {key}: not a PEM certificate and matching key: {e}") from None
        return cls(ca_cert, own)

    @property
    def node_id(self) -> Optional[UUID]:
        """The node id this node's own certificate names (None if none); :class:`IdentityError` if ambiguous."""
        return node_id_of(self.own.original.to_cryptography())

    def check_node(self, node_id: UUID, required: bool) -> None:
        """Raise :class:`CredentialsError` unless this node's certificate is fit for ``node_id``.

        It must name ``node_id``, or (when not ``required``) no node at all.
        """
        try:
            named = self.node_id
        except IdentityError as e:
            raise CredentialsError(f"mesh.cert: {e}") from None
        if named is None and required:
            raise CredentialsError(
                "mesh.cert names no node id, and peers refuse such certificates: issue one with "
                "`meshctl certs node --node-id ID`, or set mesh.require_node_id_in_cert = false"
            )
        if named is not None and named != node_id:
            raise CredentialsError(
                f"mesh.cert is the certificate of node {named}, but this node's id is {node_id}: "
                f'set [node] id = "{named}"'
            )

    def server_options(self) -> CertificateOptions:
        """For the mesh listener: require a client certificate the CA signed; TLS 1.2 or newer, AEAD suites."""
        return CertificateOptions(
            privateKey=self.own.privateKey.original,
            certificate=self.own.original,
            trustRoot=trustRootFromCertificates([self.ca]),
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableCiphers=_CIPHERS,
        )

    def client_options(self, hostname: str):
        """For dialing ``hostname``: check its certificate and name; present ours."""
        return optionsForClientTLS(
            hostname,
            trustRoot=trustRootFromCertificates([self.ca]),
            clientCertificate=self.own,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2, "acceptableCiphers": _CIPHERS},
        )
