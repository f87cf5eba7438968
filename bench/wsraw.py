"""A minimal WebSocket client for the load generator: as little Python per message as possible.

Autobahn's client spends tens of microseconds per received message; a load
generator built on it would measure itself.  This client does the opening
handshake, then only splits the incoming stream into messages (server
frames are never masked) and hands each payload to a callback.
"""

from __future__ import annotations

import base64
import os
import struct
import time
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


def mask(payload: bytes, opcode: int = 0x2, key: bytes = b"\0\0\0\0") -> bytes:
    """A masked, final client frame (binary unless ``opcode`` says otherwise) carrying ``payload``.

    The load generator masks with a zero key unless given one: the server
    unmasks every frame the same way whatever its key, and a load generator
    on loopback has no proxy to protect, so the masking itself would only
    spend the generator's time.
    """
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes([first, 0x80 | n])
    elif n < 65536:
        header = bytes([first, 0x80 | 126]) + _U16.pack(n)
    else:
        header = bytes([first, 0x80 | 127]) + _U64.pack(n)
    if key == b"\0\0\0\0" or not n:
        return header + key + payload
    repeated = (key * (n // 4 + 1))[:n]
    return header + key + (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def opening_request(host: str, key: str, path: str = "/", subprotocol: Optional[str] = None) -> bytes:
    """The bytes of a client's opening handshake request (RFC 6455, 4.1)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def split_frames(buffer: bytes) -> "tuple[list[tuple[int, int, int]], int]":
    """The whole server frames at the front of ``buffer`` as (opcode, payload start, payload end), and
    where the first partial one starts (server frames are never masked)."""
    frames = []
    at, n = 0, len(buffer)
    while n - at >= 2:
        length = buffer[at + 1] & 0x7F
        start = at + 2
        if length == 126:
            if n - at < 4:
                break
            length = _U16.unpack_from(buffer, start)[0]
            start += 2
        elif length == 127:
            if n - at < 10:
                break
            length = _U64.unpack_from(buffer, start)[0]
            start += 8
        end = start + length
        if end > n:
            break
        frames.append((buffer[at] & 0x0F, start, end))
        at = end
    return frames, at


class RawWebSocket(Protocol):
    """Call ``on_message(payload)`` for each message; ``opened`` fires after the handshake.

    ``RawWebSocket.read_at`` is the monotonic time (ns) at which the data
    being handled was read: one clock reading per read, not per message.
    """

    read_at = 0

    def __init__(self, path: str = "/", subprotocol: Optional[str] = None,
                 on_message: Optional[Callable[[bytes], None]] = None) -> None:
        self.path = path
        self.subprotocol = subprotocol
        self.on_message = on_message or (lambda payload: None)
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self._buffer = b""
        self._open = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        key = base64.b64encode(os.urandom(16)).decode()
        host = self.transport.getPeer()
        self.transport.write(opening_request(f"{host.host}:{host.port}", key, self.path, self.subprotocol))

    def send(self, payload: bytes) -> None:
        self.transport.write(mask(payload))

    def dataReceived(self, data: bytes) -> None:
        RawWebSocket.read_at = time.monotonic_ns()
        buffer = self._buffer + data if self._buffer else data
        if not self._open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            if b" 101 " not in status:
                self.transport.loseConnection()
                self.opened.errback(ConnectionError(status.decode(errors="replace")))
                return
            self._open = True
            buffer = buffer[end + 4 :]
            self.opened.callback(self)
        on_message = self.on_message
        frames, at = split_frames(buffer)
        for opcode, start, end in frames:
            if opcode == 0x2:
                on_message(buffer[start:end])
            elif opcode == 0x9:  # ping: answer with the same payload
                self.transport.write(mask(buffer[start:end], opcode=0xA))
            elif opcode == 0x8:
                self.transport.loseConnection()
        self._buffer = buffer[at:]

    def connectionLost(self, reason=None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError("closed during the handshake"))
        self.closed.callback(None)
