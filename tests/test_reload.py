"""Reload (SIGHUP, Application.reload): rules, tokens, JWT settings and mesh certificates change; sessions stay."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from meshd.client import MeshError, connect
from meshd.codec import ErrorCode
from meshd.config import load
from meshd.mesh.certs import issue_node

from .meshsupport import certified_id, make_certs
from .support import NodeProcess, NodeTestCase, close_quietly, sleep

RULES = '[[rules]]\nmatch = "chat"\nanonymous = ["subscribe"]\nauthenticated = ["subscribe"{extra}]\n'


def lines(observer: EventLoggingObserver) -> list[str]:
    return [formatEvent(event) for event in observer]


class ReloadTests(NodeTestCase):
    def write(self, text: str) -> Path:
        """Write the test's configuration file (the same one each time) and return its path."""
        if not hasattr(self, "path"):
            folder = Path(self.mktemp()).resolve()
            folder.mkdir(parents=True)
            self.path = folder / "meshd.toml"
        self.path.write_text(text)
        return self.path

    async def start(self, text: str):
        app = await self.start_node(load(self.write(text)))
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        return app

    async def test_rules_change_on_a_live_session(self) -> None:
        """A rule added to the file applies to a welcomed session's next request after reload; the session stays."""
        base = '[auth]\ntokens = {alice = "secret-a"}\n'
        await self.start(base + RULES.format(extra=""))
        alice = await self.client("secret-a")
        with self.assertRaises(MeshError) as denied:
            await alice.publish("chat", b"before")
        self.assertEqual(denied.exception.code, ErrorCode.PermissionDenied)
        self.write(base + RULES.format(extra=', "publish"'))
        self.assertTrue(self.app.reload())
        await alice.publish("chat", b"after")
        self.assertIsNone(alice.closed_reason)
        self.assertEqual(len(self.app.registry.sessions), 1)

    async def test_tokens_are_replaced(self) -> None:
        """After a reload the new static token is accepted and the removed one refused, while the open session stays."""
        await self.start('[auth]\ntokens = {alice = "old-token"}\n' + RULES.format(extra=""))
        alice = await self.client("old-token")
        self.write('[auth]\ntokens = {alice = "new-token"}\n' + RULES.format(extra=""))
        self.assertTrue(self.app.reload())
        newcomer = await self.client("new-token")
        self.assertEqual(newcomer.principal, "alice")
        late = await connect(self.url, None, reactor=reactor, hello=False)
        self.addCleanup(close_quietly, late)
        with self.assertRaises(MeshError):
            await late.hello("old-token")
        await alice.ping()

    async def test_a_bad_file_changes_nothing(self) -> None:
        """A reload of a file with a bad value is refused with one line naming the file and key; the old settings stay."""
        app = await self.start('[auth]\ntokens = {alice = "secret-a"}\n' + RULES.format(extra=', "publish"'))
        policy, authenticator, config = app.policy, app.authenticator, app.config
        self.write('[limits]\nmax_subscriptions = "lots"\n' + RULES.format(extra=""))
        self.assertFalse(app.reload())
        self.assertIs(app.policy, policy)
        self.assertIs(app.authenticator, authenticator)
        self.assertIs(app.config, config)
        refused = [line for line in lines(self.logged) if "Reload refused" in line]
        self.assertEqual(len(refused), 1)
        self.assertIn(f"{self.path}: limits.max_subscriptions", refused[0])
        self.write("not toml [")
        self.assertFalse(app.reload())
        alice = await self.client("secret-a")
        await alice.publish("chat", b"still allowed")

    async def test_restart_only_keys_keep_their_values(self) -> None:
        """A changed listener or node name is logged as needing a restart and keeps its value; the rest applies."""
        app = await self.start('[node]\nname = "a"\ndrain_seconds = 3\n' + RULES.format(extra=""))
        self.write('[node]\nname = "b"\ndrain_seconds = 1\n[websocket]\nlisten = ["tcp:9:interface=127.0.0.1"]\n'
                   + RULES.format(extra=', "publish"'))
        listen = app.config.listen
        self.assertTrue(app.reload())
        self.assertEqual((app.config.node_name, app.config.drain_seconds, app.config.listen), ("a", 1.0, listen))
        restart = [line for line in lines(self.logged) if "needs a restart" in line]
        self.assertEqual(len(restart), 1)
        self.assertIn("node.name", restart[0])
        self.assertIn("websocket.listen", restart[0])
        self.assertIn("publish", app.policy.rules[0].authenticated)

    async def test_jwt_settings_are_replaced(self) -> None:
        """A reload that adds [auth.jwt] makes JWTs with the new secret acceptable."""
        import jwt

        await self.start(RULES.format(extra=""))
        secret = "s" * 32
        token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        self.write(f'[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "{secret}"\n' + RULES.format(extra=""))
        self.assertTrue(self.app.reload())
        carol = await self.client(token)
        self.assertEqual(carol.principal, "carol")

    async def test_mesh_certificates_are_read_again(self) -> None:
        """After a reload new mesh links present the node's renewed certificate; a certificate of another node is refused."""
        from OpenSSL.SSL import Connection

        certs = make_certs(Path(self.mktemp()).resolve(), ["n0", "other"])
        node_id = certified_id(certs / "n0.pem")
        text = (f'[node]\nid = "{node_id}"\n[mesh]\ncluster = "test"\nlisten = "tcp:0:interface=127.0.0.1"\n'
                f'ca = "{certs}/ca.pem"\ncert = "{certs}/n0.pem"\nkey = "{certs}/n0.key"\n'
                + RULES.format(extra=""))
        app = await self.start(text)
        credentials = app.mesh.credentials

        def serial() -> int:
            # What the mesh listener's TLS factory presents to the next link.
            return credentials.server_options().serverConnectionForTLS(None).get_certificate().get_serial_number()

        before = serial()
        cert, key = issue_node(certs, "n0-renewed", ["127.0.0.1"], node_id=node_id)
        (certs / "n0.pem").write_bytes(cert.read_bytes())  # renewed in place, as a deployment would
        (certs / "n0.key").write_bytes(key.read_bytes())
        self.assertTrue(app.reload())
        renewed = serial()
        self.assertNotEqual(renewed, before)
        client = credentials.client_options("127.0.0.1").clientConnectionForTLS(_FakeTLS())
        self.assertEqual(client.get_certificate().get_serial_number(), renewed)
        self.write(text.replace("n0.pem", "other.pem").replace("n0.key", "other.key"))
        self.assertFalse(app.reload())
        self.assertEqual(serial(), renewed)
        self.assertTrue(any("Reload refused" in line and "mesh.cert" in line for line in lines(self.logged)))

    async def test_listener_certificates_are_read_again(self) -> None:
        """After a reload an ssl: listener presents its renewed certificate to new connections; a file
        that cannot be used refuses the reload, naming the key, and the certificate in use stays."""
        from meshd.mesh.certs import create_ca

        certs = Path(self.mktemp()).resolve()
        create_ca(certs, "web")
        issue_node(certs, "web", ["127.0.0.1"])
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={certs / 'web.key'}:certKey={certs / 'web.pem'}"
        text = f'[websocket]\nlisten = ["{endpoint}"]\n' + RULES.format(extra="")
        app = await self.start(text)
        app.listen(endpoint)
        [(key, _, tls)] = app._listener_tls

        def serial() -> int:
            # What the listener presents to the next connection.
            return tls.serverConnectionForTLS(None).get_certificate().get_serial_number()

        before = serial()
        cert, new_key = issue_node(certs, "web-renewed", ["127.0.0.1"])
        (certs / "web.pem").write_bytes(cert.read_bytes())
        (certs / "web.key").write_bytes(new_key.read_bytes())
        self.assertTrue(app.reload())
        renewed = serial()
        self.assertNotEqual(renewed, before)
        self.assertTrue(any("1 TLS listener certificates" in line for line in lines(self.logged)))
        (certs / "web.key").write_text("not a key")
        self.assertFalse(app.reload())
        self.assertEqual(serial(), renewed)
        self.assertTrue(any("Reload refused" in line and "websocket.listen" in line and "cannot use its certificate"
                            in line for line in lines(self.logged)), lines(self.logged))
        # The key read again, but not the certificate it belongs with: refused by the listener's own check.
        (certs / "web.key").write_bytes(new_key.read_bytes())
        other, _ = issue_node(certs, "web-other", ["127.0.0.1"])
        (certs / "web.pem").write_bytes(other.read_bytes())
        self.assertFalse(app.reload())
        self.assertEqual(serial(), renewed)

    async def test_api_keys_are_replaced(self) -> None:
        """A reload replaces the server HTTP API's keys; a changed api.listen needs a restart."""
        api = '[api]\nlisten = "{listen}"\nkeys = {{ops = "{key}"}}\n'
        listen = "tcp:0:interface=127.0.0.1"
        app = await self.start(api.format(listen=listen, key="old-key") + RULES.format(extra=""))
        app.serve_api(app.config.api.listen, dict(app.config.api.keys))
        keys = lambda: app.getServiceNamed(f"api:{listen}").factory.api.keys  # noqa: E731
        self.assertEqual(keys().authenticate("old-key"), "ops")
        self.write(api.format(listen="tcp:1:interface=127.0.0.1", key="new-key") + RULES.format(extra=""))
        self.assertTrue(app.reload())
        self.assertEqual((keys().authenticate("new-key"), keys().authenticate("old-key")), ("ops", None))
        self.assertEqual(app.config.api.listen, listen)
        self.assertTrue(any("api.listen" in line and "needs a restart" in line for line in lines(self.logged)))

    async def test_development_mode_has_nothing_to_reload(self) -> None:
        """A node without a configuration file refuses a reload and changes nothing."""
        app = await self.start_node()
        policy = app.policy
        self.assertFalse(app.reload())
        self.assertIs(app.policy, policy)


