# -*- test-case-name: tests.test_mesh tests.test_link tests.test_mesh_trust -*-
"""The mesh: links to every other node, and one-hop routing of events over them.

Routing is a full mesh with one hop.  What originates on this node is sent
to every peer that needs it; what arrives from a peer is delivered to this
node's sessions and never sent on, so there are no loops and no
duplicates.  Each routed frame carries this node's id and the next number
of one per-node sequence; a peer drops any number it has seen.

Channel messages go only to peers with a subscriber on the channel: each node
tells its peers which channels it has subscribers for (``Interest``), in its
LinkHello and then as they change.

What a peer may make this node hold or do is bounded (docs/mesh.md, "Trust"):

- its node id is the one its certificate names (:meth:`Mesh.check_hello`);
- its sequence numbers never jump more than ``max_sequence_gap`` past the
  last one received from its incarnation (:meth:`Mesh.routed_received`); a
  node keeps its own numbers within that gap for every peer with sequence
  markers (:meth:`Mesh.route`, :func:`~meshd.mesh.wire.marker_frame`);
- its interest holds at most ``max_peer_channels`` channels and
  ``max_peer_interest_bytes`` bytes of names, kept ``queue_max_seconds``
  after its link goes (channel messages wait for it meanwhile), then freed;
- the nodes it tells of: at most :data:`MAX_UNKNOWN_NODES` never linked at a
  time, which never displace nor block nodes that linked, dialed
  :data:`MAX_UNKNOWN_DIALS` at a time for :data:`UNKNOWN_DIAL_WINDOW` seconds
  each, and only at addresses that can be nodes (:meth:`Mesh.undialable`);
  only nodes that linked with this one are passed on to others.
"""

from __future__ import annotations

import ipaddress
import random
import re
from typing import TYPE_CHECKING, Callable, Iterable, Optional
from uuid import UUID

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshd._io import EndOfTurn, LinkTLSFactory, link_tls_endpoint
from meshd.codec import Watchable
from meshd.config import MeshSettings, split_address
from meshd.listening import listen_now
from meshd.mesh.framing import HEADER, FrameTooLarge, check_size
from meshd.mesh.link import DialEndpoint, Link, LinkFactory, Violation, opening
from meshd.mesh.local import Siblings, certifies
from meshd.mesh.outbox import Outbox
from meshd.mesh.queries import QUERY_FEATURE, Answerer, Queries, Results
from meshd.mesh.tls import Credentials, node_id_of, peer_certificate
from meshd.mesh.wire import (
    HISTORY_FEATURE,
    MESH_VERSION,
    Answer,
    Query,
    encode_answers,
    Cursor,
    GoodbyeCode,
    Interest,
    LinkHello,
    Peer,
    RouteKind,
    Routed,
    encode_interest,
    encode_peers,
    marker_frame,
    routed_frame,
    start_frame,
)

if TYPE_CHECKING:
    from meshd.events import Event
    from meshd.history import History
    from meshd.metrics import Metrics
    from meshd.registry import Registry

_START = RouteKind.Start
#: A port 0 in a tcp/tcp6 endpoint description (``tcp:0:...``, ``tcp:port=0:...``).
_UNBOUND_PORT = re.compile(r"^(tcp6?:(?:port=)?)0(?=:|$)")

#: At most this many nodes that linked with this one are remembered; more are refused (and logged).
MAX_PEERS = 1024
#: At most this many nodes only heard of (never linked) are remembered; more are ignored (and logged).
MAX_UNKNOWN_NODES = 64
#: At most this many of those are dialed at a time, each for this many seconds before the next one's turn.
MAX_UNKNOWN_DIALS = 8
UNKNOWN_DIAL_WINDOW = 30.0
#: A channel name of interest is at most this long.
MAX_CHANNEL_BYTES = 4096
#: What no sequence gap reaches: ``max_sequence_gap = 0`` turns the check off.
_NO_GAP_LIMIT = 1 << 64


