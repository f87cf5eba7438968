# -*- test-case-name: tests.test_mesh tests.test_link -*-
"""The mesh: links to every other node, and one-hop routing of events over them.

Routing is a full mesh with one hop.  What originates on this node is sent
to every peer that needs it; what arrives from a peer is delivered to this
node's sessions and never sent on, so there are no loops and no
duplicates.  Each routed frame carries this node's id and the next number
of one per-node sequence; a peer drops any number it has seen.

Channel messages go only to peers with a subscriber on the channel: each node
tells its peers which channels it has subscribers for (``Interest``), in its
LinkHello and then as they change.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Callable, Iterable, Optional
from uuid import UUID

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import HostnameEndpoint, serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshd._io import EndOfTurn, LinkTLSFactory, link_tls_endpoint
from meshd.codec import Watchable
from meshd.config import MeshSettings, split_address
from meshd.mesh.framing import HEADER, FrameTooLarge, check_size
from meshd.mesh.link import DialEndpoint, Link, LinkFactory, Violation, opening
from meshd.mesh.outbox import Outbox
from meshd.mesh.tls import Credentials
from meshd.mesh.wire import (
    MESH_VERSION,
    Cursor,
    GoodbyeCode,
    Interest,
    LinkHello,
    Peer,
    RouteKind,
    Routed,
    encode_interest,
    encode_peers,
    routed_frame,
)

if TYPE_CHECKING:
    from meshd.events import Event
    from meshd.metrics import Metrics
    from meshd.registry import Registry

#: A port 0 in a tcp/tcp6 endpoint description (``tcp:0:...``, ``tcp:port=0:...``).
_UNBOUND_PORT = re.compile(r"^(tcp6?:(?:port=)?)0(?=:|$)")

#: At most this many other nodes are remembered; more are ignored (and logged).
MAX_PEERS = 1024
#: At most this many channels of interest per peer, each at most this long.
MAX_PEER_CHANNELS = 1_000_000
MAX_CHANNEL_BYTES = 4096


class PeerState:
    """What this node knows of one other node, kept across its links."""

    __slots__ = (
        "node", "address", "incarnation", "link", "interests", "outbox", "received_seq", "linked",
        "down_since",
    )

    def __init__(self, node: UUID, address: Optional[str], outbox: Outbox, now: float) -> None:
        self.node = node
        self.address = address
        self.incarnation: Optional[int] = None
        self.link: Optional[Link] = None
        self.interests: set[str] = set()
        self.outbox = outbox
        self.received_seq = 0  # highest seq received from this node's current incarnation
        self.linked = False  # has been linked at least once: frames for it wait while it is away
        self.down_since = now  # when it was last seen linked (or first heard of)


class Mesh(MultiService):
    """Links this node with the others of its cluster, and routes events between them."""

    log = Logger()

    def __init__(
        self,
        settings: MeshSettings,
        credentials: Credentials,
        *,
        node_id: UUID,
        clock,
        metrics: "Metrics",
        turn: EndOfTurn,
        registry: "Registry",
        deliver: Callable[[Routed], int],
    ) -> None:
        super().__init__()
        self.setName("mesh")
        self.settings = settings
        self.credentials = credentials
        self.clock = clock  # a reactor: it also listens, resolves and connects
        self.node_id = node_id
        self.metrics = metrics
        self.turn = turn
        self.registry = registry
        self._deliver = deliver
        self.incarnation = random.getrandbits(63) + 1
        self.seq = 0
        self.peers: dict[UUID, PeerState] = {}
        self.dialers: dict[str, ClientService] = {}
        #: Every live connection, handshaking or open.
        self.links: set[Link] = set()
        #: This turn's changes of channel interest, sent at its end (EndOfTurn.ANNOUNCE).
        self._pending_interest: dict[str, bool] = {}
        turn.register(EndOfTurn.ANNOUNCE, self._flush_interest)
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = self.clock
        #: The address other nodes dial; a port 0 in it becomes the port bound.
        self.advertise = settings.advertise
        #: Where the listener listens; a port 0 becomes the port first bound,
        #: so that the node keeps its address across a stop and a start.
        self._listen_on = settings.listen
        self._listening = None
        self._listener_factory = LinkTLSFactory(credentials.server_options(), False, LinkFactory(self, dialed=False))

    # -- lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        self._listen()
        super().startService()
        self.registry.observe(self._interest_changed)
        for seed in self.settings.seeds:
            self.dial(seed)
        self._expiry.start(1.0, now=False)
        self.log.info(
            "Mesh {cluster}: node {node} listening on {bound} ({listen}), advertised as {advertise}, seeds {seeds}",
            cluster=self.settings.cluster, node=self.node_id, bound=_address_of(self._listening),
            listen=self.settings.listen, advertise=self.advertise, seeds=", ".join(self.settings.seeds) or "none",
        )

    def _listen(self) -> None:
        """Listen for links now; a port that cannot be bound stops the start (as ``strports.service`` does)."""
        outcome: list = []
        serverFromString(self.clock, self._listen_on).listen(self._listener_factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"mesh.listen {self._listen_on!r}: the listener did not start at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self._listening = outcome[0]
        bound = getattr(self._listening.getHost(), "port", None)
        if bound:
            self._listen_on = _UNBOUND_PORT.sub(rf"\g<1>{bound}", self._listen_on)
            host, _, port = self.advertise.rpartition(":")
            if port == "0":
                self.advertise = f"{host}:{bound}"

    def stopService(self):
        if self.running:  # a MultiService stops its children again, stopped or not
            self.registry.unobserve(self._interest_changed)
        self._pending_interest.clear()
        if self._expiry.running:
            self._expiry.stop()
        for link in list(self.links):
            link.goodbye(GoodbyeCode.Shutdown, "node shutting down")
        stopping = [self.park(address) for address in list(self.dialers)]
        listening, self._listening = self._listening, None
        if listening is not None:
            stopping.append(listening.stopListening())
        stopping.append(super().stopService())
        return gatherResults([d for d in stopping if d is not None])

    # -- dialing --------------------------------------------------------------------

    def dial(self, address: str) -> None:
        """Keep a link dialed to ``address`` (until :meth:`park`)."""
        if address in self.dialers or address == self.advertise:
            return
        try:
            host, port = split_address(address)
        except ValueError as e:
            self.log.warn("Not dialing {address}: {error}", address=address, error=e)
            return
        # A connection counts once its link opened (``opening``): one that
        # fails before (TLS refused, wrong cluster...) is a failed attempt and
        # backs off.
        tcp = HostnameEndpoint(self.clock, host, port, timeout=5)
        service = ClientService(
            DialEndpoint(link_tls_endpoint(self.credentials.client_options(host), tcp)),
            LinkFactory(self, dialed=True, address=address),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=self.settings.reconnect_max_delay),
            clock=self.clock,
            prepareConnection=opening,
        )
        service.setName(f"dial:{address}")
        self.dialers[address] = service
        service.setServiceParent(self)

    def park(self, address: Optional[str]):
        """Stop dialing ``address``: the node there keeps the link up itself.

        The dialer's link goes with it: aborted if still in its handshake
        (the ``ClientService`` cancels :func:`~meshd.mesh.link.opening`),
        closed with a Goodbye if open.  Returns the service's stop Deferred.
        """
        service = self.dialers.pop(address, None) if address else None
        if service is None:
            return None
        for link in list(self.links):
            if link.dialed and link.address == address and link.is_open:
                # The service's own loseConnection would wait on the link's
                # producer forever: TLS shuts down once none is registered.
                link.goodbye(GoodbyeCode.Duplicate, "this node stopped dialing it")
        return service.disownServiceParent()

    # -- links ----------------------------------------------------------------------

    def hello(self) -> LinkHello:
        """This node's LinkHello; interests and peers follow in their own frames."""
        return LinkHello(
            node=self.node_id,
            cluster=self.settings.cluster,
            incarnation=self.incarnation,
            version=MESH_VERSION,
            address=self.advertise,
            cursors=tuple(
                Cursor(p.node, p.incarnation or 0, p.received_seq) for p in self.peers.values()
            ),
        )

    def introduce(self, link: Link) -> None:
        """After a LinkHello: every channel with subscribers, and every node known."""
        for add in _chunks(list(self.registry.channels), self._budget()):
            link.send(encode_interest(add, []))
        peers = [Peer(p.node, p.address) for p in self.peers.values() if p.address]
        for chunk in _chunks(peers, self._budget(), size=lambda p: len(p.address) + 64):
            link.send(encode_peers(chunk))

    def _budget(self) -> int:
        return self.settings.max_frame_size // 2

    def check_hello(self, link: Link, hello: LinkHello) -> Optional[tuple[int, str]]:
        """Why a LinkHello is refused, or None if it is acceptable."""
        if not self.running:
            return GoodbyeCode.Shutdown, "node shutting down"
        if hello.cluster != self.settings.cluster:
            return GoodbyeCode.WrongCluster, f"cluster {hello.cluster!r} is not {self.settings.cluster!r}"
        if hello.version != MESH_VERSION:
            return GoodbyeCode.UnsupportedVersion, f"mesh version {hello.version} is not {MESH_VERSION}"
        if hello.node == self.node_id:
            return GoodbyeCode.Self, "this is the node itself"
        if hello.address:
            try:
                split_address(hello.address)
            except ValueError as e:
                return GoodbyeCode.ProtocolViolation, f"advertised address: {e}"
        if hello.node not in self.peers and len(self.peers) >= MAX_PEERS:
            return GoodbyeCode.ProtocolViolation, f"this node already knows {MAX_PEERS} nodes"
        return None

    def hello_refused(self, link: Link, code: int, reason: str) -> None:
        """This node refused a LinkHello (:meth:`check_hello`), and said why."""
        self.note_refusal(link, reason)
        if code == GoodbyeCode.Self:
            self.park(link.address)

    def refused_by_peer(self, link: Link, goodbye) -> None:
        """The other side refused a link in its handshake, with a Goodbye."""
        self.metrics.mesh_refusals += 1
        self.log.warn("{peer} refused the link ({code}): {reason}", peer=link.address or _peer_of(link),
                      code=goodbye.code, reason=goodbye.reason)
        if goodbye.code == GoodbyeCode.Self:
            self.park(link.address)

    def note_refusal(self, link: Link, reason: str) -> None:
        self.metrics.mesh_refusals += 1
        self.log.warn("Refused mesh link {link} from {peer}: {reason}", link=link,
                      peer=_peer_of(link), reason=reason)

    def link_refused(self, link: Link, reason: Failure) -> None:
        """A connection closed before its handshake completed (TLS failure, wrong peer...)."""
        self.metrics.mesh_refusals += 1
        self.log.warn(
            "Mesh connection {direction} {peer} closed before linking: {reason}",
            direction="to" if link.dialed else "from", peer=link.address or _peer_of(link),
            reason=_describe(reason),
        )

    def link_opened(self, link: Link, hello: LinkHello) -> bool:
        """A link's LinkHellos were exchanged and accepted; whether it is kept (see below)."""
        peer = self.peers.get(hello.node)
        if peer is None:
            peer = self.peers[hello.node] = self._new_peer(hello.node, None)
        new_address = hello.address and hello.address != peer.address
        if hello.address:
            peer.address = hello.address
        if peer.incarnation != hello.incarnation:
            peer.incarnation = hello.incarnation
            peer.received_seq = 0
        current = peer.link
        if current is not None and current is not link and not current.closing:
            # Two links with one node: both ends keep the one the lower id
            # dialed, and of two such links, the one with the lower nonce.
            keep_current = self._rank(current, peer) < self._rank(link, peer)
            drop = link if keep_current else current
            self.log.info("Two links with {node}; keeping the one its lower-id end dialed", node=peer.node)
            # The Goodbye first: parking a dialer aborts its link if it is still handshaking.
            drop.goodbye(GoodbyeCode.Duplicate, "another link with this node is kept")
            if drop.dialed:
                self.park(drop.address)
            if keep_current:
                return False
        link.peer = peer
        peer.link = link
        peer.linked = True
        peer.interests = set(hello.interests)  # then Interest frames follow
        resume = next(
            (c.seq for c in hello.cursors if c.node == self.node_id and c.incarnation == self.incarnation), 0
        )
        lost = peer.outbox.lost_before(resume)
        if lost:
            self._dropped(peer, lost, "bytes")
        peer.outbox.ack(resume)
        replayed = 0
        for data in peer.outbox.after(resume):
            link.write(data)
            replayed += 1
        if not link.dialed and self._preferred(link, peer):
            self.park(peer.address)  # the other end keeps this link up
        self.log.info(
            "Linked with {node} at {address} ({direction}); {replayed} frames resent",
            node=peer.node, address=peer.address, direction="dialed" if link.dialed else "accepted",
            replayed=replayed,
        )
        if new_address:
            self._tell_others(link, encode_peers([Peer(peer.node, peer.address)]))
        self.learn(hello.peers)
        return True

    def _preferred(self, link: Link, peer: PeerState) -> bool:
        """Whether ``link`` was dialed by the lower-id end: the link both ends keep."""
        dialer = self.node_id if link.dialed else peer.node
        return dialer.int == min(self.node_id.int, peer.node.int)

    def _rank(self, link: Link, peer: PeerState) -> tuple[bool, int]:
        """Lower ranks are kept; both ends of a pair of links compute the same ranks."""
        return (not self._preferred(link, peer), link.dial_nonce)

    def link_lost(self, link: Link, reason: Failure) -> None:
        self.links.discard(link)
        peer = link.peer
        if peer is None or peer.link is not link:
            return
        peer.link = None
        peer.down_since = self.clock.seconds()
        farewell = link.farewell
        if farewell is not None and farewell.code == GoodbyeCode.Shutdown:
            self.log.info("Node {node} is shutting down", node=peer.node)
        elif farewell is not None:
            self.log.warn("Node {node} closed the link: {reason}", node=peer.node, reason=farewell.reason)
        else:
            self.log.warn("Lost the link with {node}: {reason}", node=peer.node, reason=_describe(reason))
        if peer.address and self.running:
            self.dial(peer.address)

    def learn(self, peers: Iterable[Peer]) -> None:
        """Dial the nodes we did not know of."""
        for p in peers:
            if p.node == self.node_id:
                continue
            known = self.peers.get(p.node)
            if known is None:
                try:
                    split_address(p.address)
                except ValueError as e:
                    self.log.warn("Ignoring node {node}: {error}", node=p.node, error=e)
                    continue
                if len(self.peers) >= MAX_PEERS:
                    self.log.warn("Ignoring node {node}: {count} nodes known already", node=p.node,
                                  count=len(self.peers))
                    continue
                known = self.peers[p.node] = self._new_peer(p.node, p.address)
                self.log.info("Learned of node {node} at {address}", node=p.node, address=p.address)
            if known.link is None and self.running:
                self.dial(known.address or p.address)

    def _new_peer(self, node: UUID, address: Optional[str]) -> PeerState:
        outbox = Outbox(self.settings.queue_max_bytes, self.settings.queue_max_seconds)
        return PeerState(node, address, outbox, self.clock.seconds())

    def _tell_others(self, source: Link, payload: bytes) -> None:
        for other in self.links:
            if other is not source and other.is_open:
                other.send(payload)

    # -- interest -------------------------------------------------------------------

    def _interest_changed(self, channel: str, present: bool) -> None:
        self._pending_interest[channel] = present
        self.turn.want(EndOfTurn.ANNOUNCE)

    def _flush_interest(self) -> None:
        pending, self._pending_interest = self._pending_interest, {}
        if not pending or not self.running:
            return
        add = [c for c, present in pending.items() if present]
        remove = [c for c, present in pending.items() if not present]
        frames = [encode_interest(chunk, []) for chunk in _chunks(add, self._budget())]
        frames += [encode_interest([], chunk) for chunk in _chunks(remove, self._budget())]
        # Links still in their handshake too: they have sent the LinkHello
        # (and the interests of that moment) already.
        for link in self.links:
            if link.hello_sent:
                for payload in frames:
                    link.send(payload)

    def interest_received(self, link: Link, interest: Interest) -> None:
        """Raises :class:`~meshd.mesh.link.Violation` past the bounds on channel names."""
        peer = link.peer
        if peer is None or peer.link is not link:
            return
        if any(len(c) > MAX_CHANNEL_BYTES for c in interest.add):
            raise Violation(f"a channel name over {MAX_CHANNEL_BYTES} bytes")
        peer.interests.update(interest.add)
        peer.interests.difference_update(interest.remove)
        if len(peer.interests) > MAX_PEER_CHANNELS:
            raise Violation(f"interest in over {MAX_PEER_CHANNELS} channels")

    # -- routing --------------------------------------------------------------------

    def route(
        self,
        kind: int,
        event: "Event",
        *,
        channel: Optional[str] = None,
        watchable: Optional[Watchable] = None,
        exclude_session: Optional[UUID] = None,
        exclude_node: Optional[UUID] = None,
    ) -> int:
        """Send an event that originates here to the peers that need it; return how many.

        Nothing while the mesh service is not running.
        """
        if not self.running or (kind == RouteKind.WatcherNotification and not self.settings.forward_watchers):
            return 0
        by_interest = kind == RouteKind.ChannelMessage
        targets = [
            p for p in self.peers.values()
            if p.linked and (not by_interest or channel in p.interests)
            and (exclude_node is None or p.node != exclude_node)  # UUID == is Python-level: skip it when unused
        ]
        if not targets:
            return 0
        self.seq += 1
        data = routed_frame(self.node_id, self.seq, kind, event.frame, channel, watchable, exclude_session,
                            length_prefix=True)
        try:
            check_size(len(data) - HEADER, self.settings.max_frame_size)
        except FrameTooLarge as e:
            self.log.error("Not routing an event: {error}", error=e)
            return 0
        now = self.clock.seconds()
        for peer in targets:
            outbox = peer.outbox
            outbox.append(self.seq, data, now)
            if peer.link is not None:
                peer.link.write(data)
                if outbox.over:
                    outbox.trim()  # written already; kept only in case the link breaks
            elif outbox.over:
                self._dropped(peer, outbox.clear(), "bytes")
        self.metrics.mesh_routed_sent += len(targets)
        return len(targets)

    def routed_received(self, link: Link, routed: Routed) -> None:
        """Deliver a peer's routed frame here, once; raises :class:`~meshd.mesh.link.Violation` if it is not one."""
        peer = link.peer
        if routed.origin is not peer.node and routed.origin != peer.node:  # decode() reuses peer.node
            raise Violation(f"routed frame from {routed.origin}, not from the linked node {peer.node}")
        if routed.seq <= peer.received_seq:
            self.metrics.mesh_duplicates += 1
            return
        if routed.frame[4:8] != b"MSH1":
            raise Violation("routed frame does not carry a client frame")
        peer.received_seq = routed.seq
        self.metrics.mesh_routed_received += 1
        self._deliver(routed)

    def _expire(self) -> None:
        now = self.clock.seconds()
        for peer in list(self.peers.values()):
            if peer.link is not None:
                continue
            dropped = peer.outbox.expire(now)
            if dropped:
                self._dropped(peer, dropped, "seconds")
            if now - peer.down_since > self.settings.forget_after:
                self.log.info("Forgetting node {node}: unreachable for {seconds:.0f}s", node=peer.node,
                              seconds=now - peer.down_since)
                del self.peers[peer.node]
                self.park(peer.address)
                self._dropped(peer, peer.outbox.clear(), "seconds")

    def _dropped(self, peer: PeerState, count: int, bound: str) -> None:
        if not count:
            return
        self.metrics.mesh_queue_dropped += count
        self.log.warn(
            "Dropped {count} queued frames for {node}: past queue_max_{bound}", count=count,
            node=peer.node, bound=bound,
        )


def _chunks(items: list, budget: int, size=lambda s: len(s.encode("utf-8")) + 8) -> list[list]:
    """Split ``items`` into lists whose encoded size stays within ``budget``."""
    out: list[list] = []
    chunk: list = []
    used = 0
    for item in items:
        cost = size(item)
        if chunk and used + cost > budget:
            out.append(chunk)
            chunk, used = [], 0
        chunk.append(item)
        used += cost
    if chunk:
        out.append(chunk)
    return out


def _peer_of(link: Link) -> str:
    try:
        peer = link.transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


def _describe(reason: Optional[Failure]) -> str:
    """A one-line reason for a lost connection; TLS errors by their OpenSSL reasons."""
    if reason is None:
        return "unknown"
    from OpenSSL.SSL import Error as TLSError

    value = reason.value
    if isinstance(value, TLSError) and value.args and isinstance(value.args[0], list):
        return "TLS: " + "; ".join(str(e[-1]) for e in value.args[0])
    return str(value) or type(value).__name__


def _address_of(port) -> str:
    host = port.getHost() if port is not None else None
    return f"{host.host}:{host.port}" if hasattr(host, "port") else str(host)