class _FakeTLS:
    """What a client connection creator is handed: the TLS protocol (its factory's ALPN protocols are read)."""

    def __init__(self) -> None:
        from twisted.internet.protocol import Factory

        self.factory = SimpleNamespace(wrappedFactory=Factory())


class HangupTests(unittest.TestCase):
    async def test_sighup_handler_installed_by_tap_only_while_running(self) -> None:
        """makeService's node takes over SIGHUP when it starts and gives it back when it stops; Application alone does not."""
        from meshd.app import Application
        from meshd.tap import Options, makeService, uninstall_process_hooks

        before = signal.getsignal(signal.SIGHUP)
        plain = Application()
        plain.startService()
        self.addCleanup(plain.stopService)
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        config = folder / "meshd.toml"
        config.write_text('[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
        options = Options()
        options.parseOptions(["--config", str(config)])
        app = makeService(options)
        self.addCleanup(uninstall_process_hooks)
        app.startService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        await app.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)


class ProcessReloadTests(unittest.TestCase):
    pytestmark = pytest.mark.slow  # a real twistd process

    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir(parents=True)
        self.config = self.cwd / "meshd.toml"
        self.base = '[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[auth]\ntokens = {alice = "secret-a"}\n'
        self.config.write_text(self.base + RULES.format(extra=""))
        self.node = NodeProcess("--config", str(self.config), cwd=self.cwd)
        self.addCleanup(self.node.stop)
        self.node.wait_listening()

    async def test_sighup_changes_rules_for_a_live_session(self) -> None:
        """After the file gains a rule and twistd gets SIGHUP, a session open since before may publish; a bad file then changes nothing."""
        alice = await connect(self.node.url, "secret-a", reactor=reactor)
        self.addCleanup(close_quietly, alice)
        with self.assertRaises(MeshError):
            await alice.publish("chat", b"before")
        self.config.write_text(self.base + RULES.format(extra=', "publish"'))
        self.node.proc.send_signal(signal.SIGHUP)
        await self.until_logged("Reloaded")
        await alice.publish("chat", b"after")
        self.config.write_text(self.base + '[limits]\nmax_watches = 0\n')
        self.node.proc.send_signal(signal.SIGHUP)
        await self.until_logged("Reload refused")
        self.assertIn(f"{self.config}: limits.max_watches", self.node.output())
        await alice.publish("chat", b"still allowed")
        self.assertIsNone(alice.closed_reason)
        self.assertIsNone(self.node.proc.poll())

    async def until_logged(self, words: str, timeout: float = 20.0) -> None:
        """Wait, letting the reactor run, until the node's log holds ``words``."""
        deadline = time.monotonic() + timeout
        while words not in self.node.output():
            if time.monotonic() > deadline:
                raise AssertionError(f"the node never logged {words!r}: {self.node.output()}")
            await sleep(0.05)
