"""JWT connection tokens ([auth.jwt]): verification, claims grants, per-user rules, expiry, Refresh, JWKS."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from meshd.auth import Identity, JWTAuthenticator, JWKSKeys
from meshd.client import MeshError
from meshd.codec import ErrorCode, Opcode, decode, encode
from meshd.config import ConfigError, JWTSettings, parse
from meshd.constants import CLOSE_TOKEN_EXPIRED

from .support import NodeTestCase, refusing_port
from .test_websocket import Connection, client_frame, close_code

SECRET = "a test secret that is long enough for HS256 and HS384 and HS512 too!!"
OTHER_SECRET = "another secret, just as long, that the node does not know about at all"
STATIC = "a-static-token-for-the-backend"


def token(key: Any = SECRET, algorithm: str = "HS256", *, sub: Optional[str] = "alice", lifetime: float = 600,
          now: Optional[float] = None, headers: Optional[dict] = None, **claims: Any) -> str:
    """A signed JWT for ``sub`` expiring ``lifetime`` seconds after ``now`` (default: the wall clock)."""
    now = time.time() if now is None else now
    body = {"exp": now + lifetime, **claims}
    if sub is not None:
        body["sub"] = sub
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


def config(tmp: Path, jwt_table: Optional[dict] = None, rules: tuple = (), **auth: Any):
    """A strict node configuration with ``[auth.jwt]`` (an HS256 secret unless given) and ``rules``."""
    table = jwt_table if jwt_table is not None else {"secret": SECRET, "algorithms": ["HS256"]}
    data = {"auth": {"jwt": table, **auth}, "rules": list(rules)}
    return parse(data, tmp / "meshd.toml")


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class ConfigTests(unittest.SynchronousTestCase):
    def test_errors_name_file_and_key(self) -> None:
        """Bad [auth.jwt] tables are refused with the file and the key in the message."""
        tmp = Path(self.mktemp())
        tmp.mkdir()
        cases = [
            ({"secret": SECRET}, "auth.jwt.algorithms is required"),
            ({"secret": SECRET, "algorithms": ["none"]}, "auth.jwt.algorithms: 'none'"),
            ({"secret": SECRET, "algorithms": ["RS256"]}, "auth.jwt.algorithms: 'RS256' cannot be verified with secret"),
            ({"secret": "short", "algorithms": ["HS256"]}, "auth.jwt.secret: must be at least 32 bytes"),
            ({"public_key": "missing.pem", "algorithms": ["RS256"]}, "auth.jwt.public_key: cannot read"),
            ({"jwks_url": "ftp://keys", "algorithms": ["RS256"]}, "auth.jwt.jwks_url: expected an http"),
            ({"jwks_url": "http://127.0.0.1/k", "algorithms": ["none"]}, "auth.jwt.algorithms: 'none'"),
            ({"secret": SECRET, "jwks_url": "http://a/b", "algorithms": ["HS256"]}, "auth.jwt: set exactly one"),
            ({"secret": SECRET, "algorithms": ["HS256"], "leeway": -1}, "auth.jwt.leeway: expected a number"),
            ({"secret": SECRET, "algorithms": ["HS256"], "colour": "red"}, "unknown key auth.jwt.colour"),
        ]
        for table, expected in cases:
            with self.assertRaises(ConfigError) as caught:
                config(tmp, table)
            self.assertIn(str(tmp / "meshd.toml"), str(caught.exception))
            self.assertIn(expected, str(caught.exception))

    def test_public_key_path_is_relative_to_the_file(self) -> None:
        """public_key is read relative to the configuration file's folder, and the secret is kept out of repr."""
        tmp = Path(self.mktemp())
        tmp.mkdir()
        (tmp / "signer.pem").write_bytes(public_pem(rsa_key()))
        settings = config(tmp, {"public_key": "signer.pem", "algorithms": ["RS256"], "audience": "meshd"}).jwt
        self.assertEqual((settings.public_key, settings.audience), ((tmp / "signer.pem").resolve(), ("meshd",)))
        self.assertNotIn(SECRET, repr(config(tmp).jwt))


