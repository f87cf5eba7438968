# -*- test-case-name: tests.test_metrics -*-
"""Counters, gauges and health of a node, served over HTTP on ``[metrics] listen``.

Counters are plain integers bumped on the paths that already do the work
(once per frame or per event, never per recipient, and no clock reads per
message); gauges are read from the registry and the mesh when scraped.
:class:`NodeCollector` turns both into prometheus-client metric families at
scrape time, so the hot paths never touch prometheus-client.

The listener (:class:`MetricsSite`) answers:

- ``GET /metrics``: the Prometheus text format, from a registry of the
  node's own (its :class:`NodeCollector` and prometheus-client's
  ``ProcessCollector``; never the global ``REGISTRY``);
- ``GET /healthz``: 200 ``{"status": "ok"}`` while the process answers;
- ``GET /readyz``: 200 when ready, else 503 naming what is not
  (:meth:`Health.not_ready`).

It writes no access-log line per request.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from typing import TYPE_CHECKING, Iterable, Optional

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Site

from meshd.codec import error_code_name, opcode_name

if TYPE_CHECKING:
    from meshd.app import Application

#: Upper bounds (seconds) of the buckets of ``meshd_turn_seconds``.
TURN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Upper bounds (seconds) of the buckets of ``meshd_mesh_link_rtt_seconds``.
RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: A seed that has not linked is given up on (for readiness) after this many ``reconnect_max_delay``.
SEED_GIVE_UP_ROUNDS = 3
#: Link states by what ``meshd_mesh_link_states`` reports them as.
_LINK_STATES = {
    "connecting": "handshaking", "awaiting_hello": "handshaking", "hello_sent": "handshaking",
    "open": "open", "closing": "closing",
}
TEXT_FORMAT = b"text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """A histogram as plain numbers: bucket counts (not cumulative), a count and a sum."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: over every bound (+Inf)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    """The node's counters."""

    __slots__ = (
        "frames_received",
        "opcodes",
        "events",
        "deliveries",
        "sessions_opened",
        "slow_consumer_closes",
        "hello_timeouts",
        "errors",
        "mesh_refusals",
        "mesh_routed_sent",
        "mesh_routed_received",
        "mesh_duplicates",
        "mesh_queue_dropped",
        "turns",
        "mesh_rtt",
    )

    def __init__(self) -> None:
        self.frames_received = 0
        #: Frames decoded, by opcode (one dict increment per frame, in Application.dispatch).
        self.opcodes: dict[int, int] = {}
        self.events = 0
        self.deliveries = 0
        self.sessions_opened = 0
        self.slow_consumer_closes = 0
        self.hello_timeouts = 0
        self.errors: dict[int, int] = {}
        self.mesh_refusals = 0
        self.mesh_routed_sent = 0
        self.mesh_routed_received = 0
        self.mesh_duplicates = 0
        self.mesh_queue_dropped = 0
        #: Per reactor turn with a client frame: first frame read to the end of the flush (EndOfTurn.timed).
        self.turns = Histogram(TURN_BUCKETS)
        #: Mesh links' round trips: a Heartbeat's ping to its pong, every heartbeat_interval per link.
        self.mesh_rtt = Histogram(RTT_BUCKETS)

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def delivered(self, count: int) -> None:
        self.events += 1
        self.deliveries += count


