# -*- test-case-name: tests.test_limits -*-
"""What one client, or one address, may cost a node: the reusable pieces of its limits.

Sans-IO: nothing here reads a socket or starts a reactor; each piece is
given the time (``now``) or a clock, so that tests drive it with
:class:`twisted.internet.task.Clock`.

- :class:`TokenBucket`: a rate with a burst (a session's requests).
- :class:`AddressBuckets`: one token bucket per client address, shared by
  the connections of that address (failed Hellos).
- :class:`Admission`: connections per address, and connections still in
  their opening handshake, counted apart from open ones.
- :class:`RateLimitedLog`: at most so many lines of one kind per interval,
  then one line saying how many were left out; :class:`LimitedLogger` puts
  Autobahn's lines about a connection through one.
- :func:`address_key`: the address a peer is counted under.
- :class:`Limits`: the node's set of them, made from its configuration.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Optional, Union
from weakref import WeakKeyDictionary

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger, LogLevel

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Loopback: a reverse proxy on the node's host, whose connections stand for many clients.
DEFAULT_EXEMPT = ("127.0.0.0/8", "::1")
#: Seconds a connection may be in its opening handshake before a new one past ``max_handshaking`` may
#: take its place (see :class:`Admission`).
HANDSHAKE_GRACE = 1.0
#: Hosts whose address key :meth:`Limits.address_of` remembers (then it starts over).
ADDRESS_CACHE = 4096


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` of them saved up; it starts full.

    :meth:`charge` may take it below zero: the debt is how far a client is
    over its rate, and it is paid back at ``rate`` tokens a second.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.1f}/{self.burst} +{self.rate}/s>"

    def level(self, now: float) -> float:
        """The tokens there are at ``now``."""
        elapsed = now - self.stamp
        if elapsed > 0:  # a clock that went back adds nothing
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else float(self.burst)
            self.stamp = now
        return self.tokens

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; return whether they were spent."""
        if self.level(now) < cost:
            return False
        self.tokens -= cost
        return True

    def charge(self, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens, into debt if need be; return what is left (negative: the debt)."""
        tokens = self.tokens
        elapsed = now - self.stamp
        if elapsed > 0:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self.stamp = now
        tokens -= cost
        self.tokens = tokens
        return tokens


class AddressBuckets:
    """A token bucket per address, shared by all of that address's connections.

    A bucket is made at an address's first :meth:`spend`; buckets that have
    filled up again are forgotten, and at most ``size`` are kept (the least
    recently charged go first), so many addresses cannot grow the node's
    memory.  Spending never goes below zero: an address that was refused
    recovers at ``rate`` whatever it sent meanwhile.
    """

    def __init__(self, rate: float, burst: float, size: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allows(self, address: Optional[str], now: float) -> bool:
        """Whether ``address`` has a token left (None, an address not counted, always has)."""
        if address is None:
            return True
        bucket = self._buckets.get(address)
        return bucket is None or bucket.level(now) >= 1

    def spend(self, address: Optional[str], now: float) -> None:
        """Take a token from ``address`` (none left: it stays at zero)."""
        if address is None:
            return
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
        if bucket.level(now) >= 1:
            bucket.tokens -= 1
        else:
            bucket.tokens = 0.0
        self._buckets[address] = bucket  # last: the most recently charged
        if len(self._buckets) > self.size:
            self._prune(now)

    def _prune(self, now: float) -> None:
        buckets = self._buckets
        for address in [a for a, b in buckets.items() if b.level(now) >= b.burst]:
            del buckets[address]
        # Down to half, so that the scan above runs once per size/2 new addresses at most.
        excess = len(buckets) - self.size // 2
        if excess > 0:
            for address in list(buckets)[:excess]:
                del buckets[address]


_NOT_HERE = object()


class Admission:
    """Which connections a node takes: per address, and while in their opening handshake.

    A connection is *handshaking* from its TCP connection until its
    WebSocket opening handshake succeeds, then *open* until it is lost.
    Only open connections count against ``max_open`` (``max_connections``),
    so sockets that say nothing cannot lock clients out; handshaking ones
    are bounded by ``max_handshaking``: a new connection past it takes the
    place of the oldest, which is dropped, if that one has been handshaking
    for ``grace`` seconds.  A younger oldest is a storm of clients coming
    back at once, whose requests the node has not read yet, not sockets
    that say nothing: the new connection is taken beside it, up to twice
    ``max_handshaking``, past which the oldest goes whatever its age.  Both
    count against their address's ``per_address``; a connection past that
    is refused.  An address of None (exempt, or not an IP connection) is not
    counted.  0 is no limit.
    """

    def __init__(self, max_handshaking: int = 0, per_address: int = 0, max_open: int = 0,
                 grace: float = 0.0) -> None:
        self.max_handshaking = max_handshaking
        self.per_address = per_address
        self.max_open = max_open
        self.grace = grace
        #: When each handshaking connection was taken (only with a grace).
        self._since: dict[Any, float] = {}
        #: Connections in their opening handshake, oldest first, with their addresses.
        self.handshaking: dict[Any, Optional[str]] = {}
        #: Open connections, with their addresses.
        self.open: dict[Any, Optional[str]] = {}
        #: Connections (handshaking or open) per counted address.
        self.addresses: dict[str, int] = {}

    def connect(self, conn: Any, address: Optional[str], now: float = 0.0) -> "tuple[bool, Optional[Any]]":
        """A new connection at ``now``: whether it is taken, and the handshaking connection it replaces, if any.

        The caller drops the replaced connection; it is no longer counted.
        """
        if address is not None and self.per_address and self.addresses.get(address, 0) >= self.per_address:
            return False, None
        replaced = None
        handshaking = self.handshaking
        if self.max_handshaking and len(handshaking) >= self.max_handshaking:
            oldest = next(iter(handshaking))
            if not self.grace or len(handshaking) >= 2 * self.max_handshaking or \
                    now - self._since[oldest] >= self.grace:
                replaced = oldest
                self.lost(replaced)
        handshaking[conn] = address
        if self.grace:
            self._since[conn] = now
        if address is not None:
            self.addresses[address] = self.addresses.get(address, 0) + 1
        return True, replaced

    def may_open(self) -> bool:
        """Whether one more connection may finish its opening handshake (``max_open``)."""
        return not self.max_open or len(self.open) < self.max_open

    def opened(self, conn: Any) -> None:
        """``conn`` finished its opening handshake."""
        address = self.handshaking.pop(conn, _NOT_HERE)
        if address is not _NOT_HERE:
            self._since.pop(conn, None)
            self.open[conn] = address

    def lost(self, conn: Any) -> None:
        """``conn`` is gone (or dropped); nothing happens if it was not counted."""
        address = self.handshaking.pop(conn, _NOT_HERE)
        if address is _NOT_HERE:
            address = self.open.pop(conn, _NOT_HERE)
        else:
            self._since.pop(conn, None)
        if address is _NOT_HERE or address is None:
            return
        left = self.addresses[address] - 1
        if left:
            self.addresses[address] = left
        else:
            del self.addresses[address]


def parse_networks(values: Iterable[str]) -> "tuple[Network, ...]":
    """IP addresses and networks (``10.0.0.0/8``, ``::1``) as networks; ValueError names a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {value!r}") from None
    return tuple(networks)


def address_key(address: Any, exempt: "Iterable[Network]" = ()) -> Optional[str]:
    """The key a peer is counted under: its IPv4 address, or the /64 of its IPv6 address.

    None for an address in ``exempt`` and for other transports (UNIX
    sockets, pipes): those are not counted per address.  An IPv6 host gets
    a /64 of its own, so its addresses count together.
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in exempt):
        return None
    if ip.version == 6:
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


class _Kind:
    __slots__ = ("start", "count", "suppressed", "level", "timer")

    def __init__(self, start: float, level: LogLevel) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0
        self.level = level
        self.timer = None


class RateLimitedLog:
    """Log lines about hostile clients, at most ``lines`` of each kind per ``interval`` seconds.

    A line's kind is its format string (a constant in the code that logs
    it, never client data).  Past ``lines`` in one interval, lines of that
    kind are counted instead of logged, and at the end of the interval one
    line says how many were left out: ``Suppressed K similar lines in the
    last N s: <format>``.  So one kind of line costs at most ``lines + 1``
    lines per interval, however many clients cause it.  Beyond ``kinds``
    different formats, the rest share one kind.
    """

    SUMMARY = "Suppressed {suppressed} similar lines in the last {interval:g} s: {kind}"

    def __init__(self, clock, logger: Optional[Logger] = None, lines: int = 10, interval: float = 60.0,
                 kinds: int = 256) -> None:
        self.clock = clock
        self.logger = logger if logger is not None else Logger(namespace="meshd.limits")
        self.lines = lines
        self.interval = interval
        self.kinds = kinds
        self._kinds: dict[str, _Kind] = {}

    def warn(self, format: str, **fields: Any) -> None:
        self.emit(LogLevel.warn, format, **fields)

    def info(self, format: str, **fields: Any) -> None:
        self.emit(LogLevel.info, format, **fields)

    def emit(self, level: LogLevel, format: str, **fields: Any) -> None:
        """Log ``format`` with ``fields`` at ``level``, unless its kind used up its lines."""
        now = self.clock.seconds()
        key = format
        kind = self._kinds.get(key)
        if kind is None:
            if len(self._kinds) >= self.kinds:
                key = "(other lines)"
                kind = self._kinds.get(key)
            if kind is None:
                kind = self._kinds[key] = _Kind(now, level)
        if kind.timer is None and now - kind.start >= self.interval:
            kind.start, kind.count = now, 0
        if kind.count < self.lines:
            kind.count += 1
            self.logger.emit(level, format, **fields)
            return
        kind.suppressed += 1
        if kind.timer is None:
            kind.level = level
            kind.timer = self.clock.callLater(max(0.0, kind.start + self.interval - now), self._summarize, key)

    def _summarize(self, key: str) -> None:
        kind = self._kinds[key]
        kind.timer = None
        if kind.suppressed:
            self.logger.emit(kind.level, self.SUMMARY, suppressed=kind.suppressed, interval=self.interval, kind=key)
        kind.start, kind.count, kind.suppressed = self.clock.seconds(), 0, 0

    def stop(self) -> None:
        """Log the pending summaries now and cancel their timers (the node is stopping)."""
        for key, kind in list(self._kinds.items()):
            if kind.timer is not None:
                kind.timer.cancel()
                self._summarize(key)


class LimitedLogger:
    """A txaio-style logger (Autobahn's ``self.log``) whose info, warn and error lines are rate-limited.

    Autobahn logs each connection it fails or drops at warn level, and each
    refused handshake at info: one line per hostile connection.  Those go
    through ``limited``; debug and anything else go to ``inner`` unchanged.
    """

    def __init__(self, inner: Any, limited: RateLimitedLog) -> None:
        self._inner = inner
        self._limited = limited

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def critical(self, format: str = "", **fields: Any) -> None:
        self._limited.emit(LogLevel.critical, format, **fields)

    def error(self, format: str = "", **fields: Any) -> None:
        self._limited.emit(LogLevel.error, format, **fields)

    def warn(self, format: str = "", **fields: Any) -> None:
        self._limited.emit(LogLevel.warn, format, **fields)

    def info(self, format: str = "", **fields: Any) -> None:
        self._limited.emit(LogLevel.info, format, **fields)


class _Hellos:
    __slots__ = ("address", "failed")

    def __init__(self, address: Optional[str]) -> None:
        self.address = address
        self.failed = 0


class Limits:
    """A node's limits on what clients may cost it, made from its configuration.

    Holds the pieces above for one node: :attr:`admission` of connections,
    the per-address budget of failed Hellos, the factory of per-session
    request buckets, and :attr:`log` for lines about hostile clients.
    """

    def __init__(
        self,
        clock,
        *,
        max_handshaking: int = 1024,
        max_connections: int = 0,
        max_connections_per_address: int = 256,
        exempt_addresses: Iterable[str] = DEFAULT_EXEMPT,
        max_failed_hellos: int = 5,
        address_failed_hellos: int = 20,
        address_failed_hello_rate: float = 0.1,
        request_rate: float = 1000.0,
        request_burst: int = 2000,
        log: Optional[RateLimitedLog] = None,
    ) -> None:
        self.clock = clock
        self.admission = Admission(max_handshaking, max_connections_per_address, max_connections, HANDSHAKE_GRACE)
        self.exempt = parse_networks(exempt_addresses)
        #: address_key of recently seen hosts: parsing an address costs more than the rest of admission.
        self._keys: dict[str, Optional[str]] = {}
        self.max_failed_hellos = max_failed_hellos
        self.failed_hellos = AddressBuckets(address_failed_hello_rate, address_failed_hellos)
        self.request_rate = request_rate
        self.request_burst = request_burst
        #: Lines about hostile clients (see :class:`RateLimitedLog`).
        self.log = log if log is not None else RateLimitedLog(clock, Logger(namespace="meshd.limits"))
        self._hellos: "WeakKeyDictionary[Any, _Hellos]" = WeakKeyDictionary()

    @classmethod
    def from_config(cls, config, clock) -> "Limits":
        """The limits a :class:`meshd.config.Config` sets."""
        return cls(
            clock,
            max_handshaking=config.max_handshaking,
            max_connections=config.max_connections,
            max_connections_per_address=config.max_connections_per_address,
            exempt_addresses=config.exempt_addresses,
            max_failed_hellos=config.max_failed_hellos,
            address_failed_hellos=config.address_failed_hellos,
            address_failed_hello_rate=config.address_failed_hello_rate,
            request_rate=config.requests_per_second,
            request_burst=config.request_burst,
        )

    def address_of(self, peer: Any) -> Optional[str]:
        """The key ``peer`` (a transport's ``getPeer()``) is counted under; None if not counted."""
        if type(peer) not in (IPv4Address, IPv6Address):
            return address_key(peer, self.exempt)
        keys = self._keys
        key = keys.get(peer.host, _NOT_HERE)
        if key is _NOT_HERE:
            key = address_key(peer, self.exempt)
            if len(keys) >= ADDRESS_CACHE:
                keys.clear()
            keys[peer.host] = key
        return key

    def request_bucket(self) -> Optional[TokenBucket]:
        """A new session's budget of requests; None when the rate is not limited (0)."""
        if not self.request_rate:
            return None
        return TokenBucket(self.request_rate, self.request_burst, self.clock.seconds())

    # -- Hellos with a token ---------------------------------------------------------

    def attach(self, session: Any, address: Optional[str]) -> None:
        """Remember the address ``session`` connected from (for its failed Hellos)."""
        self._hellos[session] = _Hellos(address)

    def may_try_token(self, session: Any) -> bool:
        """Whether the address of ``session`` has failed Hellos left to make."""
        record = self._hellos.get(session)
        return record is None or self.failed_hellos.allows(record.address, self.clock.seconds())

    def hello_failed(self, session: Any) -> int:
        """Count a refused token; return how many ``session`` has had refused."""
        record = self._hellos.get(session)
        if record is None:
            record = self._hellos[session] = _Hellos(None)
        record.failed += 1
        self.failed_hellos.spend(record.address, self.clock.seconds())
        return record.failed

    def stop(self) -> None:
        self.log.stop()

