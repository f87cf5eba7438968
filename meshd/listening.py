# -*- test-case-name: tests.test_web -*-
"""Listening on an endpoint string now, and keeping the port that was bound.

``strports.service`` listens too, but does not say which port it bound; a
node listening on port 0 (in tests, or beside other nodes) must tell its
web page and its peers the port it got.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure


def listen_now(reactor: Any, description: str, factory: Any) -> IListeningPort:
    """Listen on ``description`` and return the port; raise (``CannotListenError``, ...) if it cannot be bound.

    The endpoints a node listens on (tcp, ssl, unix) listen at once; one that
    would only listen later is refused rather than waited for.
    """
    outcome: list = []
    serverFromString(reactor, description).listen(factory).addBoth(outcome.append)
    if not outcome:
        raise RuntimeError(f"{description!r}: the listener did not start at once")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class Listening(Service):
    """A service that listens on an endpoint string while it runs.

    Like ``strports.service(description, factory)`` with its errors raised
    at start, and :attr:`port` holding the bound port while listening.
    """

    def __init__(self, description: str, factory: Any, reactor: Any = None) -> None:
        self.description = description
        self.factory = factory
        self._reactor = reactor
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
            self.port = listen_now(self._reactor, self.description, self.factory)

    def stopService(self) -> Deferred:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return port.stopListening() or succeed(None)

    def address(self) -> Any:
        """The bound address (``getHost()``), or None while not listening."""
        return self.port.getHost() if self.port is not None else None
