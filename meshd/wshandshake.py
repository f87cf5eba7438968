# -*- test-case-name: tests.test_wshandshake -*-
"""The WebSocket opening handshake as bytes: the plain requests the node answers itself, and its answer.

Sans-IO: bytes in, values out, no Twisted or Autobahn.  Almost every
client that is not a browser sends the same kind of request: ``GET``,
HTTP/1.1, a Host, ``Upgrade: websocket``, ``Connection: Upgrade``,
version 13, a key, the subprotocols it offers, and nothing that needs a
judgment (no ``Origin``, no extensions offered, no ``X-Forwarded-For``).
:func:`plain_upgrade` recognises exactly those, parsing the request once;
anything else, and anything malformed, is None, and goes to Autobahn's
parser, which answers it as it always did (refusals included).  So this
module never refuses anything: it only takes the requests that would be
accepted as they are, and :func:`switching_protocols` answers them with
the bytes Autobahn would send (RFC 6455, 4.2.2).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from typing import Iterable, NamedTuple, Optional
from urllib.parse import parse_qs

#: Headers whose presence needs a judgment this module leaves to Autobahn (origin policy,
#: compression offers, trusted proxies, older protocol versions).
JUDGED = frozenset({b"origin", b"sec-websocket-origin", b"sec-websocket-extensions", b"x-forwarded-for"})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Visible ASCII, space and tab: stricter than HTTP allows (no obs-text), so that what is taken
#: here Autobahn would take too.
_VALUE = re.compile(rb"[\x20-\x7e\t]*")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_KEY = re.compile(rb"[A-Za-z0-9+/]{22}==")
_PORT = re.compile(rb"[0-9]+")
_MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Upgrade(NamedTuple):
    """A plain opening-handshake request, as :func:`plain_upgrade` found it."""

    #: The request target's path and query (before and after ``?``).
    path: str
    query: str
    #: The Host header without its port.
    host: str
    #: The Sec-WebSocket-Key.
    key: str
    #: The subprotocols offered, in the client's order.
    protocols: list
    #: Every header, by lower-case name.
    headers: dict

    def params(self) -> dict:
        """The query's parameters, as Autobahn gives them (``parse_qs``)."""
        return parse_qs(self.query) if self.query else {}


def plain_upgrade(request: bytes) -> Optional[Upgrade]:
    """``request`` (request line and headers through the blank line) if it is a plain WebSocket upgrade, else None."""
    if not request.endswith(b"\r\n\r\n"):
        return None
    lines = request[:-4].split(b"\r\n")
    start = lines[0].split(b" ")
    if len(start) != 3 or start[0] != b"GET" or start[2] != b"HTTP/1.1" or not _TARGET.fullmatch(start[1]):
        return None
    target = start[1]
    if b"#" in target or b";" in target:
        return None  # fragments are refused, parameters split differently: Autobahn's to judge
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return None
        value = value.strip(b" \t")
        name = name.lower()
        if name in headers or name in JUDGED or not _VALUE.fullmatch(value):
            return None
        headers[name] = value
    host = headers.get(b"host")
    key = headers.get(b"sec-websocket-key")
    if (
        host is None
        or key is None
        or headers.get(b"sec-websocket-version") != b"13"
        or not _KEY.fullmatch(key)
        or not _has_token(headers.get(b"upgrade"), b"websocket")
        or not _has_token(headers.get(b"connection"), b"upgrade")
    ):
        return None
    if b":" in host and not host.endswith(b"]"):
        host, _, port = host.rpartition(b":")
        if not _PORT.fullmatch(port.strip()):
            return None
    offered = headers.get(b"sec-websocket-protocol")
    protocols = [p.strip().decode("ascii") for p in offered.split(b",")] if offered is not None else []
    if len(set(protocols)) != len(protocols):
        return None
    path, _, query = target.partition(b"?")
    return Upgrade(
        path.decode("ascii"), query.decode("ascii"), host.strip().decode("ascii"), key.decode("ascii"), protocols,
        {name.decode("ascii"): value.decode("ascii") for name, value in headers.items()},
    )


def _has_token(value: Optional[bytes], token: bytes) -> bool:
    """Whether the comma-separated header ``value`` lists ``token`` (case-insensitive)."""
    if value is None:
        return False
    value = value.lower()
    return value == token or any(part.strip() == token for part in value.split(b","))


def accept(key: str) -> str:
    """The Sec-WebSocket-Accept answering ``key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _MAGIC).digest()).decode("ascii")


def switching_protocols(key: str, protocol: Optional[str], server: Optional[str] = None,
                        headers: Iterable[tuple[str, object]] = ()) -> bytes:
    """The 101 answer to a request with ``key``, selecting ``protocol``: the bytes Autobahn sends.

    ``headers``: extra (name, value) pairs, a value being a string or an
    iterable of strings (one line each).
    """
    extra = tuple(
        f"{name}: {v}"
        for name, value in headers
        for v in ([value] if isinstance(value, str) or not hasattr(value, "__iter__") else value)
    )
    return _answer_head(server, protocol, extra) + accept(key).encode("ascii") + b"\r\n\r\n"


@lru_cache(maxsize=64)
def _answer_head(server: Optional[str], protocol: Optional[str], extra: tuple) -> bytes:
    """Everything of the 101 answer before the accept value: the same for every connection of a node."""
    lines = ["HTTP/1.1 101 Switching Protocols"]
    if server:
        lines.append(f"Server: {server}")
    lines += ["Upgrade: WebSocket", "Connection: Upgrade", *extra]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines.append("Sec-WebSocket-Accept: ")
    return "\r\n".join(lines).encode("utf-8")