class VerificationTests(unittest.SynchronousTestCase):
    """The checks a JWT passes, on a task.Clock set to the wall clock's time."""

    def authenticator(self, **settings: Any) -> JWTAuthenticator:
        clock = Clock()
        clock.advance(time.time())
        values = {"secret": SECRET, "algorithms": ("HS256",), **settings}
        return JWTAuthenticator(JWTSettings(**values), clock)

    def test_accepted(self) -> None:
        """A token signed with the secret proves its sub until its exp (plus leeway)."""
        auth = self.authenticator(leeway=5)
        now = auth.clock.seconds()
        identity = auth.authenticate(token(now=now, lifetime=60))
        self.assertEqual(identity, Identity("alice", expires=now + 65))

    def test_refused(self) -> None:
        """Expired, not yet valid, wrongly signed, wrongly addressed or unsigned tokens prove nothing."""
        auth = self.authenticator(audience=("meshd",), issuer="https://issuer.example")
        good = {"aud": "meshd", "iss": "https://issuer.example"}
        self.assertEqual(auth.authenticate(token(**good)).principal, "alice")
        refused = {
            "expired": token(lifetime=-1, **good),
            "not yet valid": token(nbf=time.time() + 3600, **good),
            "wrong key": token(OTHER_SECRET, **good),
            "wrong audience": token(aud="someone-else", iss="https://issuer.example"),
            "no audience": token(iss="https://issuer.example"),
            "wrong issuer": token(aud="meshd", iss="https://evil.example"),
            "none algorithm": token(None, "none", **good),
            "algorithm not configured": token(SECRET, "HS512", **good),
            "no sub": token(sub=None, **good),
            "no exp": jwt.encode({"sub": "alice", **good}, SECRET, algorithm="HS256"),
            "bad meshd claim": token(meshd={"subscribe": "everything"}, **good),
            "not a JWT": "not.a.jwt",
        }
        for why, value in refused.items():
            self.assertIsNone(auth.authenticate(value), why)

    def test_no_audience_configured(self) -> None:
        """Without audience, a token naming one is refused (it is meant for another service)."""
        auth = self.authenticator()
        self.assertIsNone(auth.authenticate(token(aud="meshd")))
        self.assertEqual(auth.authenticate(token()).principal, "alice")

    def test_claims_grants(self) -> None:
        """The meshd claim becomes the identity's grants."""
        auth = self.authenticator()
        identity = auth.authenticate(token(meshd={"subscribe": ["room.*"], "watch": ["doc/1"]}))
        self.assertEqual((identity.grants.subscribe, identity.grants.publish, identity.grants.watch),
                         (("room.*",), (), ("doc/1",)))

    def test_public_key(self) -> None:
        """An RS256 or ES256 token verifies with the signer's public key, and not with another's."""
        for private in (rsa_key(), ec.generate_private_key(ec.SECP256R1())):
            algorithm = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
            path = Path(self.mktemp())
            path.write_bytes(public_pem(private))
            auth = self.authenticator(secret=None, public_key=path, algorithms=(algorithm,))
            self.assertEqual(auth.authenticate(token(private, algorithm)).principal, "alice")
            self.assertIsNone(auth.authenticate(token(rsa_key(), "RS256")))
            self.assertIsNone(auth.authenticate(token(SECRET, "HS256")), "no HMAC with the public key as secret")


