"""Real processes: ``twistd -n meshd`` nodes and ``meshctl`` clients, as a user runs them."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from twisted.trial import unittest

from .support import BIN, ROOT, NodeProcess, env, refusing_port

pytestmark = pytest.mark.slow


def meshctl(*args: str, extra_env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "meshctl"), *args], env={**env(), **(extra_env or {})},
        capture_output=True, text=True, timeout=30, **kwargs,
    )


class Background:
    """A meshctl that runs while the test goes on."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "meshctl"), *args], env=env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )

    def wait_status(self, words: str, timeout: float = 20.0) -> str:
        """Read standard error until a line holds ``words``."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                line = self.proc.stderr.readline()
                seen += line
                if words in line:
                    return line
                if not line and self.proc.poll() is not None:
                    break
        raise AssertionError(f"meshctl never said {words!r}; it said {seen!r}")

    def finish(self, timeout: float = 20.0) -> tuple[int, list[dict]]:
        out, self.err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


class ProcessTestCase(unittest.TestCase):
    def node(self, *args: str) -> NodeProcess:
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        node = NodeProcess(*args, cwd=cwd)
        self.addCleanup(node.stop)
        node.wait_listening()
        return node

    def background(self, *args: str) -> Background:
        bg = Background(*args)
        self.addCleanup(bg.kill)
        return bg


class PubSubTests(ProcessTestCase):
    def test_meshctl_sub_receives_meshctl_pub(self) -> None:
        """meshctl sub in one process prints what meshctl pub sends in another, once each, in order."""
        node = self.node()
        sub = self.background("sub", "chat", "news", "--count", "3", "--url", node.url)
        sub.wait_status("subscribed to chat, news")
        for channel, text in (("chat", "hello"), ("other", "not for sub"), ("news", "héllo wörld"), ("chat", "bye")):
            result = meshctl("pub", channel, text, "--url", node.url)
            self.assertEqual(result.returncode, 0, result.stderr)
        code, events = sub.finish()
        self.assertEqual(code, 0)
        self.assertEqual(
            [(e["event"], e["channel"], e["data"]) for e in events],
            [("ChannelEvent", "chat", "hello"), ("ChannelEvent", "news", "héllo wörld"), ("ChannelEvent", "chat", "bye")],
        )
        self.assertEqual(len({e["node"] for e in events}), 1)

    def test_unreachable(self) -> None:
        """meshctl exits 3 with a message when no node listens."""
        result = meshctl("pub", "x", "y", "--url", f"ws://127.0.0.1:{refusing_port(self)}", "--timeout", "5")
        self.assertEqual(result.returncode, 3)
        self.assertIn("cannot reach", result.stderr)

    def test_node_stops_cleanly(self) -> None:
        """SIGTERM closes sessions and shuts the node down; meshctl sub reports the close.

        twistd ends by re-raising the signal that stopped it, as systemd expects.
        """
        node = self.node()
        sub = self.background("sub", "x", "--url", node.url, "--retry-for", "0")
        sub.wait_status("subscribed")
        node.proc.terminate()
        self.assertEqual(node.proc.wait(20), -signal.SIGTERM)
        code, events = sub.finish()
        self.assertEqual((code, events), (3, []))
        self.assertIn("code 4007", sub.err)  # CLOSE_DRAINING: reconnect elsewhere
        self.assertIn("Server Shut Down", node.output())


class ConfigurationTests(ProcessTestCase):
    def test_bad_config_refused_at_start(self) -> None:
        """A bad value stops twistd at start with one line naming the file and key, without the usage text."""
        config = Path(self.mktemp() + ".toml").resolve()
        config.write_text("[limits]\nmax_subscriptions = 'lots'\n")
        result = subprocess.run(
            [str(BIN / "twistd"), "-n", "--pidfile=", "meshd", "--config", str(config)],
            env=env(), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr, f"twistd meshd: {config}: limits.max_subscriptions: expected an integer >= 1, got 'lots'\n"
        )
        self.assertNotIn("Usage:", result.stdout + result.stderr)

    def test_rules_and_tokens(self) -> None:
        """With a configuration file, what the rules do not grant is refused to meshctl."""
        config = Path(self.mktemp() + ".toml").resolve()
        config.write_text(
            '[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            '[auth.tokens]\nalice = "s3cret"\n'
            '[[rules]]\nmatch = "news"\nanonymous = ["subscribe"]\nauthenticated = ["publish"]\n'
        )
        node = self.node("--config", str(config))
        sub = self.background("sub", "news", "--count", "1", "--url", node.url)
        sub.wait_status("subscribed")
        denied = meshctl("pub", "news", "anon", "--url", node.url)
        self.assertEqual(denied.returncode, 1)
        self.assertIn("PermissionDenied", denied.stderr)
        bad_token = meshctl("pub", "news", "x", "--url", node.url, "--token", "nope")
        self.assertEqual(bad_token.returncode, 1)
        self.assertIn("AuthenticationFailed", bad_token.stderr)
        ok = meshctl("pub", "news", "from alice", "--url", node.url, "--token", "s3cret")
        self.assertEqual(ok.returncode, 0, ok.stderr)
        code, events = sub.finish()
        self.assertEqual([e["data"] for e in events], ["from alice"])


class ExampleExtensionTests(ProcessTestCase):
    def test_documents_example(self) -> None:
        """The docs/examples/documents.py extension works as its docstring says."""
        os.environ.setdefault("PYTHONPATH", "")
        examples = str(ROOT / "docs" / "examples")
        old = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [examples, old]))
        self.addCleanup(os.environ.__setitem__, "PYTHONPATH", old)
        node = self.node("--module", "documents")
        watch = self.background("watch", "document", "42", "--count", "1", "--url", node.url)
        watch.wait_status("watching document/42")
        put = meshctl("call", "1024", "first draft", "--watchable", "document", "42", "--url", node.url)
        self.assertEqual(put.returncode, 0, put.stderr)
        self.assertEqual(json.loads(put.stdout), {"answer": "Ack", "data": "stored"})
        code, events = watch.finish()
        self.assertEqual(code, 0)
        self.assertEqual(
            [(e["event"], e["watchable"], e["data"]) for e in events],
            [("ResourceEvent", {"kind": "document", "id": "42"}, "first draft")],
        )
        got = meshctl("call", "1025", "--watchable", "document", "42", "--url", node.url)
        self.assertEqual(json.loads(got.stdout)["data"], "first draft")
        missing = meshctl("call", "1025", "--watchable", "document", "7", "--url", node.url)
        self.assertEqual(missing.returncode, 1)
        self.assertIn("InvalidArgument: no document document/7", missing.stderr)


class PrivateCATests(ProcessTestCase):
    def test_meshctl_ca(self) -> None:
        """meshctl --ca FILE reaches a wss:// node whose certificate a private CA signed, and only with that CA."""
        import re

        from meshd.mesh.certs import create_ca, issue_node

        certs = Path(self.mktemp()).resolve()
        create_ca(certs, "web")
        issue_node(certs, "web", ["127.0.0.1"])
        other = Path(self.mktemp()).resolve()
        create_ca(other, "other")
        node = self.node("--listen", f"ssl:0:interface=127.0.0.1:privateKey={certs / 'web.key'}:certKey={certs / 'web.pem'}")
        deadline = time.monotonic() + 20
        while not (found := re.search(r"MeshServerFactory \(TLS\) starting on (\d+)", node.output())):
            self.assertLess(time.monotonic(), deadline, node.output())
            time.sleep(0.05)
        url = f"wss://127.0.0.1:{found.group(1)}"
        sub = self.background("sub", "secure", "--count", "1", "--url", url, "--ca", str(certs / "ca.pem"))
        sub.wait_status("subscribed to secure")
        ok = meshctl("pub", "secure", "over tls", "--url", url, "--ca", str(certs / "ca.pem"))
        self.assertEqual(ok.returncode, 0, ok.stderr)
        code, events = sub.finish()
        self.assertEqual((code, [e["data"] for e in events]), (0, ["over tls"]))
        for refused in (meshctl("pub", "secure", "x", "--url", url),
                        meshctl("pub", "secure", "x", "--url", url, "--ca", str(other / "ca.pem"))):
            self.assertEqual(refused.returncode, 3, refused.stderr)
            self.assertIn(f"cannot reach {url}", refused.stderr)
        for args, message in (
            (["--url", node.url, "--ca", str(certs / "ca.pem")], "--ca is for wss:// URLs"),
            (["--url", url, "--ca", str(certs / "missing.pem")], "--ca: cannot read"),
            (["--url", url, "--ca", str(certs / "web.key")], "holds no PEM certificate"),
        ):
            bad = meshctl("pub", "secure", "x", *args)
            self.assertEqual(bad.returncode, 2, bad.stderr)
            self.assertIn(message, bad.stderr)
