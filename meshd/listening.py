# -*- test-case-name: tests.test_web -*-
"""Listening on an endpoint string now, and keeping the port that was bound.

``strports.service`` listens too, but does not say which port it bound; a
node listening on port 0 (in tests, or beside other nodes) must tell its
web page and its peers the port it got.

The workers of one host (:mod:`meshd.workers`) share their listeners: each
listens on the same ``tcp:`` port with ``SO_REUSEPORT`` (:func:`listen_shared`),
and the kernel spreads new connections over the workers listening.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from meshd.config import split_endpoint


def listen_now(reactor: Any, description: str, factory: Any) -> IListeningPort:
    """Listen on ``description`` and return the port; raise (``CannotListenError``, ...) if it cannot be bound.

    The endpoints a node listens on (tcp, ssl, unix) listen at once; one that
    would only listen later is refused rather than waited for.
    """
    outcome: list = []
    serverFromString(reactor, with_backlog(description)).listen(factory).addBoth(outcome.append)
    if not outcome:
        raise RuntimeError(f"{description!r}: the listener did not start at once")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


#: The listen backlog of a ``tcp:`` listener whose description sets none (Twisted's is 50): clients
#: reconnecting at once after a restart queue there until the node accepts them (the kernel caps it at
#: ``net.core.somaxconn``).
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=DEFAULT_BACKLOG`` added if it is a ``tcp:`` one that sets none."""
    parts = split_endpoint(description)
    if parts[0].lower() not in ("tcp", "tcp6") or any(p.startswith("backlog=") for p in parts[1:]):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


def tcp_address(description: str) -> "Optional[tuple[str, int, int]]":
    """``(interface, port, backlog)`` of a ``tcp:``/``tcp6:`` description; None for other kinds."""
    parts = split_endpoint(description)
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6"):
        return None
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    positional = [p for p in parts[1:] if "=" not in p]
    port = options.get("port") or (positional[0] if positional else "0")
    interface = options.get("interface") or ("::" if kind == "tcp6" else "")
    return interface, int(port), int(options.get("backlog", DEFAULT_BACKLOG))


def shared_socket(interface: str, port: int) -> socket.socket:
    """A TCP socket bound to ``interface:port`` with ``SO_REUSEPORT``, not listening yet."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
    except OSError as e:
        sock.close()
        raise CannotListenError(interface, port, e) from None
    return sock


def listen_shared(reactor: Any, description: str, factory: Any) -> IListeningPort:
    """Listen on a ``tcp:`` description with ``SO_REUSEPORT``, beside the other workers of the host.

    Other descriptions (``unix:``) listen as :func:`listen_now` does: they cannot be shared.
    """
    address = tcp_address(description)
    if address is None:
        return listen_now(reactor, description, factory)
    interface, port, backlog = address
    sock = shared_socket(interface, port)
    try:
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    except OSError as e:
        raise CannotListenError(interface, port, e) from None
    finally:
        sock.close()  # the reactor listens on its own copy


class Listening(Service):
    """A service that listens on an endpoint string while it runs.

    Like ``strports.service(description, factory)`` with its errors raised
    at start, and :attr:`port` holding the bound port while listening;
    ``shared``: beside the host's other workers (:func:`listen_shared`).
    """

    def __init__(self, description: str, factory: Any, reactor: Any = None, shared: bool = False) -> None:
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self.shared = shared
        self.port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self.port is None:
            if self._reactor is None:
                from twisted.internet import reactor

                self._reactor = reactor
            listen = listen_shared if self.shared else listen_now
            self.port = listen(self._reactor, self.description, self.factory)

    def stopService(self) -> Deferred:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return port.stopListening() or succeed(None)

    def address(self) -> Any:
        """The bound address (``getHost()``), or None while not listening."""
        return self.port.getHost() if self.port is not None else None