class NodeTests(NodeTestCase):
    """JWTs at Hello on a real node, with rules, claims grants and per-user rules."""

    async def node(self, rules: tuple = (), **auth: Any):
        tmp = Path(self.mktemp())
        tmp.mkdir()
        return await self.start_node(config(tmp, rules=rules, **auth))

    async def refused(self, value: str) -> MeshError:
        client = await self.client(hello=False)
        with self.assertRaises(MeshError) as caught:
            await client.hello(value)
        return caught.exception

    async def test_hello(self) -> None:
        """A valid JWT welcomes its sub; an expired, wrongly signed or unsigned one gets AuthenticationFailed."""
        await self.node(tokens={"backend": STATIC})
        client = await self.client(token())
        self.assertEqual(client.principal, "alice")
        backend = await self.client(STATIC)
        self.assertEqual(backend.principal, "backend", "static tokens still authenticate")
        for value in (token(lifetime=-5), token(nbf=time.time() + 600), token(OTHER_SECRET), token(None, "none"),
                      "nope"):
            self.assertEqual((await self.refused(value)).code, ErrorCode.AuthenticationFailed)

    async def test_claims_widen_the_rules(self) -> None:
        """A token's meshd claim allows what it names beyond the rules, and nothing more."""
        rules = ({"match": "public.*", "authenticated": ["subscribe"]},)
        await self.node(rules)
        claims = {"subscribe": ["team.red.*"], "publish": ["team.red.chat"]}
        granted = await self.client(token(meshd=claims))
        plain = await self.client(token(sub="bob"))
        await granted.subscribe("public.news")
        await granted.subscribe("team.red.chat")
        await granted.publish("team.red.chat", b"hi")
        for attempt in (granted.subscribe("team.blue.chat"), granted.publish("team.red.other", b"x"),
                        granted.watch("team.red.chat", "1"), plain.subscribe("team.red.chat")):
            with self.assertRaises(MeshError) as caught:
                await attempt
            self.assertEqual(caught.exception.code, ErrorCode.PermissionDenied)

    async def test_per_user_channel(self) -> None:
        """user.#{sub} lets each principal subscribe to its own channel only, however its name is spelt."""
        rules = ({"match": "user.#{sub}", "authenticated": ["subscribe"]},
                 {"match": "inbox/#{sub}", "authenticated": ["watch"]})
        await self.node(rules)
        alice = await self.client(token())
        await alice.subscribe("user.alice")
        await alice.watch("inbox", "alice")
        star = await self.client(token(sub="*"))
        await star.subscribe("user.*")
        anonymous = await self.client()
        for attempt in (alice.subscribe("user.bob"), alice.watch("inbox", "bob"), star.subscribe("user.alice"),
                        anonymous.subscribe("user.alice"), anonymous.subscribe("user.#{sub}")):
            with self.assertRaises(MeshError) as caught:
                await attempt
            self.assertEqual(caught.exception.code, ErrorCode.PermissionDenied)

    async def test_expiry_over_a_socket(self) -> None:
        """A client whose token expires sees close code 4005 with the reason "token expired"."""
        await self.node()
        client = await self.client(token(lifetime=1.5))
        closed = await client.when_closed().addTimeout(10, reactor)
        self.assertEqual((closed.code, closed.reason), (CLOSE_TOKEN_EXPIRED, "token expired"))

    async def test_refresh_on_a_real_node(self) -> None:
        """Refresh with a new token for the same sub is acknowledged; for another sub it is refused."""
        await self.node()
        client = await self.client(token(lifetime=60))
        self.assertIsNone((await client.request(Opcode.Refresh, token=token(lifetime=600))).payload)
        with self.assertRaises(MeshError) as caught:
            await client.request(Opcode.Refresh, token=token(sub="mallory"))
        self.assertEqual(caught.exception.code, ErrorCode.AuthenticationFailed)
        with self.assertRaises(MeshError) as caught:
            await client.request(Opcode.Refresh)
        self.assertEqual(caught.exception.code, ErrorCode.MissingField)
        anonymous = await self.client()
        with self.assertRaises(MeshError) as caught:
            await anonymous.request(Opcode.Refresh, token=token())
        self.assertEqual(caught.exception.code, ErrorCode.AuthenticationFailed)


