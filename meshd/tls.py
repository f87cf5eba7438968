# -*- test-case-name: tests.test_tls -*-
"""TLS for the node's client listeners: what an ``ssl:`` endpoint string says, with AEAD suites only.

Twisted's ``ssl:`` endpoint offers its default cipher list, which for TLS
1.2 still includes CBC suites with SHA-1 MACs, and its description has no
way to say otherwise.  :func:`listener` turns an ``ssl:`` description into
the same listener built by hand: a ``tcp:`` endpoint whose connections are
wrapped in TLS 1.2 or newer, limited to ECDHE with AES-GCM or
ChaCha20-Poly1305 (TLS 1.3 suites are all AEAD).  Other descriptions are
returned as they are.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from OpenSSL.SSL import Connection
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, Certificate, CertificateOptions, PrivateCertificate, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from meshd.config import split_endpoint

#: The TLS 1.2 suites meshd accepts, on client listeners and mesh links.
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS of one ``ssl:`` listener: its certificate, key and chain, which a reload reads again.

    Each new connection uses what was read last; connections up keep theirs.
    """

    def __init__(self, cert: str, key: str, chain: Optional[str]) -> None:
        self.files = (cert, key, chain)
        self.options = self.read()

    def read(self) -> CertificateOptions:
        """The TLS options the files give now; raise if they cannot be read or do not match."""
        cert, key, chain = self.files
        own = PrivateCertificate.loadPEM(_read(cert) + b"\n" + _read(key))
        # The chain: extraCertChain's certificates, or those after the first in certKey (a fullchain file).
        chain_pems = _PEM_CERTIFICATE.findall(_read(chain)) if chain else _PEM_CERTIFICATE.findall(_read(cert))[1:]
        extra = [Certificate.loadPEM(pem).original for pem in chain_pems]
        return CertificateOptions(
            privateKey=own.privateKey.original,
            certificate=own.original,
            extraCertChain=extra or None,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(AEAD_CIPHERS),
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )

    def use(self, options: CertificateOptions) -> None:
        """Serve new connections with ``options`` (from :meth:`read`)."""
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol) -> Connection:
        return Connection(self.options.getContext(), None)


def listener(description: str, factory) -> "tuple[str, Any, Optional[ServerTLS]]":
    """The endpoint description and factory that serve ``description`` (see the module), and the
    listener's :class:`ServerTLS` (None for other than ``ssl:``)."""
    parts = split_endpoint(description)
    if parts[0].lower() != "ssl":
        return description, factory, None
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    positional = [p for p in parts[1:] if "=" not in p]
    port = options.pop("port", None) or (positional[0] if positional else "443")
    key = options.pop("privateKey")
    cert = options.pop("certKey", key)
    chain = options.pop("extraCertChain", None)
    options.pop("sslmethod", None)  # TLS 1.2 or newer, whatever it says
    options.pop("dhParameters", None)  # ECDHE only: no finite-field Diffie-Hellman
    tls = ServerTLS(cert, key, chain)
    tcp = ":".join(["tcp", port, *(f"{k}={v.replace(':', chr(92) + ':')}" for k, v in options.items())])
    return tcp, TLSMemoryBIOFactory(tls, False, factory), tls
