# -*- test-case-name: tests.test_mesh_security tests.test_tls -*-
"""Mutual TLS for mesh links: both sides present a certificate the cluster CA signed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

# The TLS layer of links (records of one write gathered into one send()) is
# meshd._io.LinkTLSFactory.


class CredentialsError(ValueError):
    """A certificate or key file that cannot be used."""


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

    def server_options(self) -> CertificateOptions:
        """For the mesh listener: require a client certificate the CA signed; TLS 1.2 or newer."""
        return CertificateOptions(
            privateKey=self.own.privateKey.original,
            certificate=self.own.original,
            trustRoot=trustRootFromCertificates([self.ca]),
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )

    def client_options(self, hostname: str):
        """For dialing ``hostname``: check its certificate and name; present ours."""
        return optionsForClientTLS(
            hostname,
            trustRoot=trustRootFromCertificates([self.ca]),
            clientCertificate=self.own,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )
