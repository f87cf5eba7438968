"""Shared test fixtures: a real node on a loopback port and real clients for it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial import unittest

from meshd.app import Application
from meshd.client import MeshClient, connect
from meshd.codec import Message
from meshd.config import Config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class NodeTestCase(unittest.TestCase):
    """A TestCase that runs one node in-process, listening on a real loopback port."""

    async def start_node(self, config: Optional[Config] = None, **kwargs) -> Application:
        app = Application(config or Config(), **kwargs)
        app.startService()
        self.addCleanup(app.stopService)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(app.factory)
        self.addCleanup(port.stopListening)
        self.app = app
        self.url = f"ws://127.0.0.1:{port.getHost().port}"
        return app

    async def client(self, token: Optional[str] = None, hello: bool = True) -> MeshClient:
        """A connected client whose events collect in ``client.received``."""
        client = await connect(self.url, token, reactor=reactor, hello=hello)
        client.received = []  # type: ignore[attr-defined]
        client.add_listener(client.received.append)
        self.addCleanup(close_quietly, client)
        return client

    async def settle(self, *clients: MeshClient) -> None:
        """Wait until the node has answered a Ping from each client.

        The node handles a connection's frames in order and writes each
        connection's frames in order, so after this every event the node
        sent to these clients before the Ping has arrived.
        """
        await gatherResults([c.ping() for c in clients])


def close_quietly(client: MeshClient) -> Deferred:
    if client.closed_reason is not None:
        return succeed(None)
    return client.close().addTimeout(5, reactor).addErrback(lambda _: None)


def flatc_json(schema: str, data: bytes) -> dict:
    """What flatc's C++ reader makes of ``data`` as the root type of ``schemas/<schema>``."""
    import json
    import tempfile

    sys.path.insert(0, str(ROOT / "schemas"))
    import generate

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.bin"
        path.write_bytes(data)
        subprocess.run([generate.find_flatc(), "--json", "--strict-json", "--raw-binary", "-o", tmp,
                        "-I", str(generate.SCHEMAS), str(generate.SCHEMAS / schema), "--", str(path)], check=True)
        return json.loads((Path(tmp) / "frame.json").read_text())


def payloads(events: list[Message]) -> list[bytes]:
    return [e.payload for e in events]


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


# -- real processes ---------------------------------------------------------------


def env() -> dict[str, str]:
    """Environment for child processes: this checkout first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def refusing_port(testcase: unittest.TestCase) -> int:
    """A loopback port that refuses connections until the test's cleanup.

    A socket stays bound to it without listening, so nothing else can
    listen there while the test runs.
    """
    import socket

    s = socket.socket()
    testcase.addCleanup(s.close)
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


#: Twisted logs ``<factory> starting on <port>`` once a port listens; which
#: of a node's listeners each factory serves.
LISTENERS = {"MeshServerFactory": "websocket", "Site": "metrics", "LinkFactory (TLS)": "mesh", "WebSite": "web"}
_STARTING = re.compile(r"\] (.+) starting on (\d+)\n")


class NodeProcess:
    """``twistd -n meshd`` in a child process, stopped by :meth:`stop`.

    Without ``--config`` the node listens on port 0; :meth:`wait_listening`
    reads the ports it bound from its log.
    """

    def __init__(self, *args: str, cwd: Path) -> None:
        cwd = cwd.resolve()
        self.log = cwd / "node.log"
        listen = [] if "--config" in args else ["--listen", "tcp:0:interface=127.0.0.1"]
        self.proc = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(self.log), "meshd", *listen, *args],
            cwd=cwd,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        #: The port each listener bound ("websocket", "metrics", "mesh"), from the log.
        self.ports: dict[str, int] = {}

    @property
    def port(self) -> int:
        return self.ports["websocket"]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait_listening(self, listeners: Sequence[str] = ("websocket",), timeout: float = 20.0) -> None:
        """Wait until the log says each of ``listeners`` is listening, and note its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}: {self.output()}")
            text = self.log.read_text() if self.log.exists() else ""
            self.ports = {LISTENERS[name]: int(port) for name, port in _STARTING.findall(text) if name in LISTENERS}
            if all(name in self.ports for name in listeners):
                return
            time.sleep(0.05)
        raise AssertionError(f"node did not log {', '.join(listeners)} listening within {timeout}s: {self.output()}")

    def output(self) -> str:
        """The node's log, and what it printed if it has exited."""
        text = self.log.read_text() if self.log.exists() else ""
        if self.proc.poll() is not None and self.proc.stdout and not self.proc.stdout.closed:
            text += self.proc.stdout.read().decode(errors="replace")
        return text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


# -- a raw WebSocket client: sends any bytes, records every frame -----------------

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from meshd.codec import ProtocolError, decode  # noqa: E402


class _RawProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = decode(payload)
        except ProtocolError as e:  # pragma: no cover - would be a node bug
            self.factory.frames.append(e)
            return
        self.factory.frames.append(message)
        waiters, self.factory.waiters = self.factory.waiters, []
        for count, d in waiters:
            if len(self.factory.frames) >= count:
                d.callback(self.factory.frames)
            else:
                self.factory.waiters.append((count, d))

    def onClose(self, wasClean: bool, code, reason) -> None:
        self.factory.close_code = code
        self.factory.close_reason = reason
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        self.factory.closed.callback(code)


class RawClient:
    """A WebSocket connection that sends exactly the bytes it is given."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.protocol: _RawProtocol = None  # type: ignore[assignment]

    @property
    def frames(self) -> list:
        return self.factory.frames

    @property
    def close_code(self):
        return self.factory.close_code

    def send(self, data: bytes, binary: bool = True) -> None:
        self.protocol.sendMessage(data, isBinary=binary)

    def wait_frames(self, count: int, timeout: float = 5.0) -> Deferred:
        """Fire with the frame list once it holds ``count`` frames."""
        d: Deferred = Deferred()
        if len(self.frames) >= count:
            d.callback(self.frames)
        else:
            self.factory.waiters.append((count, d))
        return d.addTimeout(timeout, reactor)

    def wait_closed(self, timeout: float = 5.0) -> Deferred:
        """Fire with the close code once the connection has closed."""
        d: Deferred = Deferred()

        def closed(code):
            d.callback(code)
            return code

        self.factory.closed.addBoth(closed)
        return d.addTimeout(timeout, reactor)

    def close(self) -> Deferred:
        if self.protocol.state == self.protocol.STATE_OPEN:
            self.protocol.sendClose(1000)
        return self.wait_closed().addErrback(lambda _: self.protocol.transport.abortConnection())


async def raw_client(testcase, url: str, protocols=("meshd.v1",), max_frame: int = 0,
                     origin: Optional[str] = None) -> RawClient:
    from autobahn.websocket.util import parse_url

    _secure, host, port, *_ = parse_url(url)
    factory = WebSocketClientFactory(url, protocols=list(protocols), origin=origin)
    factory.protocol = _RawProtocol
    factory.opened, factory.closed = Deferred(), Deferred()
    factory.frames, factory.waiters = [], []
    factory.close_code = factory.close_reason = None
    if max_frame:
        factory.setProtocolOptions(autoFragmentSize=max_frame)
    client = RawClient(factory)
    await TCP4ClientEndpoint(reactor, host, port).connect(factory)
    client.protocol = await factory.opened.addTimeout(5, reactor)
    testcase.addCleanup(client.close)
    return client