class ExpiryTests(unittest.SynchronousTestCase):
    """A session's token expiry on a node driven by a task.Clock."""

    def connect(self, value: str, rules: tuple = ()) -> Connection:
        tmp = Path(self.mktemp())
        tmp.mkdir()
        settings = config(tmp, rules=rules)
        connection = Connection(source=settings.source, jwt=settings.jwt, rules=settings.rules,
                                tokens={"backend": STATIC})
        [welcome] = self.send(connection, encode(Opcode.Hello, request_id=1, version=1, token=value))
        self.assertEqual((welcome.opcode, welcome.principal), (Opcode.Welcome, "alice"))
        return connection

    def send(self, connection: Connection, frame: bytes) -> list:
        connection.feed(client_frame(frame))
        return [decode(payload) if opcode == 0x2 else ("close", close_code(payload))
                for opcode, payload in connection.written()]

    def refresh(self, connection: Connection, value: str) -> list:
        return self.send(connection, encode(Opcode.Refresh, request_id=2, token=value))

    def test_expiry_closes(self) -> None:
        """The session closes with 4005 when its token's exp passes, not before."""
        connection = self.connect(token(now=0, lifetime=60))
        connection.clock.advance(59.999)
        self.assertEqual(connection.written(), [])
        connection.clock.advance(0.001)
        self.assertEqual([(op, close_code(p)) for op, p in connection.written()], [(0x8, CLOSE_TOKEN_EXPIRED)])
        self.assertEqual(connection.session.close_code, CLOSE_TOKEN_EXPIRED)

    def test_refresh_moves_the_expiry(self) -> None:
        """An accepted Refresh is acknowledged and the session lives until the new token's exp."""
        connection = self.connect(token(now=0, lifetime=60))
        connection.clock.advance(30)
        [ack] = self.refresh(connection, token(now=30, lifetime=90))
        self.assertEqual((ack.opcode, ack.request_id), (Opcode.Ack, 2))
        connection.clock.advance(89.999)
        self.assertEqual(connection.written(), [])
        connection.clock.advance(0.001)
        self.assertEqual(connection.session.close_code, CLOSE_TOKEN_EXPIRED)

    def test_refused_refresh_keeps_the_old_expiry(self) -> None:
        """A Refresh for another sub, a wrongly signed or a static token gets an Error and the old exp stands."""
        connection = self.connect(token(now=0, lifetime=60))
        for value in (token(now=0, sub="mallory", lifetime=600), token(OTHER_SECRET, now=0, lifetime=600),
                      STATIC, token(now=0, lifetime=-1)):
            [error] = self.refresh(connection, value)
            self.assertEqual((error.opcode, error.error_code), (Opcode.Error, ErrorCode.AuthenticationFailed))
        self.assertEqual(connection.session.expires, 60)
        connection.clock.advance(60)
        self.assertEqual(connection.session.close_code, CLOSE_TOKEN_EXPIRED)

    def test_refresh_replaces_grants(self) -> None:
        """The new token's claims replace the old one's grants."""
        connection = self.connect(token(now=0, lifetime=60, meshd={"subscribe": ["a.*"]}))
        [ack] = self.send(connection, encode(Opcode.Subscribe, request_id=3, channel="a.1"))
        self.assertEqual(ack.opcode, Opcode.Ack)
        self.refresh(connection, token(now=0, lifetime=60, meshd={"subscribe": ["b.*"]}))
        [error] = self.send(connection, encode(Opcode.Subscribe, request_id=4, channel="a.2"))
        self.assertEqual(error.error_code, ErrorCode.PermissionDenied)


# -- JWKS ---------------------------------------------------------------------------


