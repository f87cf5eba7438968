# -*- test-case-name: tests.test_web -*-
"""The web listener: the browser client and the demo page (``[web]``, ``--demo``).

==============================  ===================================================
``GET /static/meshd-client.js``  the TypeScript client (``clients/js``) bundled as one ES module
``GET /``                        the demo page (only with ``[web] demo = true``)
``GET /demo/config.json``        where the page finds this node's WebSocket listeners
``GET /demo/cluster.json``       this node, its peers, links and channels (``/api/info``)
==============================  ===================================================

Everything the page loads comes from this listener: no CDN, no framework.
The demo's JSON shows what ``GET /api/info`` shows, without a key: it is for
a development machine or a private network, not for a public node.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.static import File

if TYPE_CHECKING:
    from meshd.app import Application

#: The page and the browser client, shipped inside the package.
STATIC = Path(str(files("meshd.web") / "static"))
#: The demo page's own files (HTML, script, style) under :data:`STATIC`.
DEMO = STATIC / "demo"

_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    # The page talks to WebSocket listeners on other ports (and other nodes).
    b"content-security-policy": b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:",
}


class _Json(Resource):
    isLeaf = True

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.answer()).encode("utf-8") + b"\n"


class _Root(Resource):
    """``/``: the demo page when it is on; the static files in any case."""

    def __init__(self, app: "Application", demo: bool) -> None:
        super().__init__()
        self.app = app
        self.demo = demo
        self.started = app.clock.seconds()
        self.putChild(b"static", File(str(STATIC)))
        if demo:
            self.putChild(b"demo", _Demo(self))

    def getChild(self, path: bytes, request) -> Resource:
        if path == b"" and self.demo:
            return File(str(DEMO / "index.html"), defaultType="text/html")
        return _NotFound(self.demo)

    def render_GET(self, request) -> bytes:  # "/" without a trailing segment
        return self.getChild(b"", request).render(request)

    def websocket(self) -> list[dict[str, Any]]:
        """This node's WebSocket listeners: port and whether the page must use ``wss://``."""
        return [
            {"port": address.port, "tls": endpoint.startswith("ssl:")}
            for endpoint, address in self.app.websocket_addresses()
            if getattr(address, "port", None) is not None
        ]


class _Demo(Resource):
    def __init__(self, root: _Root) -> None:
        super().__init__()
        from meshd.api import channel_counts, node_info

        app = root.app
        self.putChild(b"config.json", _Json(lambda: {
            "node": {"id": str(app.node_id), "name": app.config.node_name},
            "websocket": root.websocket(),
        }))
        self.putChild(b"cluster.json", _Json(lambda: {
            "info": node_info(app, root.started),
            "channels": channel_counts(app)["channels"],
        }))


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, demo: bool) -> None:
        super().__init__()
        self.demo = demo

    def render(self, request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.demo:
            return b"not found: the demo page is at /\n"
        return b"not found: this listener serves /static/meshd-client.js; [web] demo = true adds the demo page at /\n"


class WebSite(server.Site):
    """The web listener's site; no access-log line per request."""

    def __init__(self, app: "Application", demo: bool) -> None:
        super().__init__(_Root(app, demo))

    def getResourceFor(self, request) -> Resource:
        for name, value in _HEADERS.items():
            request.setHeader(name, value)
        if request.path.startswith(b"/static/"):
            # Pages of other origins may import the client as a module script.
            request.setHeader(b"access-control-allow-origin", b"*")
        return super().getResourceFor(request)

    def log(self, request) -> None:
        pass
