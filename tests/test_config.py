"""Configuration files and twistd options: every bad key or value is named with its file."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from twisted.python.usage import UsageError
from twisted.trial import unittest

from meshd.app import Application
from meshd.listening import Listening
from meshd.config import DEFAULT_LISTEN, LOOPBACK_ORIGINS, Config, ConfigError, is_loopback, load
from meshd.permissions import Rule
from meshd.tap import Options, Refused, makeService, uninstall_process_hooks

FULL = """
[node]
id = "6f1c1f3e-8a65-4c8e-9a43-0a4f2b6c1d2e"
name = "edge-1"

[websocket]
listen = ["tcp:9000:interface=127.0.0.1", "tcp:9001:interface=127.0.0.1"]
max_message_size = 4096
allowed_origins = ["https://example.com"]
auto_ping_interval = 20
auto_ping_timeout = 5.5
open_handshake_timeout = 3
max_connections = 100
max_handshake_size = 8192
max_handshaking = 100
max_connections_per_address = 16
exempt_addresses = ["10.0.0.0/8", "fd00::1"]

[limits]
hello_timeout = 2
max_subscriptions = 10
max_watches = 11
max_channel_length = 64
max_watchable_length = 32
max_send_buffer = 65536
max_fragments = 64
max_failed_hellos = 3
address_failed_hellos = 10
address_failed_hello_rate = 0.5
request_rate = 500
request_burst = 1000
max_channels = 5000

[auth.tokens]
alice = "secret"
bob = "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"

[[rules]]
match = "public.*"
anonymous = ["subscribe"]
authenticated = ["subscribe", "publish"]

