# -*- test-case-name: tests.test_metrics -*-
"""Counters and gauges of a node, served in the Prometheus text format.

Counters are plain integers bumped on the paths that already do the work
(once per frame or per event, never per recipient); gauges are read from the
registry when scraped.  ``[metrics] listen`` turns the HTTP endpoint on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource

from meshd.codec import error_code_name

if TYPE_CHECKING:
    from meshd.app import Application


class Metrics:
    """The node's counters."""

    __slots__ = (
        "frames_received",
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
    )

    def __init__(self) -> None:
        self.frames_received = 0
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

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def delivered(self, count: int) -> None:
        self.events += 1
        self.deliveries += count


def render(app: "Application") -> str:
    """The Prometheus text exposition of ``app``'s metrics."""
    m, r = app.metrics, app.registry
    node = f'node="{app.node_id}"'
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, value: int, labels: str = "") -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{{{node}{labels}}} {value}")

    metric("meshd_sessions", "gauge", "Open WebSocket sessions.", len(r.sessions))
    metric("meshd_members", "gauge", "Sessions that have said Hello.", len(r.members))
    metric("meshd_channels", "gauge", "Channels with at least one subscriber.", len(r.channels))
    metric("meshd_subscriptions", "gauge", "Channel subscriptions over all sessions.",
           sum(len(s) for s in r.channels.values()))
    metric("meshd_watchables", "gauge", "Watchables with at least one watcher.", len(r.watchers))
    metric("meshd_sessions_opened_total", "counter", "Sessions opened since start.", m.sessions_opened)
    metric("meshd_frames_received_total", "counter", "Client frames received.", m.frames_received)
    metric("meshd_events_total", "counter", "Events emitted by this node.", m.events)
    metric("meshd_deliveries_total", "counter", "Event frames written to sessions.", m.deliveries)
    metric("meshd_slow_consumer_closes_total", "counter",
           "Sessions closed because their send backlog passed limits.max_send_buffer.",
           m.slow_consumer_closes)
    metric("meshd_hello_timeouts_total", "counter", "Sessions closed for not saying Hello in time.",
           m.hello_timeouts)
    mesh = app.mesh
    if mesh is not None:
        metric("meshd_mesh_links", "gauge", "Open links to other nodes.",
               sum(1 for p in mesh.peers.values() if p.link is not None))
        metric("meshd_mesh_peers", "gauge", "Other nodes this node knows of.", len(mesh.peers))
        metric("meshd_mesh_routed_sent_total", "counter", "Routed frames sent to peers.", m.mesh_routed_sent)
        metric("meshd_mesh_routed_received_total", "counter", "Routed frames received and delivered.",
               m.mesh_routed_received)
        metric("meshd_mesh_duplicates_total", "counter", "Routed frames dropped as already seen.",
               m.mesh_duplicates)
        metric("meshd_mesh_queue_dropped_total", "counter",
               "Frames for an unreachable peer dropped past the queue bounds.", m.mesh_queue_dropped)
        metric("meshd_mesh_refusals_total", "counter",
               "Mesh connections refused (TLS, cluster, version, protocol violations).", m.mesh_refusals)
    for code, count in sorted(m.errors.items()):
        metric("meshd_errors_total", "counter", "Error frames sent, by error code.", count,
               f',code="{error_code_name(code)}"')
    return "\n".join(lines) + "\n"


class MetricsResource(Resource):
    """``GET /metrics``."""

    isLeaf = True

    def __init__(self, app: "Application") -> None:
        super().__init__()
        self.app = app

    def render_GET(self, request) -> bytes:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"not found: try /metrics\n"
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return render(self.app).encode("utf-8")
