"""The web listener: the browser client, the demo page and what the page reads from the node."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from meshd.app import Application
from meshd.config import DEFAULT_WEB_LISTEN, Config, ConfigError, parse
from meshd.listening import Listening
from meshd.web import DEMO, STATIC

from .support import BIN, NodeProcess, env


class WebListenerTests(unittest.TestCase):
    def node(self, demo: bool, listen: tuple[str, ...] = ("tcp:0:interface=127.0.0.1",)) -> Application:
        app = Application(Config(listen=listen))
        for endpoint in listen:
            app.listen(endpoint)
        app.serve_web("tcp:0:interface=127.0.0.1", demo)
        app.startService()
        self.addCleanup(app.stopService)
        self.app = app
        return app

    def web_port(self) -> int:
        [service] = [s for s in self.app if s.name.startswith("web:")]
        return service.address().port

    async def get(self, path: str) -> tuple[int, dict, bytes]:
        url = f"http://127.0.0.1:{self.web_port()}{path}".encode()
        response = await Agent(reactor).request(b"GET", url).addTimeout(10, reactor)
        body = await readBody(response)
        headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body

    async def test_config_names_the_ports_bound(self) -> None:
        """/demo/config.json gives the port each WebSocket listener bound, not the 0 it was asked for."""
        app = self.node(demo=True, listen=("tcp:0:interface=127.0.0.1", "tcp:port=0:interface=127.0.0.1"))
        code, headers, body = await self.get("/demo/config.json")
        self.assertEqual(code, 200)
        self.assertEqual(headers["content-type"], "application/json")
        answer = json.loads(body)
        bound = sorted(address.port for _, address in app.websocket_addresses())
        self.assertEqual(len(bound), 2)
        self.assertNotIn(0, bound)
        self.assertEqual(sorted(w["port"] for w in answer["websocket"]), bound)
        self.assertEqual({w["tls"] for w in answer["websocket"]}, {False})
        self.assertEqual(answer["node"]["id"], str(app.node_id))

    async def test_page_client_and_cluster(self) -> None:
        """With the demo on: the page at /, the bundled client, and the cluster view's JSON."""
        app = self.node(demo=True)
        code, headers, page = await self.get("/")
        self.assertEqual(code, 200)
        self.assertIn("text/html", headers["content-type"])
        self.assertEqual(page, (DEMO / "index.html").read_bytes())
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertIn("default-src 'self'", headers["content-security-policy"])
        code, headers, script = await self.get("/static/meshd-client.js")
        self.assertEqual(code, 200)
        self.assertIn("javascript", headers["content-type"])
        self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertEqual(script, (STATIC / "meshd-client.js").read_bytes())
        code, headers, body = await self.get("/demo/cluster.json")
        self.assertEqual(code, 200)
        self.assertNotIn("access-control-allow-origin", headers)
        cluster = json.loads(body)
        self.assertEqual(cluster["info"]["node"]["id"], str(app.node_id))
        self.assertEqual(cluster["channels"], [])

    async def test_without_demo_no_page(self) -> None:
        """Without the demo the listener serves the static files only: / and /demo/ are 404 with a hint."""
        self.node(demo=False)
        for path in ("/", "/demo/config.json", "/demo/cluster.json"):
            code, _, body = await self.get(path)
            self.assertEqual(code, 404, path)
            self.assertIn(b"[web] demo = true", body)

    async def test_unknown_path(self) -> None:
        self.node(demo=True)
        code, _, body = await self.get("/nope")
        self.assertEqual(code, 404)
        self.assertIn(b"the demo page is at /", body)


class ListeningTests(unittest.TestCase):
    def test_busy_port_raises_at_start(self) -> None:
        """A port that cannot be bound raises from the start, as strports.service's does."""
        from twisted.internet.error import CannotListenError
        from twisted.internet.protocol import Factory

        first = Listening("tcp:0:interface=127.0.0.1", Factory())
        first.startService()
        self.addCleanup(first.stopService)
        second = Listening(f"tcp:{first.address().port}:interface=127.0.0.1", Factory())
        self.assertRaises(CannotListenError, second.startService)
        self.assertIsNone(second.address())


class WebConfigTests(unittest.TestCase):
    def test_demo_alone_listens_on_the_default(self) -> None:
        config = parse({"web": {"demo": True}}, Path("meshd.toml"))
        self.assertEqual(config.web_endpoint, DEFAULT_WEB_LISTEN)
        self.assertIsNone(parse({}, Path("meshd.toml")).web_endpoint)

    def test_bad_values_name_the_key(self) -> None:
        with self.assertRaisesRegex(ConfigError, r"meshd\.toml: web\.demo: expected true or false"):
            parse({"web": {"demo": "yes"}}, Path("meshd.toml"))
        with self.assertRaisesRegex(ConfigError, r"web\.listen"):
            parse({"web": {"listen": 8780}}, Path("meshd.toml"))


@pytest.mark.slow
class DemoProcessTests(unittest.TestCase):
    def test_demo_flag_prints_the_url(self) -> None:
        """``twistd -n meshd --demo`` logs the page's URL, and the URL serves the page."""
        from urllib.request import urlopen

        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        node = NodeProcess("--demo", "--web", "tcp:0:interface=127.0.0.1", cwd=cwd)
        self.addCleanup(node.stop)
        node.wait_listening(("websocket", "web"))
        for _ in range(100):
            found = re.search(r"Demo page: open (http://\S+) in a browser", node.output())
            if found:
                break
            subprocess.run(["sleep", "0.05"])
        self.assertIsNotNone(found, node.output())
        self.assertEqual(found.group(1), f"http://localhost:{node.ports['web']}/")
        with urlopen(found.group(1), timeout=10) as page:
            self.assertEqual(page.read(), (DEMO / "index.html").read_bytes())

    def test_demo_on_a_public_address_needs_a_file(self) -> None:
        """Development mode keeps the web listener on loopback as it does the others."""
        result = subprocess.run(
            [str(BIN / "twistd"), "-n", "--pidfile=", "meshd", "--demo", "--web", "tcp:0:interface=0.0.0.0"],
            env=env(), capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("tcp:0:interface=0.0.0.0 is not loopback", result.stderr + result.stdout)