[extensions]
modules = ["json"]
"""


class LoadTests(unittest.TestCase):
    def write(self, text: str) -> Path:
        path = Path(self.mktemp() + ".toml")
        path.write_text(text)
        return path

    def test_every_key(self) -> None:
        """A file that sets every key loads into the matching Config."""
        path = self.write(FULL)
        c = load(path)
        self.assertEqual(c.source, path)
        self.assertFalse(c.development)
        self.assertEqual(c.node_id, UUID("6f1c1f3e-8a65-4c8e-9a43-0a4f2b6c1d2e"))
        self.assertEqual(c.listen, ("tcp:9000:interface=127.0.0.1", "tcp:9001:interface=127.0.0.1"))
        self.assertEqual((c.max_message_size, c.auto_ping_timeout, c.max_send_buffer), (4096, 5.5, 65536))
        self.assertEqual((c.max_subscriptions, c.max_watches, c.max_channel_length), (10, 11, 64))
        self.assertEqual(c.rules, (Rule("public.*", frozenset({"subscribe"}), frozenset({"subscribe", "publish"})),))
        self.assertEqual(set(c.tokens), {"alice", "bob"})
        self.assertEqual(c.modules, ("json",))
        self.assertEqual((c.max_handshake_size, c.max_handshaking, c.max_connections_per_address), (8192, 100, 16))
        self.assertEqual(c.exempt_addresses, ("10.0.0.0/8", "fd00::1"))
        self.assertEqual((c.max_fragments, c.max_failed_hellos, c.max_channels), (64, 3, 5000))
        self.assertEqual((c.address_failed_hellos, c.address_failed_hello_rate), (10, 0.5))
        self.assertEqual((c.request_rate, c.request_burst), (500.0, 1000))
        self.assertEqual(c.origins, ("https://example.com",))

    def test_limit_defaults(self) -> None:
        """Every limit has a default; origins default to loopback pages in development mode, any with a file."""
        c = Config()
        self.assertEqual((c.max_handshake_size, c.max_handshaking, c.max_connections_per_address), (16384, 1024, 256))
        self.assertEqual(c.exempt_addresses, ("127.0.0.0/8", "::1"))
        self.assertEqual((c.max_fragments, c.max_failed_hellos, c.max_channels), (256, 5, 100_000))
        self.assertEqual((c.address_failed_hellos, c.address_failed_hello_rate), (20, 0.1))
        self.assertEqual((c.requests_per_second, c.request_burst), (0, 2000), "no request limit in development")
        self.assertEqual(c.origins, LOOPBACK_ORIGINS)
        self.assertEqual(load(self.write("")).origins, ("*",))
        self.assertEqual(load(self.write("")).requests_per_second, 1000)
        self.assertEqual(load(self.write("[websocket]\nallowed_origins = []\n")).origins, ())

    def test_empty_file_is_strict(self) -> None:
        """An empty file keeps the defaults but leaves development mode: nothing is allowed."""
        c = load(self.write(""))
        self.assertFalse(c.development)
        self.assertEqual((c.listen, c.rules), ((DEFAULT_LISTEN,), ()))
        self.assertFalse(Application(c).policy.allows("subscribe", "x", True))

    def test_errors_name_file_and_key(self) -> None:
        """Each bad key or value is refused with the file and the key in the message."""
        cases = {
            "[websocket]\nmax_message_size = 'big'\n": "websocket.max_message_size",
            "[websocket]\nmax_message_size = 10\n": "websocket.max_message_size",
            "[websocket]\nlisten = ['nonsense:1']\n": "websocket.listen",
            "[websocket]\nlisten = []\n": "websocket.listen",
            "[websocket]\nport = 1\n": "unknown key websocket.port",
            "[limits]\nhello_timeout = -1\n": "limits.hello_timeout",
            "[limits]\nmax_subscriptions = true\n": "limits.max_subscriptions",
            "[limits]\nrequest_rate = -1\n": "limits.request_rate",
            "[limits]\naddress_failed_hello_rate = 'fast'\n": "limits.address_failed_hello_rate",
            "[limits]\nmax_fragments = 0\n": "limits.max_fragments",
            "[websocket]\nmax_handshake_size = 100\n": "websocket.max_handshake_size",
            "[websocket]\nexempt_addresses = ['10.0.0.0/33']\n": "websocket.exempt_addresses",
            "[node]\nid = 'not-a-uuid'\n": "node.id",
            "[nodes]\nid = 1\n": "unknown section [nodes]",
            "[auth]\ntokens = 'x'\n": "auth.tokens",
            "[auth.tokens]\nbob = 'sha256:abc'\n": "auth.tokens",
            "[[rules]]\nanonymous = ['subscribe']\n": "rules[0].match",
            "[[rules]]\nmatch = 'a'\nanonymous = ['delete']\n": "rules[0].anonymous",
            "[[rules]]\nmatch = 'a'\nwho = []\n": "rules[0].who",
            "rules = 3\n": "rules",
            "[websocket\n": "not valid TOML",
        }
        for text, words in cases.items():
            path = self.write(text)
            with self.assertRaises(ConfigError, msg=text) as caught:
                load(path)
            self.assertIn(str(path), str(caught.exception))
            self.assertIn(words, str(caught.exception), text)

    def test_missing_file(self) -> None:
        """A file that cannot be read is named."""
        with self.assertRaises(ConfigError) as caught:
            load("/nonexistent/meshd.toml")
        self.assertIn("/nonexistent/meshd.toml", str(caught.exception))

    def test_loopback(self) -> None:
        """Endpoint strings are judged loopback by their interface."""
        self.assertTrue(is_loopback("tcp:8765:interface=127.0.0.1"))
        self.assertTrue(is_loopback(r"tcp6:8765:interface=\:\:1"))
        self.assertTrue(is_loopback("unix:/tmp/meshd.sock"))
        self.assertFalse(is_loopback("tcp:8765"))
        self.assertFalse(is_loopback("tcp:8765:interface=0.0.0.0"))
        self.assertFalse(is_loopback("tcp:8765:interface=10.1.2.3"))


class OptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """No flags: development mode on 127.0.0.1:8765."""
        config = self.parse()["config_object"]
        self.assertTrue(config.development)
        self.assertEqual(config.listen, ("tcp:8765:interface=127.0.0.1",))

    def test_flags_override_file(self) -> None:
        """Flags win over the file; --module adds to the file's modules."""
        path = Path(self.mktemp() + ".toml")
        path.write_text(FULL.replace('modules = ["json"]', 'modules = ["tests.extension_for_tests"]'))
        config = self.parse(
            "--config", str(path), "--listen", "tcp:7000:interface=127.0.0.1",
            "--max-message-size", "999", "--node-id", "00000000-0000-0000-0000-000000000001",
            "--module", "tests.mesh_extension",
        )["config_object"]
        self.assertEqual(config.listen, ("tcp:7000:interface=127.0.0.1",))
        self.assertEqual(config.max_message_size, 999)
        self.assertEqual(config.node_id, UUID(int=1))
        self.assertEqual(config.modules, ("tests.extension_for_tests", "tests.mesh_extension"))
        self.assertEqual(config.max_subscriptions, 10)

    def test_bad_flags(self) -> None:
        """Bad flag values and a bad file are refused, each problem one line naming the flag or the file and key."""
        with self.assertRaises(Refused) as caught:
            self.parse("--listen", "bogus:1")
        self.assertIn("--listen", str(caught.exception))
        with self.assertRaises(Refused) as caught:
            self.parse("--node-id", "x", "--max-message-size", "10")
        self.assertEqual([p.split(":")[0] for p in caught.exception.problems], ["--node-id", "--max-message-size"])
        path = Path(self.mktemp() + ".toml")
        path.write_text("[limits]\nmax_watches = 0\n")
        with self.assertRaises(Refused) as caught:
            self.parse("--config", str(path))
        self.assertIn(f"{path}: limits.max_watches", str(caught.exception))
        self.assertEqual(caught.exception.code, f"twistd meshd: {path}: limits.max_watches: expected an integer >= 1, got 0")
        self.assertNotIsInstance(caught.exception, UsageError)

    def test_development_is_loopback_only(self) -> None:
        """Without a configuration file, a non-loopback listener is refused."""
        with self.assertRaises(Refused) as caught:
            self.parse("--listen", "tcp:8765")
        self.assertIn("loopback", str(caught.exception))
        self.parse("--listen", "tcp:8765:interface=::1".replace("::1", r"\:\:1"))

    def test_make_service(self) -> None:
        """makeService builds the node with one listener per endpoint and loads extensions."""
        path = Path(self.mktemp() + ".toml")
        path.write_text(FULL.replace('modules = ["json"]', 'modules = ["tests.extension_for_tests"]'))
        app = makeService(self.parse("--config", str(path)))
        self.addCleanup(uninstall_process_hooks)
        self.assertIsInstance(app, Application)
        listeners = [s.description for s in app if isinstance(s, Listening) and s.name.startswith("websocket:")]
        self.assertEqual(len(listeners), 2)
        self.assertEqual(app.handlers.get(1024).handler(None), b"loaded")
        self.assertEqual(app.get_state(), app.state)

    def test_extension_without_setup(self) -> None:
        """A module without setup(app) is refused by name."""
        with self.assertRaises(ValueError) as caught:
            Application().load_extension("json")
        self.assertIn("json", str(caught.exception))
