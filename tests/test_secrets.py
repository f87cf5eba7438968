"""No secret reaches a log line: a real node's log after a run that used every kind of secret."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import pytest
from twisted.internet import reactor

from meshd.client import MeshError, connect

from .support import NodeProcess, NodeTestCase

pytestmark = pytest.mark.slow

STATIC = "static-token-Zq8w1"
JWT_SECRET = "jwt-secret-" + "k" * 40
API_KEY = "api-key-Xr7p2"
WRONG = "wrong-guess-Hn4t9"


class SecretsTests(NodeTestCase):
    async def test_no_secret_in_the_log(self) -> None:
        """Static tokens, JWTs and their secret, and API keys, good and bad, appear in no line of the node's log."""
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        config = work / "meshd.toml"
        config.write_text(f"""
[websocket]
listen = ["tcp:0:interface=127.0.0.1"]
[auth.tokens]
alice = "{STATIC}"
[auth.jwt]
secret = "{JWT_SECRET}"
algorithms = ["HS256"]
[api]
listen = "tcp:0:interface=127.0.0.1"
keys = {{ ops = "{API_KEY}" }}
[[rules]]
match = "*"
authenticated = ["subscribe", "publish"]
""")
        node = NodeProcess("--config", str(config), "--log-level", "debug", cwd=work)
        self.addCleanup(node.stop)
        node.wait_listening()
        api_port = None
        for _ in range(200):
            found = re.search(r"ApiSite \S* ?starting on (\d+)|ApiSite starting on (\d+)", node.output())
            if found:
                api_port = int(found.group(1) or found.group(2))
                break
            time.sleep(0.05)
        self.assertIsNotNone(api_port, node.output())
        now = int(time.time())
        good_jwt = jwt.encode({"sub": "bob", "exp": now + 600}, JWT_SECRET, algorithm="HS256")
        expired_jwt = jwt.encode({"sub": "bob", "exp": now - 600}, JWT_SECRET, algorithm="HS256")
        forged_jwt = jwt.encode({"sub": "bob", "exp": now + 600}, "another-secret-" + "x" * 40, algorithm="HS256")

        for token in (STATIC, good_jwt):
            client = await connect(node.url, token, reactor=reactor)
            await client.publish("room", b"hello")
            await client.close()
        for token in (WRONG, expired_jwt, forged_jwt):
            with self.assertRaises(MeshError):
                await connect(node.url, token, reactor=reactor)

        def call(key: str) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/api/publish", method="POST",
                data=json.dumps({"channel": "room", "data": "x"}).encode(),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    return answer.status
            except urllib.error.HTTPError as e:
                return e.code

        self.assertEqual((call(API_KEY), call(WRONG)), (200, 401))
        node.stop()
        log = node.output()
        self.assertIn("meshd node", log, "the log is the node's")
        for secret in (STATIC, JWT_SECRET, API_KEY, WRONG, good_jwt, expired_jwt, forged_jwt):
            self.assertNotIn(secret, log)
            self.assertNotIn(secret.split(".")[-1], log)  # nor a JWT's signature alone
