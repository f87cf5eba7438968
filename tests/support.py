"""Shared test fixtures: a real node on a loopback port and real clients for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """``twistd -n meshd`` in a child process, stopped by :meth:`stop`."""

    def __init__(self, *args: str, cwd: Path, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.log = cwd / "node.log"
        listen = [] if "--config" in args else ["--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        self.proc = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(self.log), "meshd", *listen, *args],
            cwd=cwd,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.url = f"ws://127.0.0.1:{self.port}"

    def wait_listening(self, timeout: float = 20.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"node did not listen within {timeout}s: {self.output()}")

    def output(self) -> str:
        text = self.log.read_text() if self.log.exists() else ""
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