class PeerState:
    """What this node knows of one other node, kept across its links."""

    __slots__ = (
        "node", "address", "incarnation", "link", "interests", "interest_bytes", "outbox", "received_seq",
        "sent_seq", "linked", "down_since", "dial_started", "last_tried", "features", "name",
    )

    def __init__(self, node: UUID, address: Optional[str], outbox: Outbox, now: float) -> None:
        self.node = node
        self.address = address
        self.incarnation: Optional[int] = None
        self.link: Optional[Link] = None
        self.interests: set[str] = set()
        self.interest_bytes = 0  # UTF-8 bytes of the names in interests
        self.outbox = outbox
        self.received_seq = 0  # highest seq received from this node's current incarnation
        self.sent_seq = 0  # highest seq written to its current link (frames and markers)
        self.linked = False  # has been linked at least once: frames for it wait while it is away
        self.down_since = now  # when it was last seen linked (or first heard of)
        self.dial_started: Optional[float] = None  # never linked: when this turn of dialing it began
        self.last_tried = 0.0  # never linked: when its last turn of dialing ended
        self.features: frozenset[str] = frozenset()  # what its LinkHello said it understands
        self.name = ""  # its [node] name, as its last LinkHello said


class Mesh(MultiService):
    """Links this node with the others of its cluster, and routes events between them."""

    log = Logger()

    def __init__(
        self,
        settings: MeshSettings,
        credentials: Optional[Credentials],
        *,
        node_id: UUID,
        clock,
        metrics: "Metrics",
        turn: EndOfTurn,
        registry: "Registry",
        deliver: Callable[[Routed], int],
        answer: "Optional[Answerer]" = None,
        node_name: str = "",
        history: "Optional[History]" = None,
        incarnation: int = 0,
        siblings: Optional[Siblings] = None,
    ) -> None:
        super().__init__()
        self.setName("mesh")
        #: The other workers of this host (meshd.mesh.local), linked over Unix sockets; None: a node of its own.
        self.siblings = siblings
        # A certificate that names another node (or none, when peers require one) could never link.
        # Without credentials the node links with its host's workers only (no [mesh] section).
        if credentials is not None:
            credentials.check_node(siblings.host if siblings else node_id, settings.require_node_id_in_cert)
        self.settings = settings
        self.credentials = credentials
        self.clock = clock  # a reactor: it also listens, resolves and connects
        self.node_id = node_id
        self.node_name = node_name
        self.metrics = metrics
        self.turn = turn
        self.registry = registry
        self._deliver = deliver
        #: Answers the Query frames of peers (sessions and channel counts, disconnects); None: none are.
        self._answer = answer
        #: This node's history channels (meshd.history): Start markers, and what peers send of them.
        self._history = history
        self.queries = Queries(clock)
        self.incarnation = incarnation or random.getrandbits(63) + 1
        self.seq = 0
        #: A peer's numbers may jump this far (``max_sequence_gap``); ours jump at most half
        #: of it for each peer: markers are due every quarter (see :meth:`route`).
        self._max_gap = settings.max_sequence_gap or _NO_GAP_LIMIT
        self._marker_step = max(1, settings.max_sequence_gap // 2) if settings.max_sequence_gap else 0
        self._marks_due = max(1, settings.max_sequence_gap // 4) if settings.max_sequence_gap else _NO_GAP_LIMIT
        self.peers: dict[UUID, PeerState] = {}
        self.dialers: dict[str, ClientService] = {}
        #: Every live connection, handshaking or open.
        self.links: set[Link] = set()
        #: Shown every routed event of a channel: ``tap(origin, routed)`` (presence notes Joins and Leaves).
        self.routed_taps: list[Callable[[UUID, Routed], None]] = []
        #: Told when a node is gone for good, or came back as a new incarnation: ``observer(node)``.
        self.departure_observers: list[Callable[[UUID], None]] = []
        #: Told of each change of a peer's interest: ``observer(node, channel, present)``.
        self._interest_observers: list[Callable[[UUID, str, bool], None]] = []
        #: This turn's changes of channel interest, sent at its end (EndOfTurn.ANNOUNCE).
        self._pending_interest: dict[str, bool] = {}
        turn.register(EndOfTurn.ANNOUNCE, self._flush_interest)
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = self.clock
        #: The address other nodes dial; a port 0 in it becomes the port bound.
        self.advertise = settings.advertise
        #: A node on loopback may dial loopback addresses; others may not (see :meth:`undialable`).
        self._on_loopback = _is_loopback(settings.advertise.rpartition(":")[0].strip("[]"))
        #: Where the listener listens; a port 0 becomes the port first bound,
        #: so that the node keeps its address across a stop and a start.
        self._listen_on = settings.listen
        self._listening = None
        self._local_listening = None
        self._listener_factory = (
            LinkTLSFactory(credentials.server_options(), False, LinkFactory(self, dialed=False))
            if credentials is not None else None
        )

    # -- lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        if self._listener_factory is not None:
            self._listen()
        if self.siblings is not None:
            self._listen_local(self.siblings)
        super().startService()
        self.registry.observe(self._interest_changed)
        for seed in self.settings.seeds:
            self.dial(seed)
        if self.siblings is not None:
            for address in self.siblings.dialed().values():
                self.dial(address)
        self._expiry.start(1.0, now=False)
        if self._listening is not None:
            self.log.info(
                "Mesh {cluster}: node {node} listening on {bound} ({listen}), advertised as {advertise}, seeds {seeds}",
                cluster=self.settings.cluster, node=self.node_id, bound=_address_of(self._listening),
                listen=self.settings.listen, advertise=self.advertise, seeds=", ".join(self.settings.seeds) or "none",
            )

    def _listen(self) -> None:
        """Listen for links now; a port that cannot be bound stops the start (as ``strports.service`` does)."""
        assert self._listener_factory is not None
        self._listening = listen_now(self.clock, self._listen_on, self._listener_factory)
        bound = getattr(self._listening.getHost(), "port", None)
        if bound:
            self._listen_on = _UNBOUND_PORT.sub(rf"\g<1>{bound}", self._listen_on)
            host, _, port = self.advertise.rpartition(":")
            if port == "0":
                self.advertise = f"{host}:{bound}"

    def _listen_local(self, siblings: Siblings) -> None:
        """Listen for the links of this host's other workers, on this worker's Unix socket.

        A socket file left by this worker's previous process is removed first.
        """
        from meshd.mesh.local import link_path

        link_path(siblings.directory, siblings.index).unlink(missing_ok=True)
        self._local_listening = listen_now(self.clock, siblings.listen, LinkFactory(self, dialed=False))

    def stopService(self):
        if self.running:  # a MultiService stops its children again, stopped or not
            self.registry.unobserve(self._interest_changed)
        self._pending_interest.clear()
        self.queries.cancel_all()
        if self._expiry.running:
            self._expiry.stop()
        for peer in self.peers.values():
            peer.dial_started = None  # every dialer stops: the turns start again with the service
        for link in list(self.links):
            link.goodbye(GoodbyeCode.Shutdown, "node shutting down")
        stopping = [self.park(address) for address in list(self.dialers)]
        for listening in (self._listening, self._local_listening):
            if listening is not None:
                stopping.append(listening.stopListening())
        self._listening = self._local_listening = None
        stopping.append(super().stopService())
        return gatherResults([d for d in stopping if d is not None])

    # -- dialing --------------------------------------------------------------------

    def dial(self, address: str, first_retry: float = 0.1) -> None:
        """Keep a link dialed to ``address`` (until :meth:`park`), retrying after ``first_retry`` seconds, then more."""
        if address in self.dialers or address == self.advertise:
            return
        if address.startswith("unix:"):  # a worker of this host: no TLS (see meshd.mesh.local)
            endpoint = UNIXClientEndpoint(self.clock, address[len("unix:"):], timeout=5)
        elif self.credentials is None:
            self.log.warn("Not dialing {address}: this node has no [mesh] section", address=address)
            return
        else:
            try:
                host, port = split_address(address)
            except ValueError as e:
                self.log.warn("Not dialing {address}: {error}", address=address, error=e)
                return
            tcp = HostnameEndpoint(self.clock, host, port, timeout=5)
            endpoint = link_tls_endpoint(self.credentials.client_options(host), tcp)
        # A connection counts once its link opened (``opening``): one that
        # fails before (TLS refused, wrong cluster...) is a failed attempt and
        # backs off.
        service = ClientService(
            DialEndpoint(endpoint),
            LinkFactory(self, dialed=True, address=address),
            retryPolicy=backoffPolicy(initialDelay=first_retry, maxDelay=self.settings.reconnect_max_delay),
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
            if link.dialed and link.address == address and (link.is_open or link.hello_sent):
                # The service's own loseConnection would wait on the link's
                # producer forever: TLS shuts down once none is registered.
                # A link whose LinkHello went out may be open at the other end
                # already: it hears why it closes, rather than a reset.
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
            features=tuple(f for f, on in ((QUERY_FEATURE, self._answer is not None),
                                           (HISTORY_FEATURE, self._history is not None)) if on),
            name=self.node_name,
            cursors=tuple(
                Cursor(p.node, p.incarnation or 0, p.received_seq) for p in self.peers.values()
            ),
        )

    def introduce(self, link: Link) -> None:
        """After a LinkHello: every channel with subscribers, and every node that linked with this one.

        Nodes only heard of are not passed on: what a peer invents stays here.
        """
        for add in _chunks(list(self.registry.channels), self._budget()):
            link.send(encode_interest(add, []))
        peers = [Peer(p.node, p.address) for p in self.peers.values() if p.address and p.linked]
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
        identity = self._check_identity(link, hello.node)
        if identity is not None:
            return GoodbyeCode.ProtocolViolation, identity
        if hello.node == self.node_id:
            return GoodbyeCode.Self, "this is the node itself"
        if hello.address:
            try:
                split_address(hello.address)
            except ValueError as e:
                return GoodbyeCode.ProtocolViolation, f"advertised address: {e}"
        try:
            _check_names(hello.interests)
            self._check_interest(len(hello.interests), _interest_size(hello.interests))
        except Violation as e:
            return GoodbyeCode.ProtocolViolation, f"LinkHello: {e}"
        known = self.peers.get(hello.node)
        if known is None or not known.linked:
            linked = sum(1 for p in self.peers.values() if p.linked)
            if linked >= MAX_PEERS:
                return GoodbyeCode.ProtocolViolation, f"this node already links with {MAX_PEERS} nodes"
        return None

    def _check_identity(self, link: Link, node: UUID) -> Optional[str]:
        """Why a link claiming to be ``node`` is refused given its peer's certificate, or None.

        A link over a Unix socket comes from a worker of this host (only the
        node's user can reach the socket): it must claim a sibling's id.
        """
        if link.local:
            if self.siblings is None or node not in self.siblings.ids:
                return f"a local link from node {node}, which is not a worker of this host"
            return None
        try:
            cert = peer_certificate(link.transport)
            named = node_id_of(cert) if cert is not None else None
        except ValueError as e:  # IdentityError, or a certificate cryptography cannot read
            return f"peer certificate: {e}"
        if named is None:
            if self.settings.require_node_id_in_cert:
                return "the peer's certificate names no node id (see mesh.require_node_id_in_cert)"
            return None
        if not certifies(named, node):
            return f"LinkHello from node {node}, but the peer's certificate is node {named}'s"
        return None

    def hello_refused(self, link: Link, code: int, reason: str) -> None:
        """This node refused a LinkHello (:meth:`check_hello`), and said why."""
        self.note_refusal(link, reason)
        if code == GoodbyeCode.Self:
            self.park(link.address)

    def refused_by_peer(self, link: Link, goodbye) -> None:
        """The other side refused a link in its handshake, with a Goodbye."""
        self.metrics.mesh_refusals += 1
        self.log.warn("{peer} refused the link ({code}): {reason}", code=goodbye.code, reason=goodbye.reason,
                      **link.log_fields())
        if goodbye.code == GoodbyeCode.Self:
            self.park(link.address)

    def note_refusal(self, link: Link, reason: str) -> None:
        self.metrics.mesh_refusals += 1
        self.log.warn("Refused the mesh link with {peer}: {reason}", reason=reason, **link.log_fields())

    def link_refused(self, link: Link, reason: Failure) -> None:
        """A connection closed before its handshake completed (TLS failure, wrong peer...)."""
        self.metrics.mesh_refusals += 1
        self.log.warn(
            "Mesh connection {direction} {peer} closed before linking: {reason}",
            direction="to" if link.dialed else "from", reason=_describe(reason), **link.log_fields(),
        )

    def link_opened(self, link: Link, hello: LinkHello) -> bool:
        """A link's LinkHellos were exchanged and accepted; whether it is kept (see below)."""
        peer = self.peers.get(hello.node)
        if peer is None:
            peer = self.peers[hello.node] = self._new_peer(hello.node, None)
        told = None if peer.linked else peer.address  # where it was said to be, by gossip
        new_address = bool(hello.address) and hello.address != peer.address
        if new_address:
            undialable = self.undialable(hello.address)
            if undialable is None:
                peer.address = hello.address
            else:
                self.log.warn("Not dialing node {node} at its address {address}: {reason}", node=hello.node,
                              address=hello.address, reason=undialable)
                new_address = False
        if peer.incarnation != hello.incarnation:
            if peer.incarnation is not None:
                self._departed(peer.node)  # restarted: what the old one held is gone
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
        peer.features = frozenset(hello.features)
        peer.name = hello.name
        peer.dial_started = None
        if told and told != peer.address and told not in self.settings.seeds:
            self._park_unless_shared(told)  # it is elsewhere: its turn of dialing there ends
        self._free_interest(peer)  # the peer sends all of it again: in its LinkHello, then Interest frames
        self._add_interest(peer, hello.interests)  # within the bounds: check_hello checked them
        resume = next(
            (c.seq for c in hello.cursors if c.node == self.node_id and c.incarnation == self.incarnation), 0
        )
        lost = peer.outbox.lost_before(resume)
        if lost:
            self._dropped(peer, lost, "bytes")
        peer.outbox.ack(resume)
        replayed = self._resume(link, peer, resume)
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

    def _resume(self, link: Link, peer: PeerState, resume: int) -> int:
        """Send again what the peer has not read past ``resume``; how many frames.

        The numbers the peer receives stay within ``max_sequence_gap`` of
        each other: where the frames kept for it (or the numbers this node
        went on to use for others) jump further, markers fill the gap.  A
        peer that has read nothing from this incarnation (``resume`` 0)
        checks no gap before its first frame.
        """
        step = self._marker_step
        sent = resume
        replayed = 0
        for seq, data in peer.outbox.entries_after(resume):
            if step and sent:
                sent = self._fill(link, sent, seq, step)
            link.write(data)
            sent = seq
            replayed += 1
        if step and sent:
            sent = self._fill(link, sent, self.seq, step)
        peer.sent_seq = sent
        return replayed

    def _fill(self, link: Link, sent: int, upto: int, step: int) -> int:
        """Markers from ``sent`` on, ``step`` apart, until ``upto`` is within ``step``; the last number sent."""
        while upto - sent > step:
            sent += step
            link.write(marker_frame(self.node_id, sent))
        return sent

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
        self.queries.lost(peer.node)
        farewell = link.farewell
        if not self.running:
            self.log.info("Closed the link with node {node} at {address} (this node is stopping)", node=peer.node,
                          address=peer.address)
        elif farewell is not None and farewell.code == GoodbyeCode.Shutdown:
            self.log.info("Node {node} is shutting down", node=peer.node)
        elif farewell is not None and farewell.code == GoodbyeCode.Duplicate:
            self.log.info("Node {node} at {address} closed a link it keeps another of: {reason}", node=peer.node,
                          address=peer.address, reason=farewell.reason)
        elif farewell is not None:
            self.log.warn("Node {node} at {address} closed the link: {reason}", node=peer.node,
                          address=peer.address, reason=farewell.reason)
        else:
            self.log.warn("Lost the link with node {node} at {address}: {reason}", node=peer.node,
                          address=peer.address, reason=_describe(reason))
        if self.running:
            self._redial(peer)

    # -- queries ----------------------------------------------------------------------

    def ask(self, query: Query, timeout: float) -> "Deferred[Results]":
        """Ask every other node ``query``; fire with their answers and the nodes that gave none.

        Nodes known but not linked now, or linked but too old to take queries, are missing.
        """
        links, unreachable = [], []
        for peer in self.peers.values():
            if peer.link is not None and peer.link.is_open and QUERY_FEATURE in peer.features:
                links.append(peer.link)
            elif peer.linked or peer.link is not None:
                unreachable.append(peer.node)
        return self.queries.ask(links, unreachable, query, timeout)

    def query_received(self, link: Link, query: Query) -> None:
        """A peer's Query: answer it on the same link, split to fit the frame size."""
        if self._answer is None:
            raise Violation("a Query, which this node did not offer to answer")
        try:
            reply = self._answer(query)
            payloads = encode_answers(query.id, self._budget(), reply.sessions, list(reply.channels),
                                      list(reply.closed), list(reply.events), list(reply.covered),
                                      list(reply.presence))
            for payload in payloads:
                check_size(len(payload), self.settings.max_frame_size)
        except Exception:
            self.log.failure("Could not answer a query from {node}", node=link.peer.node if link.peer else "?")
            payloads = encode_answers(query.id, self._budget())  # an empty answer: the asker goes on
        for payload in payloads:
            link.send(payload)

    def answer_received(self, link: Link, answer: Answer) -> None:
        if link.peer is not None:
            self.queries.answered(link.peer.node, answer)

    def learn(self, peers: Iterable[Peer]) -> None:
        """Take note of the nodes a linked peer tells of (in its LinkHello or a Peers frame).

        A node that linked with this one before and is away is dialed again.
        Nodes never linked are remembered up to :data:`MAX_UNKNOWN_NODES` and
        dialed in turns (:meth:`_dial_unknown`); a node that was told of them
        links with this one in any case, and so do they when they are real.
        """
        unknown = sum(1 for p in self.peers.values() if not p.linked)
        learned = ignored = 0
        for p in peers:
            if p.node == self.node_id:
                continue
            known = self.peers.get(p.node)
            if known is None:
                undialable = self.undialable(p.address)
                if undialable is not None:
                    self.log.warn("Ignoring node {node} at {address}: {reason}", node=p.node, address=p.address,
                                  reason=undialable)
                    continue
                if unknown >= MAX_UNKNOWN_NODES:
                    ignored += 1
                    continue
                self.peers[p.node] = self._new_peer(p.node, p.address)
                unknown += 1
                learned += 1
                self.log.info("Learned of node {node} at {address}", node=p.node, address=p.address)
            elif known.linked and known.link is None and self.running:
                self._redial(known)
        if ignored:
            self.log.warn("Ignoring {count} more nodes told of: {known} nodes never linked are known already",
                          count=ignored, known=unknown)
        if learned:
            self._dial_unknown()

    def undialable(self, address: str) -> Optional[str]:
        """Why this node does not dial ``address``, told by a peer; None if it does.

        It must be ``HOST:PORT`` and not an unspecified or multicast address;
        a loopback host only if this node advertises a loopback address itself.
        """
        try:
            host, _port = split_address(address)
        except ValueError as e:
            return str(e)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and (ip.is_unspecified or ip.is_multicast):
            return "not a unicast address"
        if not self._on_loopback and _is_loopback(host):
            return "a loopback address, and this node is not on loopback"
        return None

    def _dial_unknown(self) -> None:
        """Dial the nodes never linked in turns: at most :data:`MAX_UNKNOWN_DIALS` at a time.

        Each turn lasts :data:`UNKNOWN_DIAL_WINDOW` seconds (with the usual
        backoff between attempts); then, if others wait, the dialer is parked
        and the node waits for its next turn behind them.
        """
        if not self.running:
            return
        now = self.clock.seconds()
        dialing: list[PeerState] = []
        waiting: list[PeerState] = []
        for p in self.peers.values():
            if p.linked or not p.address or self._sibling(p.node):
                continue
            (dialing if p.dial_started is not None else waiting).append(p)
        if not waiting:
            return
        for p in dialing:
            if now - p.dial_started >= UNKNOWN_DIAL_WINDOW:
                p.dial_started = None
                p.last_tried = now
                if p.address not in self.settings.seeds:  # a seed is dialed for good
                    self._park_unless_shared(p.address)
        busy = sum(1 for p in dialing if p.dial_started is not None)
        waiting.sort(key=lambda p: p.last_tried)
        for p in waiting[: max(0, MAX_UNKNOWN_DIALS - busy)]:
            p.dial_started = now
            self.dial(p.address, first_retry=1.0)

    def _sibling(self, node: UUID) -> bool:
        """Whether ``node`` is a worker of this host: linked over its Unix socket, never dialed elsewhere."""
        return self.siblings is not None and node in self.siblings.ids

    def _redial(self, peer: PeerState) -> None:
        """Dial a node that linked with this one again: at its address, or a sibling at its socket.

        Of two siblings, the higher-indexed one dials (the other waits).
        """
        if self._sibling(peer.node):
            address = self.siblings.dialed().get(peer.node)
            if address is not None:
                self.dial(address)
        elif peer.address:
            self.dial(peer.address)

    def _park_unless_shared(self, address: Optional[str]) -> None:
        """Park ``address`` unless a node that linked with this one is dialed there too.

        A node told of under another node's address must not stop the
        dialing of that node when its turn ends or when it is forgotten.
        """
        if not any(p.linked and p.address == address for p in self.peers.values()):
            self.park(address)

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

    def _departed(self, node: UUID) -> None:
        for observer in list(self.departure_observers):
            observer(node)

    def announce_now(self) -> None:
        """Send this turn's changes of interest now, so that frames sent after it follow them."""
        self._flush_interest()

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
        """Raises :class:`~meshd.mesh.link.Violation` past the bounds (and frees the peer's interest)."""
        peer = link.peer
        if peer is None or peer.link is not link:
            return
        interests = peer.interests
        for channel in interest.remove:
            if channel in interests:
                interests.remove(channel)
                peer.interest_bytes -= len(channel.encode("utf-8"))
                for observer in self._interest_observers:
                    observer(peer.node, channel, False)
        try:
            self._add_interest(peer, interest.add)
            self._check_interest(len(interests), peer.interest_bytes)
        except Violation:
            self._free_interest(peer)  # the link closes; the peer sends it all again if it links again
            raise
        self._start_history(peer, interest.add)

    def _add_interest(self, peer: PeerState, channels) -> None:
        _check_names(channels)
        interests = peer.interests
        for channel in channels:
            if channel not in interests:
                interests.add(channel)
                peer.interest_bytes += len(channel.encode("utf-8"))
                for observer in self._interest_observers:
                    observer(peer.node, channel, True)

    def _check_interest(self, channels: int, size: int) -> None:
        """Raise :class:`~meshd.mesh.link.Violation` if a peer's interest is past the bounds."""
        settings = self.settings
        if channels > settings.max_peer_channels:
            raise Violation(f"interest in over {settings.max_peer_channels} channels (mesh.max_peer_channels)")
        if size > settings.max_peer_interest_bytes:
            raise Violation(f"interest in over {settings.max_peer_interest_bytes} bytes of channel names "
                            f"(mesh.max_peer_interest_bytes)")

    def _free_interest(self, peer: PeerState) -> None:
        freed, peer.interests = peer.interests, set()
        peer.interest_bytes = 0
        for observer in self._interest_observers:
            for channel in freed:
                observer(peer.node, channel, False)

    def observe_interest(self, observer: Callable[[UUID, str, bool], None]) -> None:
        """Call ``observer(node, channel, present)`` when a peer gains interest in a channel or loses it
        (it is first told of the interest held now)."""
        self._interest_observers.append(observer)
        for peer in self.peers.values():
            for channel in peer.interests:
                observer(peer.node, channel, True)

    def received(self) -> "list[tuple[UUID, int, int]]":
        """For each node known: its id, incarnation (0 if it never linked) and the last number received."""
        return [(p.node, p.incarnation or 0, p.received_seq) for p in self.peers.values()]

    def gone(self, node: UUID) -> bool:
        """Whether ``node`` is given up: forgotten, or away past ``queue_max_seconds`` (its sessions are
        gone from presence; nothing it sent before then is on its way)."""
        peer = self.peers.get(node)
        if peer is None:
            return True
        return peer.link is None and self.clock.seconds() - peer.down_since > self.settings.queue_max_seconds

    def linked(self) -> list[UUID]:
        """The nodes linked with this one now."""
        return [peer.node for peer in self.peers.values() if peer.link is not None and peer.link.is_open]

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
        seq: Optional[int] = None,
    ) -> int:
        """Send an event that originates here to the peers that need it; return how many.

        ``seq``: the number :meth:`next_seq` gave the event already (a history
        channel's event carries it in its frame); else it takes the next one
        if any peer needs it.  Nothing while the mesh service is not running.
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
        if seq is None:
            self.seq = seq = self.seq + 1
        data = routed_frame(self.node_id, seq, kind, event.frame, channel, watchable, exclude_session,
                            length_prefix=True)
        try:
            check_size(len(data) - HEADER, self.settings.max_frame_size)
        except FrameTooLarge as e:
            self.log.error("Not routing an event: {error}", error=e)
            return 0
        now = self.clock.seconds()
        for peer in targets:
            self._send_routed(peer, seq, data, now)
        self.metrics.mesh_routed_sent += len(targets)
        if seq >= self._marks_due:
            self._mark_quiet_peers()
        return len(targets)

    def _send_routed(self, peer: PeerState, seq: int, data: bytes, now: float) -> None:
        """Write a routed frame to ``peer`` (or keep it for it while it is away, within the bounds)."""
        outbox = peer.outbox
        outbox.append(seq, data, now)
        link = peer.link
        if link is not None:
            link.write(data)
            peer.sent_seq = seq
            if outbox.over:
                outbox.trim()  # written already; kept only in case the link breaks
        elif outbox.over:
            self._dropped(peer, outbox.clear(), "bytes")

    def _start_history(self, peer: PeerState, channels) -> None:
        """Tell ``peer``, which just said it wants ``channels``, from which of this node's numbers on it
        gets every event of those of them that keep history (a Start marker each; meshd.history)."""
        history = self._history
        if history is None or HISTORY_FEATURE not in peer.features:
            return
        now = self.clock.seconds()
        for channel in channels:
            if history.options(channel) is not None:
                seq = self.next_seq()
                self._send_routed(peer, seq, start_frame(self.node_id, seq, channel), now)

    def next_seq(self) -> int:
        """The next number of this node's events, for one that carries it (a history channel's)."""
        if self.seq + 1 >= self._marks_due:
            self._mark_quiet_peers()  # with numbers used already: none of them is this event's
        self.seq += 1
        return self.seq

    def _mark_quiet_peers(self) -> None:
        """A marker to each linked peer sent nothing for half of ``max_sequence_gap`` numbers.

        Numbers count every event this node routes, to any peer, so a peer
        with no interest in the busy channels would otherwise see them jump
        arbitrarily far.  This runs every quarter of the gap: no peer's
        numbers jump by more than three quarters of it.
        """
        seq = self.seq
        self._marks_due = seq + max(1, self._marker_step // 2)
        for peer in self.peers.values():
            link = peer.link
            if link is not None and seq - peer.sent_seq >= self._marker_step:
                link.write(marker_frame(self.node_id, seq))
                peer.sent_seq = seq

    def routed_received(self, link: Link, routed: Routed) -> None:
        """Deliver a peer's routed frame here, once; raises :class:`~meshd.mesh.link.Violation` if it is not one."""
        peer = link.peer
        if routed.origin is not peer.node and routed.origin != peer.node:  # decode() reuses peer.node
            raise Violation(f"routed frame from {routed.origin}, not from the linked node {peer.node}")
        seq = routed.seq
        last = peer.received_seq
        if seq <= last:
            self.metrics.mesh_duplicates += 1
            return
        if seq - last > self._max_gap and last:
            raise Violation(f"routed frame {seq} jumps {seq - last} past {last}, the last one from that node "
                            f"(mesh.max_sequence_gap {self._max_gap})")
        if routed.frame[4:8] != b"MSH1":
            raise Violation("routed frame does not carry a client frame")
        peer.received_seq = seq
        self.metrics.mesh_routed_received += 1
        if routed.kind == _START:
            if self._history is not None and routed.channel is not None:
                self._history.begin(routed.channel, peer.node, peer.incarnation or 0, seq)
            return
        history = self._history
        if history is not None and routed.channel is not None and history.options(routed.channel) is not None:
            history.record(routed.channel, peer.node, peer.incarnation or 0, seq, routed.frame)
        if self.routed_taps and routed.channel is not None:
            for tap in self.routed_taps:
                tap(peer.node, routed)
        self._deliver(routed)

    def _expire(self) -> None:
        """Every second: drop what waited too long, free what a long-gone peer held, forget the lost."""
        now = self.clock.seconds()
        settings = self.settings
        for peer in list(self.peers.values()):
            if peer.link is not None:
                continue
            dropped = peer.outbox.expire(now)
            if dropped:
                self._dropped(peer, dropped, "seconds")
            down = now - peer.down_since
            if peer.interests and down > settings.queue_max_seconds:
                # Past the outage bound nothing need wait for it: it sends its interest again when it links.
                self._free_interest(peer)
                self._departed(peer.node)
            if down > settings.forget_after:
                self.log.info("Forgetting node {node}: unreachable for {seconds:.0f}s", node=peer.node,
                              seconds=down)
                del self.peers[peer.node]
                self._park_unless_shared(peer.address)
                self._dropped(peer, peer.outbox.clear(), "seconds")
        self._dial_unknown()

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


def _check_names(channels) -> None:
    if any(len(c) > MAX_CHANNEL_BYTES for c in channels):
        raise Violation(f"a channel name over {MAX_CHANNEL_BYTES} bytes")


def _interest_size(channels) -> int:
    return sum(len(c.encode("utf-8")) for c in channels)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
