# -*- test-case-name: tests.test_units -*-
"""Turning the token of a Hello (or Refresh) frame into a principal.

Three authenticators are built in: the static table of ``[auth.tokens]``
(:class:`TokenAuthenticator`), JWTs verified with PyJWT as ``[auth.jwt]``
says (:class:`JWTAuthenticator`, with :class:`JWKSKeys` for a key set
fetched over HTTP), and development mode's accept-anything.  With both
tokens and JWTs configured, :class:`TokensOrJWT` sends a token in the JWT
compact form to the JWT check and any other to the table.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from meshd.permissions import NO_GRANTS, Grants

if TYPE_CHECKING:
    from meshd.config import JWTSettings


@dataclass(frozen=True)
class Identity:
    """What a token proves: a principal, when the proof ends, and what the token itself grants."""

    principal: str
    #: When the token stops being valid, in the node clock's seconds (``exp`` plus the leeway);
    #: None: never.
    expires: Optional[float] = None
    #: Channel and watchable patterns granted by the token, beyond the rules.
    grants: Grants = NO_GRANTS


Proof = Union[str, Identity, None]


class IAuthenticator(Interface):
    """Checks the credentials a client presents in its Hello frame."""

    def authenticate(token: str) -> "Proof | Deferred[Proof]":
        """Return the principal the token proves (a ``str``, or an :class:`Identity` that also
        says when the proof expires and what it grants), or ``None`` if it proves nothing."""


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


# -- JWTs -------------------------------------------------------------------------


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` has the JWT compact form: three base64url parts joined by dots, the first
    a JSON object with an ``alg``."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(header, dict) and "alg" in header


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@implementer(IAuthenticator)
class JWTAuthenticator:
    """Verifies JWTs with PyJWT: signature, algorithm, ``aud``, ``iss``, and the times.

    A token proves its ``sub``; it must carry ``exp``.  ``exp``, ``nbf`` and
    ``iat`` are judged against ``clock`` (the node's), with ``leeway``, so that
    the session that the token opens closes on the same clock.  The ``meshd``
    claim, if any, grants channel patterns (:meth:`Grants.from_claim`).
    Nothing about a token or a key is logged, only why a token was refused.
    """

    log = Logger()

    def __init__(self, settings: "JWTSettings", clock, keys=None) -> None:
        import jwt

        self._jwt = jwt
        self.settings = settings
        self.clock = clock
        self._algorithms = list(settings.algorithms)
        if keys is None:
            if settings.secret is not None:
                keys = StaticKey(settings.secret)
            elif settings.public_key is not None:
                keys = StaticKey(load_public_key(settings.public_key))
            else:
                keys = JWKSKeys(settings.jwks_url, clock, min_refetch=settings.jwks_min_refetch,
                                max_age=settings.jwks_cache_seconds)
        #: Where verification keys come from: ``key_for(kid, alg)`` returns a key, or a Deferred of one
        #: (None: no such key).
        self.keys = keys

    def authenticate(self, token: str) -> "Optional[Identity] | Deferred[Optional[Identity]]":
        try:
            header = self._jwt.get_unverified_header(token)
        except self._jwt.PyJWTError as e:
            return self._refused(e)
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in self._algorithms:  # "none" never is
            return self._refused("its algorithm is not one of auth.jwt.algorithms")
        if kid is not None and not isinstance(kid, str):
            return self._refused("kid is not a string")
        key = self.keys.key_for(kid, algorithm)
        if isinstance(key, Deferred):
            return key.addCallback(lambda found: self._verify(token, found))
        return self._verify(token, key)

    def _verify(self, token: str, key: Any) -> Optional[Identity]:
        jwt, settings = self._jwt, self.settings
        if key is None:
            return self._refused("no key for its kid")
        try:
            claims = jwt.decode(
                token, key, algorithms=self._algorithms,
                audience=list(settings.audience) if settings.audience else None,
                issuer=settings.issuer,
                # The times are checked below, on the node's clock.
                options={"require": ["exp", "sub"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as e:
            return self._refused(e)
        now, leeway = self.clock.seconds(), settings.leeway
        exp, nbf, iat, sub = claims["exp"], claims.get("nbf"), claims.get("iat"), claims["sub"]
        if not _number(exp):
            return self._refused("exp is not a number")
        if exp + leeway <= now:
            return self._refused("expired")
        if nbf is not None and (not _number(nbf) or nbf - leeway > now):
            return self._refused("not valid yet (nbf)")
        if iat is not None and (not _number(iat) or iat - leeway > now):
            return self._refused("issued in the future (iat)")
        if not isinstance(sub, str) or not sub:
            return self._refused("sub is not a non-empty string")
        try:
            grants = Grants.from_claim(claims.get("meshd"))
        except ValueError:
            return self._refused("its meshd claim is not valid")
        return Identity(sub, expires=float(exp) + leeway, grants=grants)

    def _refused(self, why: Any) -> None:
        reason = type(why).__name__ if isinstance(why, Exception) else why
        self.log.debug("A JWT was refused: {reason}", reason=reason)
        return None


def load_public_key(path):
    """The public key in PEM file ``path``; raise OSError or ValueError."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror}") from None
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a PEM public key ({e})") from None


