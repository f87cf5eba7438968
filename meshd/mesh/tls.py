# -*- test-case-name: tests.test_mesh -*-
"""Mutual TLS for mesh links: both sides present a certificate the cluster CA signed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from OpenSSL.SSL import WantReadError
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from meshd.session import write_now


class LinkTLSProtocol(TLSMemoryBIOProtocol):
    """TLS for a link, whose records go to the kernel as soon as they are made.

    Twisted's TLS layer writes its records to the TCP transport, which
    keeps them until the reactor polls again (and meanwhile may read and
    handle another batch of publishes), registering for write events and
    unregistering once written: two ``epoll_ctl`` calls per write.  Here the
    records of one write (one per 16 KiB) are gathered and handed to
    :func:`~meshd.session.write_now` together: one ``send()`` per flush.
    """

    _gathered: "list[bytes] | None" = None

    def _write(self, data: bytes) -> None:
        self._gathered = gathered = []
        try:
            super()._write(data)
        finally:
            self._gathered = None
            if gathered:
                self._send(b"".join(gathered))

    def _flushSendBIO(self) -> None:
        try:
            records = self._tlsConnection.bio_read(2**15)
        except WantReadError:  # nothing to send
            return
        if self._gathered is not None:
            self._gathered.append(records)
        else:
            self._send(records)

    def _send(self, records: bytes) -> None:
        if self._aborted:
            # What an aborted connection says goes nowhere, as with Twisted's own.
            self.transport.write(records)
        else:
            write_now(self.transport, records)


class LinkTLSFactory(TLSMemoryBIOFactory):
    """TLS for links, without Twisted's aggregation of small writes.

    A link already gathers its frames of one reactor turn into one write;
    Twisted's default TLS transport would hold that write for one more
    reactor iteration, which under load is a whole batch of publishes later.
    """

    protocol = LinkTLSProtocol


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
