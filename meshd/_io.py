# -*- test-case-name: tests.test_io -*-
"""Every byte meshd writes, and the one place that reaches into Twisted's and Autobahn's internals.

Nothing else in meshd reads a private attribute of Twisted or Autobahn.
What is used here, and why, is listed in :data:`INTERNALS`;
``tests/test_io.py`` checks that each still exists and behaves, so that an
upgrade of either fails CI rather than production, and each use falls back
to a public API when its internal is missing (:func:`missing_internals`).

The pieces:

- :class:`Outlet`: one connection's output, shared by WebSocket sessions and
  mesh links.  What is written during a reactor turn is gathered and
  written at its end in one piece; every byte counts against one bound
  (events, batches, answers and Autobahn's own frames alike); the outlet is
  its transport's streaming producer, so it knows when the peer stops
  reading.
- :class:`EndOfTurn`: the one end-of-turn scheduler.  Its steps run once per
  turn, in a fixed order (see the class).
- :func:`write_now`: a write that reaches the kernel in the same call when
  nothing is queued before it.
- :class:`LinkTLSFactory` and :func:`link_tls_endpoint`: TLS whose records
  of one write leave in one ``send()``.
- :func:`use_exact_timers`: Autobahn's timeouts at the reactor's precision.
- :class:`FastServerProtocol`: Autobahn's server protocol fed by the sans-IO
  splitter (:mod:`meshd.wsframes`), with its writes going through an outlet.
- :class:`FastServerFactory`: its connections share the factory's options
  instead of each copying (and formatting) them.
"""

from __future__ import annotations

from time import perf_counter
from typing import Callable, Optional

import txaio
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import Timings, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from OpenSSL.SSL import WantReadError
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.tcp import Client, Server
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from meshd import wsframes, wshandshake

#: The private attributes used here, by owner, with what each is for.
INTERNALS = {
    "twisted.internet.tcp.Connection": {
        "writeSomeData": "write_now: hand bytes to send() directly",
        "_tempDataLen": "write_now: bytes Twisted holds that are not in dataBuffer yet",
        "dataBuffer": "write_now: Twisted's write buffer",
        "offset": "write_now: how much of dataBuffer was sent",
        "_aborting": "write_now: abortConnection was called",
        "socket": "FastServerProtocol: read the request that came with a new connection at once",
        "bufferSize": "FastServerProtocol: read the request that came with a new connection at once",
    },
    "twisted.protocols.tls.TLSMemoryBIOProtocol": {
        "_write": "LinkTLSProtocol: gather the records of one write",
        "_flushSendBIO": "LinkTLSProtocol: take records out of OpenSSL's send BIO",
        "_tlsConnection": "LinkTLSProtocol: the OpenSSL connection",
        "_aborted": "LinkTLSProtocol: abortConnection was called",
    },
    "autobahn.websocket.protocol.WebSocketProtocol": {
        "_dataReceived": "FastServerProtocol: Autobahn's parser, without its per-read log formatting",
        "data": "FastServerProtocol: Autobahn's input buffer (a handshake under way is put there whole, once)",
        "current_frame": "FastServerProtocol: Autobahn is inside a frame",
        "inside_message": "FastServerProtocol: Autobahn is inside a fragmented message",
        "consumeData": "FastServerProtocol: let Autobahn parse its buffer",
        "autoPingTimeoutCall": "FastServerProtocol: any traffic answers a ping",
        "_cancelAutoPingTimeoutCall": "FastServerProtocol: any traffic answers a ping",
        "CONFIG_ATTRS": "FastServerFactory: the options connectionMade copies onto each connection (and pformats)",
        "openHandshakeTimeoutCall": "FastServerProtocol: a plain handshake stops the opening-handshake timer",
        "autoPingPendingCall": "FastServerProtocol: a plain handshake starts auto-ping",
        "_sendAutoPing": "FastServerProtocol: a plain handshake starts auto-ping",
        "is_open": "FastServerProtocol: a plain handshake resolves it, as Autobahn's does",
        "_connectionMade": "FastServerProtocol: a new connection's state as class defaults (see _FRESH)",
        "_connectionLost": "FastServerProtocol: the server's, without formatting a debug line per connection",
    },
    "autobahn.twisted.websocket.WebSocketServerProtocol": {
        "_onOpen": "FastServerProtocol: a plain handshake opens the connection as Autobahn's does",
        "_transport_details": "FastServerProtocol: made at first use (a plain TCP connection never uses it)",
    },
    "autobahn.websocket.protocol.WebSocketServerFactory": {
        "_batched_timer": "use_exact_timers: Autobahn's timers round deadlines to a whole second",
    },
}