class NodeCollector(Collector):
    """The node's metric families, made from :class:`Metrics`, the registry and the mesh when scraped."""

    def __init__(self, app: "Application") -> None:
        self.app = app

    def collect(self):
        app = self.app
        m, r = app.metrics, app.registry
        node = str(app.node_id)

        def gauge(name: str, text: str, value: float):
            family = GaugeMetricFamily(name, text, labels=["node"])
            family.add_metric([node], value)
            return family

        def counter(name: str, text: str, value: float):
            family = CounterMetricFamily(name, text, labels=["node"])
            family.add_metric([node], value)
            return family

        def histogram(name: str, text: str, values: Histogram):
            family = HistogramMetricFamily(name, text, labels=["node"])
            family.add_metric([node], values.buckets(), values.sum)
            return family

        def by(kind, name: str, text: str, label: str, values: Iterable[tuple[str, float]]):
            family = kind(name, text, labels=["node", label])
            for key, value in values:
                family.add_metric([node, key], value)
            return family

        sessions = r.sessions.values()
        yield gauge("meshd_sessions", "Open WebSocket sessions.", len(r.sessions))
        yield gauge("meshd_members", "Sessions that have said Hello.", len(r.members))
        yield gauge("meshd_channels", "Channels with at least one subscriber.", len(r.channels))
        yield gauge("meshd_subscriptions", "Channel subscriptions over all sessions.",
                    sum(len(s) for s in r.channels.values()))
        yield gauge("meshd_watchables", "Watchables with at least one watcher.", len(r.watchers))
        history = app.history
        if history is not None:
            yield gauge("meshd_history_bytes", "Bytes of history channels' events kept (limits.history_bytes).",
                        history.size)
            yield gauge("meshd_history_events", "History channels' events kept.", history.count)
            yield gauge("meshd_history_channels", "History channels with something kept or followed.",
                        len(history.channels))
        backlogs = [s.outlet.backlog for s in sessions if s.outlet is not None and s.outlet.backlog]
        yield gauge("meshd_sessions_backlogged",
                    "Sessions whose transport is full and that have a send backlog.", len(backlogs))
        yield gauge("meshd_session_backlog_bytes", "Bytes of send backlog over all sessions.", sum(backlogs))
        yield gauge("meshd_draining", "1 while the node is draining, else 0.", int(app.draining))
        yield counter("meshd_sessions_opened_total", "Sessions opened since start.", m.sessions_opened)
        yield counter("meshd_frames_received_total", "Client frames received.", m.frames_received)
        handlers = app.handlers
        opcodes: dict[str, int] = {}
        for op, count in m.opcodes.items():
            # Only opcodes the node handles get a label of their own: clients choose the rest.
            label = opcode_name(op) if handlers.get(op) is not None else "unknown"
            opcodes[label] = opcodes.get(label, 0) + count
        yield by(CounterMetricFamily, "meshd_frames_by_opcode_total", "Client frames decoded, by opcode.",
                 "opcode", sorted(opcodes.items()))
        yield counter("meshd_events_total", "Events emitted by this node.", m.events)
        yield counter("meshd_deliveries_total", "Event frames written to sessions.", m.deliveries)
        yield counter("meshd_slow_consumer_closes_total",
                      "Sessions closed because their send backlog passed limits.max_send_buffer.",
                      m.slow_consumer_closes)
        yield counter("meshd_hello_timeouts_total", "Sessions closed for not saying Hello in time.",
                      m.hello_timeouts)
        yield by(CounterMetricFamily, "meshd_errors_total", "Error frames sent, by error code.", "code",
                 [(error_code_name(code), count) for code, count in sorted(m.errors.items())])
        yield histogram(
            "meshd_turn_seconds",
            "Per reactor turn with client frames: from the first frame read to the end of the turn's flush.",
            m.turns,
        )
        mesh = app.mesh
        if mesh is None:
            return
        yield gauge("meshd_mesh_links", "Open links to other nodes.",
                    sum(1 for p in mesh.peers.values() if p.link is not None))
        yield gauge("meshd_mesh_peers", "Other nodes this node knows of.", len(mesh.peers))
        states = dict.fromkeys(("handshaking", "open", "closing"), 0)
        for link in mesh.links:
            state = _LINK_STATES.get(link.state)
            if state is not None:
                states[state] += 1
        yield by(GaugeMetricFamily, "meshd_mesh_link_states", "Live mesh connections, by state.", "state",
                 states.items())
        yield histogram(
            "meshd_mesh_link_rtt_seconds",
            "Mesh links' round-trip times: a Heartbeat's ping to its answer (one a heartbeat_interval per link).",
            m.mesh_rtt,
        )
        yield by(GaugeMetricFamily, "meshd_mesh_link_rtt_last_seconds",
                 "Each open link's last measured round-trip time.", "peer",
                 sorted((str(p.node), p.link.rtt) for p in mesh.peers.values()
                        if p.link is not None and p.link.rtt is not None))
        peers = sorted(mesh.peers.values(), key=lambda p: str(p.node))
        yield by(GaugeMetricFamily, "meshd_mesh_outbox_bytes",
                 "Bytes of routed frames kept for a peer until it acknowledges them.", "peer",
                 [(str(p.node), p.outbox.size) for p in peers])
        yield by(GaugeMetricFamily, "meshd_mesh_outbox_frames",
                 "Routed frames kept for a peer until it acknowledges them.", "peer",
                 [(str(p.node), len(p.outbox)) for p in peers])
        yield counter("meshd_mesh_routed_sent_total", "Routed frames sent to peers.", m.mesh_routed_sent)
        yield counter("meshd_mesh_routed_received_total", "Routed frames received and delivered.",
                      m.mesh_routed_received)
        yield counter("meshd_mesh_duplicates_total", "Routed frames dropped as already seen.", m.mesh_duplicates)
        yield counter("meshd_mesh_queue_dropped_total",
                      "Frames for an unreachable peer dropped past the queue bounds.", m.mesh_queue_dropped)
        yield counter("meshd_mesh_refusals_total",
                      "Mesh connections refused (TLS, cluster, version, protocol violations).", m.mesh_refusals)


def node_registry(app: "Application") -> CollectorRegistry:
    """A registry of ``app``'s own: its :class:`NodeCollector` and the process's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(app))
    ProcessCollector(registry=registry)
    return registry


def render(app: "Application", registry: Optional[CollectorRegistry] = None) -> str:
    """The Prometheus text exposition of ``app``'s metrics."""
    return generate_latest(registry if registry is not None else node_registry(app)).decode("utf-8")


