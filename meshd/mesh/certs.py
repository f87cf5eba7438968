# -*- test-case-name: tests.test_mesh_trust tests.test_mesh_security -*-
"""A cluster certificate authority and node certificates, for ``meshctl certs``.

Every node of a cluster presents a certificate signed by the cluster CA and
accepts only peers whose certificates that CA signed.  Node certificates
carry the DNS names and IP addresses the node is dialed by, since dialers
check them, and the node's id as a URI (``meshd://node/UUID``), since
peers refuse a link whose LinkHello claims another id.  Keys are ECDSA P-256.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Iterable, Optional
from uuid import UUID

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"

#: The prefix of the URI SAN that names a node in its certificate.  One colon
#: only: service_identity, which checks names when dialing, reads every URI
#: SAN as ``SCHEME:HOST`` and fails a certificate with a URN such as
#: ``urn:meshd:node:UUID``.
NODE_URI_PREFIX = "meshd://node/"


def node_uri(node_id: UUID) -> str:
    """The URI SAN that names ``node_id`` in its certificate."""
    return f"{NODE_URI_PREFIX}{node_id}"


class IdentityError(ValueError):
    """A certificate whose node id cannot be read: several, or one that is not a UUID."""


def node_id_of(cert: x509.Certificate) -> Optional[UUID]:
    """The node id ``cert`` names, or None if it names none; :class:`IdentityError` if it is ambiguous."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise IdentityError(f"the certificate's extensions cannot be read: {e}") from None
    uris = [u for u in names.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(NODE_URI_PREFIX)]
    if not uris:
        return None
    if len(uris) > 1:
        raise IdentityError(f"the certificate names {len(uris)} node ids")
    try:
        return UUID(uris[0][len(NODE_URI_PREFIX):])
    except ValueError:
        raise IdentityError(f"the certificate's node id {uris[0]!r} is not a UUID") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, private: bool) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(directory: Path, cluster: str, days: int = 3650) -> tuple[Path, Path]:
    """Create ``ca.pem`` and ``ca.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshd cluster CA {cluster}"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path, key_path


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _node_san(node_id: Optional[UUID]) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(node_uri(node_id))] if node_id is not None else []


def issue_node(
    directory: Path,
    name: str,
    sans: Iterable[str],
    days: int = 825,
    *,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
    ca_directory: Optional[Path] = None,
    node_id: Optional[UUID] = None,
) -> tuple[Path, Path]:
    """Issue ``NAME.pem`` and ``NAME.key`` in ``directory``, signed by the CA there.

    With ``node_id`` the certificate names that node (a URI SAN, see
    :func:`meshd.mesh.tls.node_uri`); without, it names none, which mesh
    peers refuse unless ``require_node_id_in_cert`` is off.
    """
    ca_directory = ca_directory or directory
    ca_cert = x509.load_pem_x509_certificate((ca_directory / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_directory / CA_KEY).read_bytes(), password=None)
    sans = list(sans) or [name]
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san(sans) + _node_san(node_id)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path, key_path