_OPEN = WebSocketProtocol.STATE_OPEN
_PLAIN_TCP = (Server, Client)


def missing_internals() -> list[str]:
    """The internals in :data:`INTERNALS` that this Twisted and Autobahn lack (none, when covered)."""
    from autobahn.websocket.protocol import WebSocketServerFactory
    from twisted.internet.tcp import Connection

    owners = {
        "autobahn.twisted.websocket.WebSocketServerProtocol": WebSocketServerProtocol,
        "twisted.internet.tcp.Connection": Connection,
        "twisted.protocols.tls.TLSMemoryBIOProtocol": TLSMemoryBIOProtocol,
        "autobahn.websocket.protocol.WebSocketProtocol": WebSocketProtocol,
        "autobahn.websocket.protocol.WebSocketServerFactory": WebSocketServerFactory,
    }
    missing = []
    for owner, names in INTERNALS.items():
        cls = owners[owner]
        source = _source_names(cls)
        for name in names:
            if not hasattr(cls, name) and name not in source:
                missing.append(f"{owner}.{name}")
    return missing


def _source_names(cls) -> set:
    """Names assigned as ``self.NAME`` anywhere in ``cls``'s methods (instance attributes)."""
    names: set = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            code = getattr(value, "__code__", None)
            if code is not None:
                names.update(code.co_names)
    return names


_MISSING = frozenset(missing_internals())
#: Whether the direct write can be used, and a new connection read at once (else: ``transport.write``, the
#: reactor's next poll).
DIRECT_WRITE = not any(m.startswith("twisted.internet.tcp.") for m in _MISSING)
#: Whether TLS records can be gathered (else: Twisted's own TLS writes).
GATHER_TLS = not any(m.startswith("twisted.protocols.tls.") for m in _MISSING)
#: Whether the node splits client frames itself (else: Autobahn's parser, ``onMessage``).
FAST_PATH = not any(m.startswith("autobahn.websocket.protocol.WebSocketProtocol.") for m in _MISSING)
#: Whether the node answers plain opening handshakes itself (else: Autobahn's parser answers every one).
PLAIN_HANDSHAKE = FAST_PATH and not any(
    m.rsplit(".", 1)[1] in ("openHandshakeTimeoutCall", "autoPingPendingCall", "_sendAutoPing", "is_open", "_onOpen")
    for m in _MISSING
)
#: Whether a new connection starts from class defaults, and its steps skip their debug lines (else: Autobahn's
#: ``_connectionMade`` sets every field of every connection, and both steps format their debug lines).
LEAN_LIFECYCLE = not any(m.endswith(("._connectionMade", "._connectionLost", "._transport_details", "._onOpen"))
                         for m in _MISSING)
#: Whether connections can share their factory's options (else: Autobahn copies them onto each).
SHARED_OPTIONS = "autobahn.websocket.protocol.WebSocketProtocol.CONFIG_ATTRS" not in _MISSING
#: Whether Autobahn's timers can be made exact (else: they stay rounded).
EXACT_TIMERS = not any(m.startswith("autobahn.websocket.protocol.WebSocketServerFactory.") for m in _MISSING)


# -- the direct write ----------------------------------------------------------------


