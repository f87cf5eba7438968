"""meshd.client: connecting, async iteration over events, and failures."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError

from meshd.client import ConnectionClosed, MeshError, connect
from meshd.codec import ErrorCode, Opcode
from meshd.config import Config
from pathlib import Path

from .support import NodeTestCase, refusing_port


class ClientTests(NodeTestCase):
    async def test_async_iteration(self) -> None:
        """events() yields events in order and ends when the connection closes."""
        await self.start_node()
        sub, pub = await self.client(), await self.client()
        stream = sub.events()
        await sub.subscribe("c")
        for i in range(3):
            await pub.publish("c", b"%d" % i)
        got = []
        async for event in stream:
            got.append(event.payload)
            if len(got) == 3:
                await sub.close()
        self.assertEqual(got, [b"0", b"1", b"2"])

    async def test_refused_token(self) -> None:
        """connect() fails with MeshError when the node refuses the token."""
        await self.start_node(Config(source=Path("x.toml"), tokens={"a": "right"}))
        with self.assertRaises(MeshError) as caught:
            await connect(self.url, "wrong", reactor=reactor)
        self.assertEqual(caught.exception.code, ErrorCode.AuthenticationFailed)
        self.assertEqual(self.app.registry.sessions, {}, "the refused connection is closed")

    async def test_nothing_listening(self) -> None:
        """connect() fails with the connection error when nothing listens."""
        with self.assertRaises(ConnectionRefusedError):
            await connect(f"ws://127.0.0.1:{refusing_port(self)}", reactor=reactor)

    async def test_requests_after_close(self) -> None:
        """Pending and later requests fail with ConnectionClosed once the connection ends."""
        await self.start_node()
        c = await self.client()
        pending = c.request(Opcode.Ping)
        c.abort()
        with self.assertRaises(ConnectionClosed):
            await pending
        with self.assertRaises(ConnectionClosed):
            await c.subscribe("x")

    async def test_user_opcode_without_handler(self) -> None:
        """call() sends a user opcode; with no extension handling it the node answers UnknownOpcode."""
        await self.start_node()
        c = await self.client()
        with self.assertRaises(MeshError) as caught:
            await c.call(Opcode.UserFirst, b"x")
        self.assertEqual((caught.exception.code, caught.exception.name), (ErrorCode.UnknownOpcode, "UnknownOpcode"))
        self.assertEqual(c.welcome.session, c.session_id)

    async def test_cancelled_request_is_forgotten(self) -> None:
        """A cancelled request's answer is ignored, and the session goes on."""
        await self.start_node()
        c = await self.client()
        first = c.ping(b"first")
        first.cancel()
        with self.assertRaises(CancelledError):
            await first
        self.assertEqual((await c.ping(b"second")).payload, b"second")