class Health:
    """Whether a node is ready for traffic, and if not, why (``GET /readyz``).

    Ready means all of:

    - ``websocket``: the WebSocket listeners are up (as many ports as
      ``listen`` services, and at least one);
    - ``mesh``: with a ``[mesh]`` section, the mesh service runs and every
      seed is linked once or given up on.  A seed counts as linked once a
      node at that address has linked with this one (either side dialing),
      or once this node does not dial it (it is this node itself or not a
      valid address, or the node there keeps the link up); it is given up on
      :data:`SEED_GIVE_UP_ROUNDS` times ``reconnect_max_delay`` after
      :attr:`started` (when the metrics listener started: with the node).
      A seed linked once stays counted while its link is down: readiness
      is about having joined the cluster, not about every link now;
    - ``workers``: a worker of a host (``[node] workers``) has linked with
      every other worker of its host once (frames for a node never linked
      are not kept for it);
    - ``draining``: the node is not draining (:attr:`Application.draining`).
    """

    def __init__(self, app: "Application") -> None:
        self.app = app
        #: When the node started, on its clock (set by :meth:`start`).
        self.started: Optional[float] = None
        self._seeds_linked: set[str] = set()

    def start(self) -> None:
        if self.started is None:
            self.started = self.app.clock.seconds()

    def not_ready(self) -> dict[str, str]:
        """What is not ready, by name (empty: ready)."""
        app = self.app
        reasons: dict[str, str] = {}
        wanted = max(1, sum(1 for s in app if (s.name or "").startswith("websocket:")))
        up = app.factory.numPorts
        if up < wanted:
            reasons["websocket"] = f"{up} of {wanted} WebSocket listeners up"
        mesh = app.mesh
        if mesh is not None:
            waiting = self._seeds_waiting(mesh)
            if not mesh.running:
                reasons["mesh"] = "the mesh service is not running"
            elif waiting:
                reasons["mesh"] = "seeds not linked yet: " + ", ".join(waiting)
            siblings = self._siblings_waiting(mesh)
            if siblings:
                reasons["workers"] = "not linked yet with workers " + ", ".join(siblings)
        if app.draining:
            reasons["draining"] = "the node is draining"
        return reasons

    def _siblings_waiting(self, mesh) -> list[str]:
        """The workers of this host (by index) that this one has never linked with."""
        siblings = mesh.siblings
        if siblings is None:
            return []
        from meshd.mesh.local import worker_node_id

        waiting = []
        for index in range(siblings.count):
            node = worker_node_id(siblings.host, index)
            peer = mesh.peers.get(node)
            if index != siblings.index and (peer is None or not peer.linked):
                waiting.append(str(index))
        return waiting

    def _seeds_waiting(self, mesh) -> list[str]:
        seeds = mesh.settings.seeds
        if not seeds:
            return []
        linked = self._seeds_linked
        addresses = {p.address for p in mesh.peers.values() if p.linked}
        addresses.update(link.address for link in mesh.links if link.dialed and link.is_open)
        for seed in seeds:
            if seed in addresses or seed == mesh.advertise or (mesh.running and seed not in mesh.dialers):
                linked.add(seed)
        if self.started is not None:
            if self.app.clock.seconds() - self.started >= SEED_GIVE_UP_ROUNDS * mesh.settings.reconnect_max_delay:
                return []
        return [seed for seed in seeds if seed not in linked]


class MetricsResource(Resource):
    """``GET /metrics``, ``/healthz`` and ``/readyz``."""

    isLeaf = True

    def __init__(self, app: "Application", health: Optional[Health] = None) -> None:
        super().__init__()
        self.app = app
        self.health = health if health is not None else Health(app)
        self.registry = node_registry(app)

    def render_GET(self, request) -> bytes:
        path = request.path
        if path == b"/metrics":
            request.setHeader(b"content-type", TEXT_FORMAT)
            return generate_latest(self.registry)
        if path == b"/healthz":
            return json_answer(request, 200, {"status": "ok"})
        if path == b"/readyz":
            reasons = self.health.not_ready()
            if reasons:
                return json_answer(request, 503, {"status": "not ready", "not_ready": reasons})
            return json_answer(request, 200, {"status": "ready"})
        request.setResponseCode(404)
        return b"not found: try /metrics, /healthz or /readyz\n"


def json_answer(request, code: int, body: dict) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode("utf-8") + b"\n"


class QuietSite(Site):
    """A metrics listener's site: no access-log line per request (scrapers ask every few seconds)."""

    def log(self, request) -> None:
        pass

    def logPrefix(self) -> str:
        return "Site"  # what Twisted logs on listening ("Site starting on PORT"), as with a plain Site


class MetricsSite(QuietSite):
    """A node's metrics site (:class:`MetricsResource`)."""

    def __init__(self, app: "Application") -> None:
        self.health = Health(app)
        super().__init__(MetricsResource(app, self.health))

    def startFactory(self) -> None:
        super().startFactory()
        self.health.start()
