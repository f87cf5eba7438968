# -*- test-case-name: tests.test_handlers -*-
"""Opcode handlers: the registry that maps opcodes to code, and one request's context.

A handler is a callable taking a :class:`Request`.  What it does decides the
answer the client gets:

- returns ``None`` (or a Deferred firing ``None``): an ``Ack`` if the frame
  had a request id;
- returns ``bytes``: an ``Ack`` carrying those bytes as its payload;
- raises :class:`meshd.codec.ProtocolError`: an ``Error`` with that code;
- raises anything else: an ``Error`` with ``InternalError``, and the failure
  is logged; the session and the node carry on;
- calls :meth:`Request.reply` itself: that frame is the answer, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from meshd.codec import ErrorCode, Message, Opcode, ProtocolError, encode, opcode_name

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.session import Session
    from meshd.state import NodeState

Handler = Callable[["Request"], Any]

#: Opcodes only nodes send; a client sending one gets UnknownOpcode.
SERVER_OPCODES = frozenset({Opcode.Welcome, Opcode.Event, Opcode.Ack, Opcode.Error, Opcode.Pong, Opcode.Batch})


class Request:
    """One frame from one session, as a handler sees it."""

    __slots__ = ("app", "session", "message", "replied")

    def __init__(self, app: "Application", session: "Session", message: Message) -> None:
        self.app = app
        self.session = session
        self.message = message
        self.replied = False

    @property
    def state(self) -> "NodeState":
        return self.app.state

    def reply(self, opcode: int = Opcode.Ack, **fields: Any) -> None:
        """Answer this request with one frame echoing its request id."""
        self.replied = True
        self.session.send_frame(encode(opcode, request_id=self.message.request_id, **fields))

    def fail(self, code: int, message: str) -> None:
        """Answer this request with an Error frame."""
        self.reply(Opcode.Error, error_code=code, message=message)


@dataclass(frozen=True)
class Registration:
    handler: Handler
    requires_hello: bool


class Handlers:
    """Maps opcodes to handlers.

    User opcodes are ``Opcode.UserFirst`` (1024) and above.  Replacing a
    built-in handler is allowed but must be asked for with ``replace=True``.
    """

    def __init__(self) -> None:
        self._table: dict[int, Registration] = {}

    def register(
        self, opcode: int, handler: Handler, *, requires_hello: bool = True, replace: bool = False
    ) -> None:
        if not 0 < opcode <= 0xFFFF:
            raise ValueError(f"opcode {opcode} is outside 1..65535")
        if opcode in SERVER_OPCODES:
            raise ValueError(f"{opcode_name(opcode)} is sent by nodes and cannot be handled")
        if opcode < Opcode.UserFirst and opcode not in self._table:
            raise ValueError(
                f"opcode {opcode} is reserved for built-ins; user opcodes start at {Opcode.UserFirst}"
            )
        if opcode in self._table and not replace:
            raise ValueError(f"opcode {opcode_name(opcode)} already has a handler (use replace=True)")
        self._table[opcode] = Registration(handler, requires_hello)

    def unregister(self, opcode: int) -> None:
        self._table.pop(opcode, None)

    def get(self, opcode: int) -> Optional[Registration]:
        return self._table.get(opcode)

    def _install(self, opcode: int, handler: Handler, requires_hello: bool = True) -> None:
        """Register a built-in (no reserved-range check)."""
        self._table[opcode] = Registration(handler, requires_hello)


def lookup(handlers: Handlers, session: "Session", message: Message) -> Registration:
    """Find the handler for ``message`` or raise the ProtocolError the client should get."""
    registration = handlers.get(message.opcode)
    if registration is None:
        if message.opcode in SERVER_OPCODES:
            why = f"{opcode_name(message.opcode)} is sent by nodes, not by clients"
        else:
            why = f"no handler for opcode {opcode_name(message.opcode)}"
        raise ProtocolError(ErrorCode.UnknownOpcode, why)
    if registration.requires_hello and not session.helloed:
        raise ProtocolError(
            ErrorCode.HelloRequired, f"send Hello before {opcode_name(message.opcode)}"
        )
    return registration
