# -*- test-case-name: tests.test_processes -*-
"""``meshctl``: talk to a meshd node from a shell.

Events are printed to standard output as JSON lines; status goes to
standard error.  Exit status: 0 done, 1 the node refused a request (or
``check-config`` found problems, one line each), 2 bad usage, 3 the node
could not be reached or closed the connection.

``sub`` and ``watch`` reconnect (meshd.client.ReconnectingClient): after a
cut they say so on standard error, subscribe or watch again, say so again
("subscribed to chat, news"), and go on printing events, however long the
node is away; with ``--retry-for SECONDS`` they give up (exit 3) after that
long without a connection.  ``sub --recover`` keeps the positions of history
channels (docs/recovery.md) and, after a cut, gets the events it missed first
("recovered 12 events on chat", or "not recovered on chat: ...").
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence
from uuid import UUID, uuid4

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from meshd.client import ConnectionClosed, EventStream, MeshError, ReconnectingClient, Recovery, StateChange, connect
from meshd.clientcore import CONNECTED, DISCONNECTED, describe_keys
from meshd.codec import Message, Watchable, event_type_name, opcode_name

DEFAULT_URL = "ws://127.0.0.1:8765"


def event_json(event: Message) -> dict[str, Any]:
    """The JSON form of one Event frame, as meshctl prints it."""
    out: dict[str, Any] = {"event": event_type_name(event.event_type)}
    _describe(event, out)
    return out


def answer_json(answer: Message) -> dict[str, Any]:
    """The JSON form of the answer to a request (Ack, Pong...)."""
    out: dict[str, Any] = {"answer": opcode_name(answer.opcode)}
    _describe(answer, out)
    return out


def _describe(event: Message, out: dict[str, Any]) -> None:
    if event.channel is not None:
        out["channel"] = event.channel
    if event.watchable is not None:
        out["watchable"] = {"kind": event.watchable.kind, "id": event.watchable.id}
    payload = event.payload or b""
    try:
        out["data"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        out["data_base64"] = base64.b64encode(payload).decode("ascii")
    if event.session is not None:
        out["session"] = str(event.session)
    if event.node is not None:
        out["node"] = str(event.node)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", action="append", metavar="URL",
                        help=f"node WebSocket URL (default {DEFAULT_URL}); sub and watch take several, "
                             "tried in turn when reconnecting (the others use the first)")
    common.add_argument("--token", help="authenticate with this token")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node")
    common.add_argument("--ca", type=Path, metavar="FILE",
                        help="for wss:// URLs: trust only the CA certificates in FILE (PEM), such as a private CA's, "
                             "instead of the system's")

    top = argparse.ArgumentParser(prog="meshctl", description="Talk to a meshd node.")
    top.add_argument("--version", action="version", version=_version(), help="print meshd's version and exit")
    commands = top.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("sub", parents=[common], help="subscribe and print events")
    sub.add_argument("channels", nargs="+", metavar="CHANNEL")
    sub.add_argument("--count", type=int, help="exit after this many events")
    sub.add_argument("--retry-for", type=float, default=math.inf, metavar="SECONDS",
                     help="after a cut, reconnect for this long before giving up (exit 3); "
                          "0: exit at once, negative or inf: never give up (the default)")
    sub.add_argument("--recover", action="store_true",
                     help="on history channels, keep positions and, after a cut, get the events missed first "
                          "(docs/recovery.md); says on standard error whether all could be recovered")

    pub = commands.add_parser("pub", parents=[common], help="publish one message")
    pub.add_argument("channel", metavar="CHANNEL")
    pub.add_argument("data", metavar="DATA", help="the message, sent as UTF-8")
    pub.add_argument("--exclude-self", action="store_true", help="not to this session")

    call = commands.add_parser("call", parents=[common], help="send one request (any opcode) and print the answer")
    call.add_argument("opcode", type=int, metavar="OPCODE", help="e.g. a user opcode, 1024 and up")
    call.add_argument("data", nargs="?", default="", metavar="DATA", help="payload, sent as UTF-8")
    call.add_argument("--channel")
    call.add_argument("--watchable", nargs=2, metavar=("KIND", "ID"))

    certs = commands.add_parser("certs", help="make a cluster CA and node certificates for the mesh")
    kinds = certs.add_subparsers(dest="certs_command", required=True)
    ca = kinds.add_parser("ca", help="create DIR/ca.pem and DIR/ca.key")
    ca.add_argument("--dir", required=True, type=Path, help="where the files go")
    ca.add_argument("--cluster", default="meshd", help="cluster name, written into the CA's name")
    ca.add_argument("--days", type=int, default=3650)
    node = kinds.add_parser("node", help="issue DIR/NAME.pem and DIR/NAME.key, signed by DIR/ca.*")
    node.add_argument("name", metavar="NAME")
    node.add_argument("--dir", required=True, type=Path, help="holds ca.pem and ca.key; gets the new files")
    node.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                      help="a DNS name or IP address the node is dialed by (repeatable; default NAME)")
    node.add_argument("--days", type=int, default=825)
    node.add_argument("--node-id", type=_node_id, metavar="UUID",
                      help="the node's id, written into the certificate; default: a new one, printed "
                           "to standard output (set it as [node] id in the node's configuration)")

    check = commands.add_parser(
        "check-config", help="check a node's configuration file as start-up would; exit 0, or 1 with one line per problem"
    )
    check.add_argument("file", type=Path, metavar="FILE")

    watch = commands.add_parser("watch", parents=[common], help="watch a resource and print events")
    watch.add_argument("kind", metavar="KIND")
    watch.add_argument("id", metavar="ID")
    watch.add_argument("--count", type=int, help="exit after this many events")
    watch.add_argument("--retry-for", type=float, default=math.inf, metavar="SECONDS",
                       help="after a cut, reconnect for this long before giving up (exit 3); "
                            "0: exit at once, negative or inf: never give up (the default)")
    return top


def _version() -> str:
    from meshd import __version__

    return f"meshd {__version__}"


def check_config(args: argparse.Namespace) -> int:
    """Print each problem of the configuration file as one line on standard error (exit 1), or OK."""
    from meshd.tap import check_file

    problems = check_file(args.file)
    for problem in problems:
        print(problem, file=sys.stderr, flush=True)
    if problems:
        return 1
    print(f"{args.file}: OK", flush=True)
    return 0


def _node_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def status(text: str) -> None:
    print(f"meshctl: {text}", file=sys.stderr, flush=True)


def tls_options(url: str, ca: Optional[Path]):
    """The TLS options to reach ``url`` with: None (the system's trust roots) without ``ca``,
    else a check against the CA certificates in the PEM file ``ca``.  Raises ``ValueError``."""
    if ca is None:
        return None
    from autobahn.websocket.util import parse_url
    from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates

    secure, host = parse_url(url)[:2]
    if not secure:
        raise ValueError(f"--ca is for wss:// URLs, not {url}")
    try:
        pem = ca.read_bytes()
    except OSError as e:
        raise ValueError(f"--ca: cannot read {ca}: {e.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"--ca: {ca}: not a PEM certificate: {e}") from None
    if not certificates:
        raise ValueError(f"--ca: {ca} holds no PEM certificate")
    return optionsForClientTLS(host, trustRoot=trustRootFromCertificates(certificates))


async def run(reactor, args: argparse.Namespace) -> int:
    args.urls = args.url or [DEFAULT_URL]
    try:
        tls = {url: tls_options(url, args.ca) for url in args.urls}
    except ValueError as e:
        status(str(e))
        return 2
    if args.command in ("sub", "watch"):
        return await Follower(reactor, args, tls).run()
    url = args.urls[0]
    try:
        client = await connect(url, args.token, reactor=reactor, timeout=args.timeout, tls_options=tls[url])
    except MeshError as e:
        status(f"the node refused the session: {e}")
        return 1
    except Exception as e:  # refused, unreachable, timed out, handshake failed
        status(f"cannot reach {url}: {e}")
        return 3
    try:
        if args.command == "call":
            answer = await client.request(
                args.opcode,
                channel=args.channel,
                watchable=Watchable(*args.watchable) if args.watchable else None,
                payload=args.data.encode("utf-8", "surrogateescape"),
            )
            print(json.dumps(answer_json(answer)), flush=True)
        else:
            await client.publish(args.channel, args.data.encode("utf-8", "surrogateescape"),
                                 exclude_self=args.exclude_self)
        await client.close()
        return 0
    except MeshError as e:
        status(str(e))
        return 1
    except ConnectionClosed as e:
        status(str(e))
        return 3


class Follower:
    """``meshctl sub`` and ``meshctl watch``: print events until ``--count``, across reconnects."""

    def __init__(self, reactor, args: argparse.Namespace, tls: dict) -> None:
        self.reactor = reactor
        self.args = args
        recover = bool(getattr(args, "recover", False))
        self.client = ReconnectingClient(args.urls, args.token, reactor=reactor, initial_delay=0.5, max_delay=5.0,
                                         handshake_timeout=args.timeout, tls_options=lambda url: tls[url],
                                         recover=recover)
        if recover:
            self.client.add_recovery_listener(self.recovered)
        self.connected_once = False
        self.gave_up: Optional[str] = None
        self._give_up_call = None

    def held(self) -> str:
        """The status line saying what is held, as after the first subscribe or watch."""
        if self.args.command == "sub":
            return f"subscribed to {', '.join(self.client.channels)}"
        return f"watching {describe_keys(self.client.watchables)}"

    def changed(self, change: StateChange) -> None:
        if not self.connected_once:
            return
        if change.state == DISCONNECTED:
            status(change.describe())
            retry_for = self.args.retry_for
            if change.retry and self._give_up_call is None and not (retry_for < 0 or math.isinf(retry_for)):
                self._give_up_call = self.reactor.callLater(max(0.0, retry_for), self.give_up)
        elif change.state == CONNECTED:
            if self._give_up_call is not None and self._give_up_call.active():
                self._give_up_call.cancel()
            self._give_up_call = None
            for key, error in change.dropped:
                status(f"refused again after reconnecting: {describe_keys([key])}: {error}")
            status(f"reconnected to {change.url}; {self.held()}")

    def recovered(self, recovery: Recovery) -> None:
        status(recovery.describe())

    def give_up(self) -> None:
        self.gave_up = f"gave up: no connection for {self.args.retry_for:g} s"
        self.client.close()

    async def run(self) -> int:
        args, client = self.args, self.client
        client.add_state_listener(self.changed)
        # Listen before asking, so that no event between the Ack and the loop is lost.
        stream = client.events()
        client.startService()
        try:
            # Each URL once: a node that cannot be reached at start is reported, not waited for.
            await client.when_connected(fail_after_failures=len(args.urls)).addTimeout(args.timeout, self.reactor)
        except MeshError as e:
            await client.close()
            status(f"the node refused the session: {e}")
            return 1
        except Exception as e:  # refused, unreachable, timed out, handshake failed
            await client.close()
            status(f"cannot reach {client.url}: {e}")
            return 3
        self.connected_once = True
        try:
            if args.command == "sub":
                for channel in args.channels:
                    await client.subscribe(channel)
            else:
                await client.watch(args.kind, args.id)
        except (MeshError, ConnectionClosed) as e:
            await client.close()
            status(str(e))
            return 1 if isinstance(e, MeshError) else 3
        status(self.held())
        return await self.print_events(stream)

    async def print_events(self, stream: EventStream) -> int:
        count = self.args.count
        if count is not None and count <= 0:
            await self.client.close()
            return 0
        seen = 0
        async for event in stream:
            print(json.dumps(event_json(event)), flush=True)
            seen += 1
            if count is not None and seen >= count:
                await self.client.close()
                return 0
        status(self.gave_up or f"stopped: {self.client.closed_reason}")
        return 3


def certs(args: argparse.Namespace) -> int:
    from meshd.mesh.certs import create_ca, issue_node

    node_id = None
    try:
        if args.certs_command == "ca":
            paths = create_ca(args.dir, args.cluster, args.days)
        else:
            node_id = args.node_id or uuid4()
            paths = issue_node(args.dir, args.name, args.san, args.days, node_id=node_id)
    except (OSError, ValueError) as e:
        status(str(e))
        return 1
    for path in paths:
        status(f"wrote {path}")
    if node_id is not None:
        status(f'the certificate is for node {node_id}: set [node] id = "{node_id}" in that node\'s configuration')
        print(node_id, flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "certs":
        sys.exit(certs(args))
    if args.command == "check-config":
        sys.exit(check_config(args))

    def start(reactor) -> Deferred:
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(run(reactor, args)).addCallback(_exit)

    react(start)


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)