class StaticKey:
    """One verification key, whatever the token's ``kid``: a secret or a public key."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "<StaticKey>"

    def key_for(self, kid: Optional[str], algorithm: str) -> Any:
        return self._key


class JWKSKeys:
    """The keys of a JWKS document fetched over HTTP(S), without blocking the reactor.

    The key set is fetched when the first token needs it and kept for
    ``max_age`` seconds; a token naming a ``kid`` it lacks fetches it again
    (a signer's new key), at most once every ``min_refetch`` seconds, so
    tokens with made-up ``kid`` values cannot make the node hammer the key
    server.  Tokens that arrive while a fetch is under way wait for it.
    A failed fetch refuses those tokens and keeps the previous keys.
    """

    log = Logger()

    def __init__(self, url: str, clock, *, min_refetch: float = 30.0, max_age: float = 3600.0,
                 agent=None, timeout: float = 10.0) -> None:
        self.url = url
        self.clock = clock
        self.min_refetch = min_refetch
        self.max_age = max_age
        self.timeout = timeout
        self._agent = agent
        #: kid -> (key object, its JWK "alg" if any); a key without a kid is stored under None.
        self._keys: dict[Optional[str], tuple[Any, Optional[str]]] = {}
        self._fetched_at: Optional[float] = None
        self._fetching: Optional[Deferred] = None
        #: How many times the key set was fetched (for metrics and tests).
        self.fetches = 0

    def key_for(self, kid: Optional[str], algorithm: str) -> "Any | Deferred[Any]":
        now = self.clock.seconds()
        fresh = self._fetched_at is not None and now - self._fetched_at < self.max_age
        if fresh and kid in self._keys:
            return self._pick(kid, algorithm)
        may_fetch = self._fetched_at is None or not fresh or now - self._fetched_at >= self.min_refetch
        if not may_fetch and self._fetching is None:
            return self._pick(kid, algorithm)  # unknown kid, fetched too recently: no such key
        return self._fetch().addCallback(lambda _: self._pick(kid, algorithm))

    def _pick(self, kid: Optional[str], algorithm: str) -> Any:
        found = self._keys.get(kid)
        if found is None:
            return None
        key, alg = found
        if alg is not None and alg != algorithm:
            return None  # the key is for another algorithm
        return key

    def _fetch(self) -> Deferred:
        """A Deferred that fires (with None) when the fetch under way, or a new one, has finished."""
        fetching = self._fetching
        if fetching is None:
            fetching = self._fetching = Deferred()
            maybeDeferred(self._get).addCallbacks(self._got, self._failed).addBoth(self._done, fetching)
        waiter: Deferred = Deferred()
        fetching.addCallback(lambda _: waiter.callback(None))
        return waiter

    def _done(self, _: Any, fetching: Deferred) -> None:
        self._fetching = None
        fetching.callback(None)

    def _get(self) -> Deferred:
        from twisted.web.client import Agent, readBody

        if self._agent is None:
            self._agent = Agent(self.clock) if hasattr(self.clock, "connectTCP") else Agent(_reactor())
        self.fetches += 1
        self._fetched_at = self.clock.seconds()
        d = self._agent.request(b"GET", self.url.encode("ascii"))

        def body(response):
            if response.code != 200:
                raise ValueError(f"HTTP status {response.code}")
            return readBody(response)

        d.addCallback(body)
        if hasattr(self.clock, "callLater"):
            d.addTimeout(self.timeout, self.clock)
        return d

    def _got(self, body: bytes) -> None:
        from jwt import PyJWK, PyJWTError

        try:
            document = json.loads(body)
        except ValueError:
            document = None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            self.log.warn("The key set at {url} was not used: not a JWKS document", url=self.url)
            return
        keys = {}
        for entry in entries:
            # Signing keys only, and never a symmetric one: a key set is public.
            if not isinstance(entry, dict) or entry.get("kty") == "oct" or entry.get("use", "sig") != "sig":
                continue
            try:
                keys[entry.get("kid")] = (PyJWK(entry).key, entry.get("alg"))
            except PyJWTError:
                continue  # a key type or curve this node cannot use; the others still serve
        self._keys = keys
        self.log.info("Fetched {count} keys from {url}", count=len(keys), url=self.url)

    def _failed(self, failure) -> None:
        self.log.warn("Fetching the key set at {url} failed: {reason}", url=self.url,
                      reason=failure.getErrorMessage()[:200])


def _reactor():
    from twisted.internet import reactor

    return reactor


@implementer(IAuthenticator)
class TokensOrJWT:
    """A token in the JWT compact form goes to ``jwt``; any other token to ``tokens``."""

    def __init__(self, tokens: IAuthenticator, jwt: IAuthenticator) -> None:
        self.tokens = tokens
        self.jwt = jwt

    def authenticate(self, token: str) -> "Proof | Deferred[Proof]":
        if looks_like_jwt(token):
            return self.jwt.authenticate(token)
        return self.tokens.authenticate(token)