class KeySet(Resource):
    """A JWKS document served over HTTP; tests change :attr:`keys` to rotate."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[tuple[str, Any]] = []
        self.requests = 0

    def render_GET(self, request) -> bytes:
        self.requests += 1
        request.setHeader(b"content-type", b"application/json")
        entries = []
        for kid, private in self.keys:
            entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
            entries.append({**entry, "kid": kid, "alg": "RS256", "use": "sig"})
        return json.dumps({"keys": entries}).encode()


class JWKSTests(NodeTestCase):
    async def key_server(self) -> tuple[KeySet, str]:
        keys = KeySet()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(keys))
        self.addCleanup(port.stopListening)
        return keys, f"http://127.0.0.1:{port.getHost().port}/jwks.json"

    async def test_rotation(self) -> None:
        """A token signed with a new kid makes the node refetch the key set; the retired key stops working."""
        keys, url = await self.key_server()
        first, second = rsa_key(), rsa_key()
        keys.keys = [("k1", first)]
        tmp = Path(self.mktemp())
        tmp.mkdir()
        await self.start_node(config(tmp, {"jwks_url": url, "algorithms": ["RS256"], "jwks_min_refetch": 0}))
        signed = lambda key, kid, **kw: token(key, "RS256", headers={"kid": kid}, **kw)  # noqa: E731
        self.assertEqual((await self.client(signed(first, "k1"))).principal, "alice")
        self.assertEqual((await self.client(signed(first, "k1", sub="bob"))).principal, "bob")
        self.assertEqual(keys.requests, 1, "the key set is cached")
        keys.keys = [("k2", second)]
        self.assertEqual((await self.client(signed(second, "k2"))).principal, "alice")
        self.assertEqual(keys.requests, 2)
        for value in (signed(first, "k1"), signed(first, "k2"), signed(second, "k3")):
            client = await self.client(hello=False)
            with self.assertRaises(MeshError):
                await client.hello(value)

    async def test_unknown_kids_are_rate_limited(self) -> None:
        """Tokens with made-up kids refetch the key set at most once per jwks_min_refetch."""
        keys, url = await self.key_server()
        signer = rsa_key()
        keys.keys = [("k1", signer)]
        source = JWKSKeys(url, reactor, min_refetch=3600)
        auth = JWTAuthenticator(JWTSettings(algorithms=("RS256",), jwks_url=url), reactor, keys=source)
        identity = await auth.authenticate(token(signer, "RS256", headers={"kid": "k1"}))
        self.assertEqual(identity.principal, "alice")
        for i in range(5):
            self.assertIsNone(auth.authenticate(token(signer, "RS256", headers={"kid": f"made-up-{i}"})))
        self.assertEqual((source.fetches, keys.requests), (1, 1))

    async def test_key_server_down(self) -> None:
        """When the key set cannot be fetched the token is refused and the node goes on."""
        url = f"http://127.0.0.1:{refusing_port(self)}/jwks.json"
        source = JWKSKeys(url, reactor)
        auth = JWTAuthenticator(JWTSettings(algorithms=("RS256",), jwks_url=url), reactor, keys=source)
        self.assertIsNone(await auth.authenticate(token(rsa_key(), "RS256", headers={"kid": "k1"})))
        self.assertEqual(source.fetches, 1)


class LogTests(NodeTestCase):
    async def test_no_secret_or_token_in_logs(self) -> None:
        """No log event of a run using secrets, static tokens, JWTs and a JWKS holds any of them."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tmp = Path(self.mktemp())
        tmp.mkdir()
        await self.start_node(config(tmp, tokens={"backend": STATIC}, rules=({"match": "x", "anonymous": []},)))
        used = [STATIC, token(), token(OTHER_SECRET), token(lifetime=-1), token(None, "none"), token(meshd=[1])]
        await self.client(used[0])
        client = await self.client(used[1])
        for value in used[2:]:
            with self.assertRaises(MeshError):
                await client.request(Opcode.Refresh, token=value)
        for value in used[2:4]:
            other = await self.client(hello=False)
            with self.assertRaises(MeshError):
                await other.hello(value)
        text = "\n".join(f"{formatEvent(e)} {e!r}" for e in events)
        self.assertIn("A JWT was refused", text, "the refusals were logged, and captured here")
        for secret in (SECRET, OTHER_SECRET, *used):
            self.assertNotIn(secret, text)
