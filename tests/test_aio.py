"""meshd.aio, the asyncio client, against real node processes (an asyncio loop cannot share Twisted's test reactor).

The tests that start node processes are marked slow, like tests/test_processes.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshd.aio import Client, MeshError, NotConnected, StateChange, connect
from meshd.clientcore import read_frame
from meshd.codec import ErrorCode, EventType, Opcode, ProtocolError, Watchable, encode, encode_batch, encode_event

from .support import ROOT, NodeProcess, env

TIMEOUT = 10.0
JWT_SECRET = "a test secret that is long enough for HS256 and more"
FAST = lambda attempt: 0.05  # noqa: E731  a retry policy for tests


def run(coroutine, timeout: float = 30.0):
    """Run ``coroutine`` in a new event loop; fail rather than hang after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def nth(stream, count: int = 1, timeout: float = TIMEOUT) -> list:
    """The next ``count`` events of ``stream``."""
    out = []
    while len(out) < count:
        out.append(await asyncio.wait_for(stream.__anext__(), timeout))
    return out


async def wait_for(test, what: str, timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not test():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node for the module: tokens, open rules, and the docs/examples/documents.py extension."""
    cwd = tmp_path_factory.mktemp("aio-node")
    config = cwd / "meshd.toml"
    config.write_text(
        '[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        '[auth.tokens]\nalice = "s3cret"\n'
        f'[auth.jwt]\nsecret = "{JWT_SECRET}"\nalgorithms = ["HS256"]\n'
        '[[rules]]\nmatch = "*"\nanonymous = ["subscribe", "watch"]\n'
        + "".join(f'[[rules]]\nmatch = "{m}"\nanonymous = ["publish"]\n' for m in ("chat", "other", "burst", "document/*"))
    )
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "docs" / "examples"), old]))
    try:
        process = NodeProcess("--config", str(config), "--module", "documents", cwd=cwd)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    try:
        process.wait_listening()
        yield process
    finally:
        process.stop()


def test_import_has_no_twisted() -> None:
    """meshd.aio imports neither Twisted nor Autobahn."""
    code = ("import meshd.aio, sys; bad = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'autobahn')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], env=env(), check=True, timeout=60)


@pytest.mark.slow
def test_connect_and_welcome(node) -> None:
    """connect() returns a welcomed client: session, node, principal from the token, batches on."""
    async def main() -> None:
        async with connect(node.url) as anonymous, connect(node.url, "s3cret") as alice:
            assert anonymous.state == "connected"
            assert anonymous.welcome.version == 1 and anonymous.welcome.batch
            assert anonymous.session_id is not None and anonymous.node_id == alice.node_id
            assert anonymous.principal is None
            assert alice.principal == "alice"
            assert (await alice.ping(b"t1")).payload == b"t1"
        assert alice.state == "closed" and alice.closed_reason is None
        with pytest.raises(NotConnected):
            await alice.ping()
    run(main())


@pytest.mark.slow
def test_subscribe_publish_iterate(node) -> None:
    """Events of subscribed channels arrive in order through async iteration, which ends at close."""
    async def main() -> None:
        sub = await connect(node.url)
        stream = sub.events()
        await sub.subscribe("chat")
        async with connect(node.url) as pub:
            for text in (b"one", b"two", b"three"):
                await pub.publish("chat", text)
            await pub.publish("other", b"not for sub")
        got = []
        async for event in stream:
            assert (event.event_type, event.channel) == (EventType.ChannelEvent, "chat")
            got.append(event.payload)
            if len(got) == 3:
                await sub.close()
        assert got == [b"one", b"two", b"three"]
    run(main())


@pytest.mark.slow
def test_batches_are_unpacked(node) -> None:
    """A burst of publishes reaches a batch-taking client as single events, in order."""
    async def main() -> None:
        async with connect(node.url) as sub, connect(node.url) as pub:
            received = []
            sub.add_listener(received.append)
            await sub.subscribe("burst")
            for i in range(50):
                await pub.publish("burst", b"%d" % i, ack=False)
            await pub.ping()
            await wait_for(lambda: len(received) == 50, "fifty events")
            assert [e.payload for e in received] == [b"%d" % i for i in range(50)]
    run(main())


def test_read_frame() -> None:
    """The clients' shared reader unpacks Batch frames in order and separates answers from events."""
    frames = [encode_event(EventType.ChannelEvent, channel="c", payload=b"%d" % i) for i in range(3)]
    events, answer = read_frame(encode_batch(frames))
    assert ([e.payload for e in events], answer) == ([b"0", b"1", b"2"], None)
    events, answer = read_frame(encode(Opcode.Ack, request_id=7))
    assert (events, answer.request_id) == ([], 7)
    with pytest.raises(ProtocolError):
        read_frame(b"not a frame at all")
    with pytest.raises(ProtocolError):
        read_frame(encode(Opcode.Ack), binary=False)


@pytest.mark.slow
def test_errors_have_codes(node) -> None:
    """Errors raise MeshError with the code and its name; user opcodes without a handler get UnknownOpcode."""
    async def main() -> None:
        async with connect(node.url) as client:
            with pytest.raises(MeshError) as caught:
                await client.subscribe("")
            assert (caught.value.code, caught.value.name) == (ErrorCode.InvalidChannel, "InvalidChannel")
            with pytest.raises(MeshError) as caught:
                await client.publish("closed", b"x")
            assert caught.value.code == ErrorCode.PermissionDenied
            assert client.channels == ()
            with pytest.raises(MeshError) as caught:
                await client.call(5000, b"x")
            assert caught.value.code == ErrorCode.UnknownOpcode
            with pytest.raises(MeshError) as caught:
                await client.call(Opcode.UserFirst + 1, watchable=Watchable("document", "nope"))
            assert caught.value.code == ErrorCode.InvalidArgument
            await client.publish("", b"x", ack=False)
            await client.ping()
            assert [e.code for e in client.errors] == [ErrorCode.InvalidChannel]
            assert client.state == "connected", "errors leave the session open"
    run(main())


@pytest.mark.slow
def test_refused_token() -> None:
    """A refused token is final: connect() raises AuthenticationFailed and the client is closed, not retrying."""
    async def main(url: str) -> None:
        changes: list[StateChange] = []
        client = Client(url, "wrong", retry_policy=FAST)
        client.add_state_listener(changes.append)
        client.start()
        with pytest.raises(MeshError) as caught:
            await client.wait_connected()
        assert caught.value.code == ErrorCode.AuthenticationFailed
        await client.wait_closed()
        assert [c.state for c in changes] == ["connecting", "disconnected", "closed"]
        assert isinstance(client.closed_reason, MeshError)
    _with_node(lambda url: run(main(url)))


@pytest.mark.slow
def test_jwt_refresh(node) -> None:
    """With a token callable giving short JWTs, Refresh keeps the session past its first token's exp."""
    import time

    import jwt

    tokens: list = []

    async def fresh() -> str:
        tokens.append(jwt.encode({"sub": "bob", "exp": time.time() + 2}, JWT_SECRET, algorithm="HS256"))
        return tokens[-1]

    async def main() -> None:
        changes: list[StateChange] = []
        async with connect(node.url, fresh, refresh_margin=60) as client:
            client.add_state_listener(changes.append)
            assert client.principal == "bob"
            session = client.session_id
            await asyncio.sleep(2.5)
            assert (await client.ping()).opcode == Opcode.Pong
            assert client.session_id == session and changes == []
            assert len(tokens) >= 2
    run(main())


@pytest.mark.slow
def test_watch_and_user_opcodes(node) -> None:
    """Watch, user opcode calls with payloads, and ResourceEvents from the documents extension."""
    async def main() -> None:
        async with connect(node.url) as watcher, connect(node.url) as writer:
            stream = watcher.events()
            await watcher.watch("document", "42")
            assert watcher.watchables == (Watchable("document", "42"),)
            put = await writer.call(Opcode.UserFirst, b"first draft", watchable=Watchable("document", "42"))
            assert put.payload == b"stored"
            [event] = await nth(stream)
            assert (event.event_type, event.watchable, event.payload) == (
                EventType.ResourceEvent, Watchable("document", "42"), b"first draft")
            got = await writer.call(Opcode.UserFirst + 1, watchable=Watchable("document", "42"))
            assert got.payload == b"first draft"
            await watcher.unwatch("document", "42")
            assert watcher.watchables == ()
    run(main())


def test_unreachable_fails_after_failures() -> None:
    """With fail_after_failures, connect() gives up with the connection error; without reconnect, at once."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    url = f"ws://127.0.0.1:{s.getsockname()[1]}"

    async def main() -> None:
        with pytest.raises(OSError):
            await connect(url, fail_after_failures=2, retry_policy=FAST)
        with pytest.raises(OSError):
            await connect(url, reconnect=False)
    try:
        run(main())
    finally:
        s.close()


def _with_node(body, *args: str) -> None:
    """Run ``body(url)`` with a node of its own (with tokens, if no args)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        if not args:
            config = cwd / "meshd.toml"
            config.write_text('[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[auth.tokens]\nalice = "s3cret"\n')
            args = ("--config", str(config))
        process = NodeProcess(*args, cwd=cwd)
        try:
            process.wait_listening()
            body(process.url)
        finally:
            process.stop()


# -- restarts ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_resubscribes_after_node_restart(tmp_path) -> None:
    """A node killed and started again on the same port: the client resubscribes, rewatches, and iteration goes on."""
    from .test_client_reconnect import NodeRestart

    class Case:  # what NodeRestart needs of a test case
        def mktemp(self) -> str:
            return str(tmp_path / "node")

        def addCleanup(self, f) -> None:
            cleanups.append(f)

    cleanups: list = []
    node = NodeRestart(Case())

    async def main() -> None:
        changes: list[StateChange] = []
        async with connect(node.url, retry_policy=lambda attempt: 0.1) as client:
            client.add_state_listener(changes.append)
            stream = client.events()
            await client.subscribe("chat")
            await client.watch("document", "1")
            first = client.session_id
            await asyncio.to_thread(node.restart)
            await wait_for(lambda: [c.state for c in changes].count("connected") == 1, "the reconnect", 20)
            assert client.session_id != first
            assert (client.channels, client.watchables) == (("chat",), (Watchable("document", "1"),))
            async with connect(node.url) as pub:
                await pub.publish("chat", b"after the restart")
            [event] = await nth(stream)
            assert event.payload == b"after the restart"
            states = [(c.state, c.code) for c in changes]
            assert states[0] == ("disconnected", 1006) and states[-1] == ("connected", None), states
    try:
        run(main(), timeout=60)
    finally:
        for f in reversed(cleanups):
            f()


@pytest.mark.slow
def test_drain_moves_to_the_next_url(tmp_path) -> None:
    """A draining node's 4007 makes the client reconnect at once to the next URL, subscriptions included."""
    nodes = []
    for name in ("a", "b"):
        cwd = tmp_path / name
        cwd.mkdir()
        config = cwd / "meshd.toml"
        config.write_text('[node]\ndrain_seconds = 1\n[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                          '[[rules]]\nmatch = "*"\nanonymous = ["subscribe", "publish"]\n')
        nodes.append(NodeProcess("--config", str(config), cwd=cwd))
    try:
        for n in nodes:
            n.wait_listening()

        async def main() -> None:
            changes: list[StateChange] = []
            async with connect([n.url for n in nodes], retry_policy=lambda attempt: 30.0) as client:
                client.add_state_listener(changes.append)
                await client.subscribe("news")
                nodes[0].proc.send_signal(signal.SIGTERM)
                await wait_for(lambda: "connected" in [c.state for c in changes], "the move", 10)
                assert client.url == nodes[1].url
                assert changes[0].code == 4007
                stream = client.events()
                async with connect(nodes[1].url) as pub:
                    await pub.publish("news", b"on b")
                assert [e.payload for e in await nth(stream)] == [b"on b"]
        run(main(), timeout=30)
    finally:
        for n in nodes:
            n.stop()


# -- the documentation's examples ------------------------------------------------------------------


def doc_examples(heading: str) -> list[str]:
    """The ```python blocks of the docs/clients.md section under ``heading``."""
    text = (ROOT / "docs" / "clients.md").read_text()
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def run_example(code: str, url: str) -> str:
    code = code.replace("ws://127.0.0.1:8765", url)
    result = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_docs_asyncio_examples_run(node) -> None:
    """The asyncio examples of docs/clients.md run against a node and print what they say."""
    subscribe, user_opcode = doc_examples("## Python: asyncio")
    out = run_example(subscribe, node.url)
    assert out.splitlines() == ["chat b'hello'", "disconnected (code 1000); not reconnecting", "closed"], out
    out = run_example(user_opcode + "\nimport asyncio\nasyncio.run(put('ws://127.0.0.1:8765'))\n", node.url)
    assert out == "b'stored'\n"


@pytest.mark.slow
def test_docs_twisted_examples_run(node) -> None:
    """The Twisted examples of docs/clients.md run against a node and print what they say."""
    one_session, reconnecting = doc_examples("## Python: Twisted")
    assert run_example(one_session, node.url) == "chat b'hello'\n"
    out = run_example(reconnecting, node.url)
    assert out.splitlines() == [f"connecting to {node.url} (attempt 1)", f"connected to {node.url}",
                                "chat b'hello'", "disconnected (code 1000); not reconnecting", "closed"], out
