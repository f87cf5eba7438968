# -*- test-case-name: tests.test_units -*-
"""Turning the token of a Hello frame into a principal."""

from __future__ import annotations

import hashlib
import hmac
from typing import Mapping, Optional

from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer


class IAuthenticator(Interface):
    """Checks the credentials a client presents in its Hello frame."""

    def authenticate(token: str) -> "Optional[str] | Deferred[Optional[str]]":
        """Return the principal the token proves, or ``None`` if it proves nothing."""


@implementer(IAuthenticator)
class TokenAuthenticator:
    """A fixed table of principals and their tokens, from the configuration.

    A token is stored either as plain text or as ``"sha256:<hex digest>"`` of
    the token, so that the configuration file need not hold the secret.
    Comparison takes the same time whatever the token.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._digests = [(principal, _digest_of(stored)) for principal, stored in tokens.items()]

    def authenticate(self, token: str) -> Optional[str]:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for principal, stored in self._digests:
            if hmac.compare_digest(digest, stored):
                found = principal
        return found


@implementer(IAuthenticator)
class DevelopmentAuthenticator:
    """Development mode: any token is accepted, as principal ``"dev"``."""

    def authenticate(self, token: str) -> Optional[str]:
        return "dev"


def _digest_of(stored: str) -> bytes:
    if stored.startswith("sha256:"):
        return bytes.fromhex(stored[len("sha256:"):])
    return hashlib.sha256(stored.encode("utf-8")).digest()