def write_now(transport, data: bytes) -> None:
    """Write ``data`` to ``transport``, to the kernel at once when nothing is queued before it.

    On a plain TCP connection whose Twisted buffer is empty this is one
    ``send()`` system call, with no registration for write events (two
    ``epoll_ctl`` calls otherwise) and no wait for the next poll; what the
    kernel does not take, and anything on other transports, goes through
    ``transport.write`` as usual.
    """
    if (
        DIRECT_WRITE
        and type(transport) in _PLAIN_TCP
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # else the connection is gone: the buffered write fails again at the
        # next poll, where the reactor closes the connection, also when it
        # no longer reads from it.
    transport.write(data)


# -- one connection's output -----------------------------------------------------------


@implementer(IPushProducer)
class Outlet:
    """One connection's output: gathered per reactor turn, bounded, and told when the peer stops reading.

    :meth:`write` queues bytes for the end of the turn (:class:`EndOfTurn`
    writes them in one piece); :meth:`write_through` writes at once, after
    what is queued (for frames whose timing matters to their sender, such as
    Autobahn's close frames).  Both count against ``limit``: the outlet is
    its transport's streaming producer, and once the transport has asked it
    to pause and stayed full past the end of that reactor turn, every byte
    written is added to :attr:`backlog`.  Past ``limit`` the peer is too slow,
    ``on_overflow`` is called once and :meth:`write` refuses what follows.
    A burst written within one turn is not counted: the peer has had no
    chance to read any of it yet.  The count restarts only when the
    transport has written everything out (``resumeProducing``).  With
    ``pause_reading``, the transport is not read from while it is full.
    """

    __slots__ = (
        "transport", "turn", "limit", "on_overflow", "accepting", "overflowed", "written", "backlog",
        "pause_reading", "_pending", "_paused", "_counting", "_arming", "_clock",
    )

    log = Logger()

    def __init__(
        self,
        transport,
        turn: "EndOfTurn",
        limit: int,
        on_overflow: Callable[[], None],
        accepting: bool = True,
        pause_reading: bool = False,
    ) -> None:
        self.transport = transport
        self.turn = turn
        self.limit = limit
        self.on_overflow = on_overflow
        #: Whether :meth:`write` takes data: not before a WebSocket is open,
        #: nor once it is closing, nor past the limit.
        self.accepting = accepting
        #: Past the limit.
        self.overflowed = False
        #: Bytes handed to the transport so far.
        self.written = 0
        #: Bytes written while the transport stayed full (see the class).
        self.backlog = 0
        #: Stop reading from the transport while its output is stuck, so
        #: that a peer that does not read cannot make the node produce more
        #: (answers to its requests, pongs).  Not for mesh links: two nodes
        #: that both stopped reading while writing to each other would wait
        #: for each other.
        self.pause_reading = pause_reading
        self._pending: list[bytes] = []
        self._paused = False
        self._counting = False
        self._arming = None
        self._clock = turn.clock
        transport.registerProducer(self, True)

    def __repr__(self) -> str:
        return f"<Outlet backlog={self.backlog} pending={len(self._pending)}>"

    @property
    def stuck(self) -> bool:
        """The transport is full: the peer is not reading what it was sent."""
        return self._paused

    @property
    def pending(self) -> int:
        """Bytes queued for the end of this turn."""
        return sum(map(len, self._pending))

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the end of the turn; False if not :attr:`accepting` (closing, over the limit)."""
        if not self.accepting:
            return False
        if self._counting and self._count(len(data)):
            return False
        pending = self._pending
        pending.append(data)
        if len(pending) == 1:
            self.turn.dirty(self)
        return True

    def write_through(self, data: bytes) -> None:
        """Write ``data`` now, after what is queued; counted, but never refused."""
        if self._counting:
            self._count(len(data))
        pending = self._pending
        if pending:
            pending.append(data)
            self.flush()
        elif self.transport is not None:
            self.written += len(data)
            write_now(self.transport, data)

    def flush(self) -> None:
        """Write what is queued, in one piece."""
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if self.transport is not None:
            self.written += len(data)
            write_now(self.transport, data)

    def discard(self) -> None:
        """Drop what is queued (the connection is being aborted)."""
        self._pending.clear()

    def _count(self, size: int) -> bool:
        """Add ``size`` to the backlog; True (once) when that puts it over the limit."""
        self.backlog += size
        if self.backlog <= self.limit or self.overflowed:
            return self.overflowed
        self.overflowed = True
        self.accepting = False
        self._pending.clear()
        self.on_overflow()
        return True

    # -- IPushProducer: the transport says when its buffer is full, and when it drained

    def pauseProducing(self) -> None:
        # Twisted's TCP transport calls this on every write while its buffer
        # is over its size: only the first call starts anything.
        if self._paused:
            return
        self._paused = True
        if self.pause_reading and self.transport is not None:
            self.transport.pauseProducing()
        if self._clock is None:
            self._counting = True
        else:
            self._arming = self._clock.callLater(0, self._start_counting)

    def _start_counting(self) -> None:
        self._arming = None
        if self._paused:
            self._counting = True

    def resumeProducing(self) -> None:
        paused = self._paused
        self._reset()
        if paused and self.pause_reading and self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self._reset()

    def _reset(self) -> None:
        if self._arming is not None:
            if self._arming.active():
                self._arming.cancel()
            self._arming = None
        self._paused = False
        self._counting = False
        self.backlog = 0


class EndOfTurn:
    """Runs the per-turn steps once, at the end of a reactor turn, in a fixed order.

    Work that many events of one turn share is put off until the turn ends
    (``callLater(0)``: before the reactor polls again, so nothing waits longer
    than it would in Twisted's own write buffer).  The steps, in order:

    1. :data:`COALESCE`: sessions that take Batch frames turn the channel
       events queued for them this turn into frames (:mod:`meshd.delivery`);
       they write into outlets, so this comes before the flush.
    2. :data:`ANNOUNCE`: the mesh sends this turn's changes of channel
       interest to its links; also into outlets.
    3. The flush: every outlet written to this turn writes its bytes in one
       piece, one write per connection.
    4. The timing: in a turn that read a client frame (:meth:`reading`),
       :attr:`timed` is given the seconds from that first read to the end
       of the flush.  Two clock reads per such turn, none per message.

    A step that raises is logged and the others still run.
    """

    COALESCE = 0
    ANNOUNCE = 1

    log = Logger()

    __slots__ = ("clock", "timed", "first_read", "_steps", "_wanted", "_dirty", "_call")

    def __init__(self, clock) -> None:
        self.clock = clock
        #: Called once per turn that read a client frame, with its seconds (see the class); None: not timed.
        self.timed: Optional[Callable[[float], None]] = None
        #: When this turn's first client frame was read (``perf_counter``), or None.
        self.first_read: Optional[float] = None
        self._steps: list[Optional[Callable[[], None]]] = [None, None]
        self._wanted = [False, False]
        self._dirty: list[Outlet] = []
        self._call = None

    def register(self, step: int, run: Callable[[], None]) -> None:
        """Make ``run`` the step ``step`` (:data:`COALESCE` or :data:`ANNOUNCE`)."""
        if self._steps[step] is not None:
            raise ValueError(f"step {step} has a runner already")
        self._steps[step] = run

    def want(self, step: int) -> None:
        """Run ``step`` at the end of this turn."""
        self._wanted[step] = True
        if self._call is None:
            self._call = self.clock.callLater(0, self.run)

    def dirty(self, outlet: Outlet) -> None:
        """Flush ``outlet`` at the end of this turn."""
        self._dirty.append(outlet)
        if self._call is None:
            self._call = self.clock.callLater(0, self.run)

    def reading(self) -> None:
        """A client frame was read, the turn's first (callers check :attr:`first_read` is None)."""
        if self.timed is not None:
            self.first_read = perf_counter()
            if self._call is None:
                self._call = self.clock.callLater(0, self.run)

    def run(self) -> None:
        """Run the wanted steps and flush, now (the end of the turn)."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        wanted, steps = self._wanted, self._steps
        for step, run in enumerate(steps):
            if wanted[step]:
                wanted[step] = False
                if run is not None:
                    try:
                        run()
                    except Exception:
                        self.log.failure("End-of-turn step {step} failed", step=step)
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for outlet in dirty:
                try:
                    outlet.flush()
                except Exception:  # one broken connection must not stall the others
                    self.log.failure("Writing to {outlet} failed", outlet=outlet)
        started = self.first_read
        if started is not None:
            self.first_read = None
            self.timed(perf_counter() - started)


# -- TLS records, gathered --------------------------------------------------------------


class LinkTLSProtocol(TLSMemoryBIOProtocol):
    """TLS whose records go to the kernel as soon as they are made, one ``send()`` per write.

    Twisted's TLS layer writes its records to the TCP transport, which
    keeps them until the reactor polls again, registering for write events
    and unregistering once written: two ``epoll_ctl`` calls per write.  Here
    the records of one write (one per 16 KiB) are gathered and handed to
    :func:`write_now` together.
    """

    _gathered: "list[bytes] | None" = None

    def _write(self, data: bytes) -> None:
        if not GATHER_TLS:
            super()._write(data)
            return
        self._gathered = gathered = []
        try:
            super()._write(data)
        finally:
            self._gathered = None
            if gathered:
                self._send(b"".join(gathered))

    def _flushSendBIO(self) -> None:
        if not GATHER_TLS:
            super()._flushSendBIO()
            return
        try:
            records = self._tlsConnection.bio_read(2**15)
        except WantReadError:  # nothing to send
            return
        if self._gathered is not None:
            self._gathered.append(records)
        else:
            self._send(records)

    def _send(self, records: bytes) -> None:
        if self._aborted:
            # What an aborted connection says goes nowhere, as with Twisted's own.
            self.transport.write(records)
        else:
            write_now(self.transport, records)


class LinkTLSFactory(TLSMemoryBIOFactory):
    """TLS for links, without Twisted's aggregation of small writes.

    A link already gathers its frames of one reactor turn into one write;
    Twisted's default TLS transport would hold that write for one more
    reactor iteration, which under load is a whole batch of publishes later.
    """

    protocol = LinkTLSProtocol


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """``wrapClientTLS``, with :class:`LinkTLSFactory` in place of Twisted's TLS factory."""

    def __init__(self, options, endpoint: IStreamClientEndpoint) -> None:
        self._options = options
        self._endpoint = endpoint

    def connect(self, factory):
        return self._endpoint.connect(LinkTLSFactory(self._options, True, factory)).addCallback(
            lambda tls: tls.wrappedProtocol
        )


def link_tls_endpoint(options, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
    """A client endpoint that speaks TLS (``options``) over ``endpoint``, records gathered."""
    return _TLSClientEndpoint(options, endpoint)


# -- Autobahn -----------------------------------------------------------------------------


class _ExactCall:
    __slots__ = ("_call",)

    def __init__(self, call) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class _ExactTimer:
    """Autobahn's batched timer interface, at the precision of the reactor's ``callLater``."""

    def __init__(self, clock) -> None:
        self._clock = clock

    def call_later(self, delay: float, func, *args, **kwargs) -> _ExactCall:
        return _ExactCall(self._clock.callLater(delay, func, *args, **kwargs))


def use_exact_timers(factory, clock) -> bool:
    """Make ``factory``'s connections time out when configured, on ``clock``.

    Autobahn's timers (opening and closing handshake, auto-ping) go through
    txaio's batched timer, which rounds each deadline down to a whole second
    of the clock: a 1 s opening-handshake timeout can fire after 0 s.
    Returns whether the timers are exact.
    """
    if not EXACT_TIMERS:
        return False
    factory._batched_timer = _ExactTimer(clock)
    return True


class _Probe(WebSocketServerProtocol):
    """A stand-in connection, for :func:`_fresh_state` to see what Autobahn sets on a new connection."""

    CONFIG_ATTRS = ()
    openHandshakeTimeout = 0
    trackTimings = False

    class factory:  # what _connectionMade reads of its factory
        isServer = True
        proxy = None


def _fresh_state() -> dict:
    """The fields Autobahn's ``_connectionMade`` gives every new connection, with their first values.

    Found by running it once on a stand-in, so that a new version of
    Autobahn with other fields is followed, not copied by hand.
    """
    probe = _Probe()
    before = set(vars(probe))
    WebSocketProtocol._connectionMade(probe)
    return {name: value for name, value in vars(probe).items() if name not in before}


_IMMUTABLE = (type(None), bool, int, float, str, bytes)


class _FirstUse:
    """A per-connection attribute made at its first use: an idle connection never makes it.

    A non-data descriptor: once made, the value is the instance's own
    attribute, and reading it costs what reading any attribute does.
    """

    def __init__(self, name: str, make: Callable[[], object]) -> None:
        self.name = name
        self.make = make

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.make()
        return value


class _TransportDetails:
    """Autobahn's description of a connection's transport, made at first use (TLS, or a caller asking)."""

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        details = create_transport_details(instance.transport, instance.is_server)
        details.channel_framing = details.CHANNEL_FRAMING_WEBSOCKET
        instance.__dict__["_transport_details"] = details
        return details


class FastServerProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol, with client frames split by :func:`meshd.wsframes.split`.

    Autobahn's frame parser costs more than everything the node does with a
    Publish: it builds a frame object and an unmasker per frame and re-slices
    its buffer after each one.  While the connection is open and Autobahn is
    not inside a frame, whole final masked binary frames go straight to
    :meth:`binary_received`; from the first other frame on (control frames,
    fragments, text, oversized frames), Autobahn's parser takes the rest from
    that frame boundary and answers it as before, calling ``onMessage``.

    A frame that has not all arrived stays in the buffer, joined with each
    read, until it is whole; past :attr:`partial_limit` bytes it is handed
    to Autobahn's parser, which streams it, so that a large frame arriving
    a few bytes per read costs each read what it brings, not the frame.

    Everything the protocol writes, handshake and Autobahn's own frames
    included, goes through :attr:`outlet` once :meth:`outlet_for` gave one.
    Subclasses set :attr:`fast_limit` (0: no fast path) and implement
    :meth:`binary_received` and :meth:`outlet_for`.

    Bounds on what a client may make Autobahn do:

    - :attr:`max_handshake_size`: the opening-handshake request (request
      line and headers) is refused with HTTP 431 past that many bytes.
      Until its blank line arrives, each read is searched for it once,
      within the bound, and kept aside; Autobahn's own parser would search
      everything received so far again on every read.
    - :attr:`connection_log`: Autobahn logs through ``self.log`` each
      connection it fails, drops or refuses; that logger goes there instead
      (a rate-limited one, so hostile clients cannot flood the log).
    - With a :attr:`clock`, the connection ends with a FIN after the
      client's close frame, where Autobahn aborts it (a TCP reset): a client
      whose own close frame broke the protocol has not read the node's
      close frame yet (1002), and a reset would destroy it unread.

    Opening handshakes, and what a connection keeps (:data:`LEAN_LIFECYCLE`):

    - A plain request (:func:`meshd.wshandshake.plain_upgrade`: no
      ``Origin``, no extensions offered, nothing malformed) is parsed once
      and answered here, with the bytes and the state Autobahn's would
      give, ``onConnect`` (which must answer at once, not with a Deferred)
      deciding as before; Autobahn's parser answers every other request.
      A connection opened this way keeps none of the request's text.
    - Autobahn's ``_connectionMade`` sets some 40 fields on every new
      connection to the same first values (flags, timers, counters, a send
      queue, a UTF-8 validator, traffic statistics): here those are class
      defaults (:data:`_FRESH`), a connection gets its own field when one is
      written, and the objects are made at their first use (a chopped or
      synchronous write, a text message), which idle connections, almost all
      of them, never come to.
    """

    #: The largest payload taken by the fast path; 0 while it is off.
    fast_limit = 0
    #: A partial frame past this many bytes is streamed by Autobahn's parser.
    partial_limit = 16 * 1024
    #: The largest opening-handshake request taken, in bytes; 0: no limit.
    max_handshake_size = 0
    #: Where Autobahn's lines about this connection go (a txaio-style logger); None: Autobahn's logger.
    connection_log = None
    #: The clock of the protocol's own timers; None: closes go as in Autobahn.
    clock = None
    outlet: Optional[Outlet] = None
    # The request received so far (-1 once it ended), its last bytes, and its reads.
    _handshake_seen = 0
    _handshake_tail = b""
    _handshake_reads: "Optional[list[bytes]]" = None
    _in_close_frame = False
    _abort_call = None
    _CONNECTING = WebSocketProtocol.STATE_CONNECTING
    _CLOSED = WebSocketProtocol.STATE_CLOSED
    _transport_details = _TransportDetails()
    #: The WebSocket version of a plain handshake (Autobahn's parser sets its own).
    websocket_version = 13
    websocket_protocol_in_use: Optional[str] = None

    def outlet_for(self, transport) -> Optional[Outlet]:
        """The outlet for this connection's writes (None: Autobahn writes to the transport)."""
        return None

    def binary_received(self, payload: bytes) -> None:
        """One whole binary message from the client."""
        raise NotImplementedError

    def _connectionMade(self) -> None:
        # Autobahn's, with the fields it sets to their first values left to the
        # class defaults (_FRESH), and no debug line formatted.  Its options
        # must be on the class already (FastServerFactory), else Autobahn's
        # copies them.  The opening-handshake timer starts in connectionMade,
        # once the request that came with the connection was not enough.
        if not (LEAN_LIFECYCLE and not self.CONFIG_ATTRS):
            super()._connectionMade()
            return
        self.state = self._CONNECTING
        if self.trackTimings:
            self.trackedTimings = Timings()
        self.factory.countConnections += 1

    def _connectionLost(self, reason) -> None:
        if not LEAN_LIFECYCLE:
            super()._connectionLost(reason)
            return
        WebSocketProtocol._connectionLost(self, reason)
        self.factory.countConnections -= 1

    def connectionMade(self) -> None:
        # Autobahn sets TCP_NODELAY from ``self.tcpNoDelay`` before it copies
        # the factory's options onto the protocol, so on its own the option
        # never takes effect; without it Nagle's algorithm holds small event
        # frames back until the client's delayed ACK (tens of milliseconds).
        # (A class made by FastServerFactory has its options already.)
        if self.CONFIG_ATTRS:
            self.tcpNoDelay = self.factory.tcpNoDelay
        self.outlet = self.outlet_for(self.transport)
        if self.connection_log is not None:
            self.log = self.connection_log
        if LEAN_LIFECYCLE and not self.CONFIG_ATTRS:
            # Autobahn's, less the transport's description (made at first use) and a debug line.
            del self.__dict__["_transport_details"]  # the blank one of __init__
            self.peer = peer2str(self.transport)
            try:
                self.transport.setTcpNoDelay(self.tcpNoDelay)
            except Exception:  # as Autobahn: UNIX sockets refuse it, in several ways
                pass
            self._connectionMade()
        else:
            super().connectionMade()
        if self.admit() and self.state == self._CONNECTING:
            self._read_waiting()
        if (
            LEAN_LIFECYCLE and not self.CONFIG_ATTRS and self.state == self._CONNECTING
            and self.openHandshakeTimeout > 0
        ):
            self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout)

    def _onOpen(self) -> None:
        # Autobahn's reads the transport's description to complete it for TLS:
        # a plain TCP connection that never made it has nothing to complete.
        if "_transport_details" not in self.__dict__ and type(self.transport) in _PLAIN_TCP:
            self.onOpen()
        else:
            super()._onOpen()

    def admit(self) -> bool:
        """Whether the new connection may go on to its handshake (else it was refused); subclasses decide."""
        return True

    def _read_waiting(self) -> None:
        """Take the request that arrived with the connection now, not at the reactor's next poll.

        A client sends its request as soon as it is connected, usually before
        the node accepts the connection.  Answered here, the connection is
        open before the next one is accepted: when thousands connect at once
        (clients coming back after a restart), the connections in their
        opening handshake stay few, instead of growing with each batch the
        reactor accepts until ``max_handshaking`` drops the oldest, whose
        requests are waiting unread.  Nothing there yet, or the connection
        ending: the reactor's poll sees to it as usual.
        """
        transport = self.transport
        if not DIRECT_WRITE or type(transport) not in _PLAIN_TCP:
            return
        try:
            data = transport.socket.recv(transport.bufferSize)
        except OSError:
            return
        if data:
            self.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self.state == self._CONNECTING and self._handshake_seen >= 0 and self.max_handshake_size:
            self._handshake_received(data)
            return
        if not FAST_PATH:
            super().dataReceived(data)
            return
        # Autobahn's own dataReceived formats its debug-log arguments on every
        # read with logging off (about 2.5 us), then calls _dataReceived.
        if not self.fast_limit or self.state != _OPEN or self.current_frame is not None or self.inside_message:
            self._dataReceived(data)
            return
        buf = self.data + data if self.data else data
        found = wsframes.split(buf, self.fast_limit)
        taken = 0
        closing = False
        try:
            for payload in found.payloads:
                taken += 1
                self.binary_received(payload)
                if self.state != _OPEN:
                    closing = True  # Autobahn deals with what follows (the client's close frame)
                    break
        finally:
            # Also when a handler raises: the rest of the read stays, from a frame boundary.
            at = found.ends[taken - 1] if taken else 0
            self.data = buf[at:] if at else buf
            if taken and self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
        if self.data and (found.fallback or closing or len(self.data) > self.partial_limit):
            self.consumeData()

    def _handshake_received(self, data: bytes) -> None:
        """Part of the opening handshake: refused past :attr:`max_handshake_size`, else kept until whole."""
        limit = self.max_handshake_size
        seen, tail = self._handshake_seen, self._handshake_tail
        # The blank line that ends the request must end within the limit: look no further.
        window = tail + data[: limit - seen]
        if window.find(b"\r\n\r\n") < 0:
            if seen + len(data) > limit:
                self._handshake_seen = -1
                self._handshake_reads = None
                self.failHandshake(f"Request Header Fields Too Large (over {limit} bytes)", 431)
                return
            self._handshake_seen = seen + len(data)
            self._handshake_tail = window[-3:]
            if not FAST_PATH:
                super().dataReceived(data)  # Autobahn searches all it has again: at most the limit
                return
            if self._handshake_reads is None:
                self._handshake_reads = []
            self._handshake_reads.append(data)
            return
        self._handshake_seen = -1
        reads, self._handshake_reads = self._handshake_reads, None
        if not FAST_PATH:
            super().dataReceived(data)
            return
        if PLAIN_HANDSHAKE and not (self.factory.externalPort or self.maxConnections) and 13 in self.versions:
            received = b"".join(reads) + data if reads else data
            end = received.find(b"\r\n\r\n") + 4
            upgrade = wshandshake.plain_upgrade(received[:end])
            if upgrade is not None:
                self.data = received[end:]
                self._open_plain(upgrade)
                return
        if reads:
            self.data = b"".join(reads)
        self._dataReceived(data)

    def _open_plain(self, upgrade: wshandshake.Upgrade) -> None:
        """Answer a plain opening handshake: what Autobahn's processHandshake and succeedHandshake do for it."""
        request = ConnectionRequest(self.peer, upgrade.headers, upgrade.host, upgrade.path, upgrade.params(), 13, "",
                                    upgrade.protocols, [])
        try:
            answer = self.onConnect(request)
            protocol, headers = answer if isinstance(answer, tuple) else (answer, {})
            if protocol is not None and protocol not in upgrade.protocols:
                raise ValueError("protocol accepted must be from the list client sent or None")
        except ConnectionDeny as deny:
            self.failHandshake(deny.reason, deny.code)
            return
        except Exception as error:  # as Autobahn answers a failing onConnect
            self.log.warn("Unexpected exception in onConnect ['{error}']", error=error)
            self.failHandshake(f"Internal server error: {error}", ConnectionDeny.INTERNAL_SERVER_ERROR)
            return
        factory = self.factory
        self.sendData(wshandshake.switching_protocols(
            upgrade.key, protocol, factory.server, [*factory.headers.items(), *headers.items()]))
        self.websocket_protocol_in_use = protocol
        self.state = _OPEN
        timeout, self.openHandshakeTimeoutCall = self.openHandshakeTimeoutCall, None
        if timeout is not None:
            timeout.cancel()
        self.inside_message = False
        self.current_frame = None
        if self.autoPingInterval:
            self.autoPingPendingCall = factory._batched_timer.call_later(self.autoPingInterval, self._sendAutoPing)
        self._onOpen()
        txaio.resolve(self.is_open, None)
        rest, self.data = self.data, b""
        if rest:  # the client's first frames, sent with its request
            self.dataReceived(rest)

    def onCloseFrame(self, code, reasonRaw):
        self._in_close_frame = True
        try:
            return super().onCloseFrame(code, reasonRaw)
        finally:
            self._in_close_frame = False

    def dropConnection(self, abort: bool = False) -> None:
        # Autobahn aborts the connection once the client's close frame
        # answers the node's; the client's may have crossed it (a close
        # frame that broke the protocol is answered with 1002): end with a
        # FIN after the close frame, and abort only if the client keeps the
        # connection past the close handshake timeout.
        clock = self.clock
        if abort and self._in_close_frame and clock is not None and self.state != self._CLOSED:
            abort = False
            self._abort_call = clock.callLater(self.closeHandshakeTimeout or 1, self._abort_late)
        super().dropConnection(abort)

    def _abort_late(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def sendData(self, data: bytes, sync: bool = False, chopsize=None) -> None:
        outlet = self.outlet
        if outlet is None or sync or chopsize:
            if outlet is not None:
                outlet.flush()
            super().sendData(data, sync, chopsize)
            return
        outlet.write_through(data)

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply: bool = False) -> None:
        # The one way out of the open state with the connection still up:
        # after a close frame, no data frame may follow.
        outlet = self.outlet
        if outlet is not None:
            outlet.accepting = False
        super().sendCloseFrame(code, reasonUtf8, isReply)

    def connectionLost(self, reason) -> None:
        outlet = self.outlet
        if outlet is not None:
            outlet.accepting = False
            outlet.discard()
            outlet.transport = None
        # Autobahn leaves its close-handshake timer running when the
        # connection goes first (a client that never answered our close).
        waiting = self.closeHandshakeTimeoutCall
        if waiting is not None:
            self.closeHandshakeTimeoutCall = None
            waiting.cancel()
        late, self._abort_call = self._abort_call, None
        if late is not None and late.active():
            late.cancel()
        if LEAN_LIFECYCLE and type(self.transport) in _PLAIN_TCP:
            # What Autobahn's does for plain TCP, less its debug lines (TLS errors are logged there).
            self._connectionLost(reason)
        else:
            super().connectionLost(reason)


#: What Autobahn's ``_connectionMade`` sets on a new connection, as :class:`FastServerProtocol`'s defaults:
#: values as they are, objects made at first use.
_FRESH = _fresh_state() if LEAN_LIFECYCLE else {}
for _name, _value in _FRESH.items():
    if _name not in vars(FastServerProtocol):
        setattr(FastServerProtocol, _name, _value if isinstance(_value, _IMMUTABLE) else _FirstUse(_name, type(_value)))


class FastServerFactory(WebSocketServerFactory):
    """Autobahn's server factory, whose connections read its options from their class.

    Autobahn's ``connectionMade`` copies each of the protocol options
    (``CONFIG_ATTRS``, 29 of them) from the factory onto every new
    connection, then formats the list with ``pprint`` for a debug line that
    is not logged: a third of the node's time per opening handshake, and 29
    more entries in every connection's ``__dict__``.  Here connections are
    made from a subclass of :attr:`protocol` that holds the options as class
    attributes and has nothing to copy; it is made again after each
    :meth:`setProtocolOptions`, so that, as with Autobahn's copies,
    connections already made keep the options they started with.
    """

    _shared: "Optional[tuple[type, type]]" = None

    def setProtocolOptions(self, **options) -> None:
        super().setProtocolOptions(**options)
        self._shared = None

    def buildProtocol(self, addr):
        if not SHARED_OPTIONS:
            return super().buildProtocol(addr)
        shared = self._shared
        if shared is None or shared[0] is not self.protocol:
            shared = self._shared = (self.protocol, _with_options(self.protocol, self))
        protocol = shared[1]()
        protocol.factory = self
        return protocol


def _with_options(protocol: type, factory) -> type:
    """A subclass of ``protocol`` with ``factory``'s options as class attributes, and none to copy."""
    options = {name: _as_class_attribute(getattr(factory, name)) for name in protocol.CONFIG_ATTRS}
    return type(protocol.__name__, (protocol,), {
        **options, "CONFIG_ATTRS": (), "__module__": protocol.__module__, "__qualname__": protocol.__qualname__,
    })


def _as_class_attribute(value):
    """``value`` as a class attribute that reads back as itself (a function, such as
    ``perMessageCompressionAccept``, would become a method of the connection)."""
    return staticmethod(value) if hasattr(type(value), "__get__") else value
