# -*- test-case-name: tests.test_api -*-
"""The server HTTP API: JSON over twisted.web on ``[api] listen`` (docs/api.md).

Backend services that hold a key from ``[api] keys`` (sent as
``Authorization: Bearer KEY``) publish to channels, notify watchers,
distribute events, disconnect sessions, and read what the node holds:

==========================  ======================================================
``POST /api/publish``       one channel's subscribers, on every node
``POST /api/broadcast``     several channels' subscribers, on every node
``POST /api/notify``        the watchers of a watchable (``state.notify_event``)
``POST /api/distribute``    ``state.distribute_event`` of one event
``POST /api/disconnect``    close sessions, on every node (close code 4006)
``GET /api/info``           this node, its peers and links, its counts
``GET /api/channels``       channels: subscribers here and in the cluster
``GET /api/history``        a history channel's latest events here
``GET /api/presence``       who is subscribed to a presence channel, cluster-wide
``GET /api/openapi.json``   :data:`OPENAPI`, the OpenAPI 3.1 document (no key)
==========================  ======================================================

Every answer is JSON; an error is ``{"error": {"code", "message"}}`` with
its HTTP status.  Keys are checked as Hello tokens are
(:class:`meshd.auth.TokenAuthenticator`: plain or ``sha256:`` digests,
compared in constant time); no key ever reaches a log line, and the site
writes no access-log line per request.  A request body longer than
``[api] max_body_size`` is not kept (413).
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional
from uuid import UUID

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.server import NOT_DONE_YET
from twisted.web.resource import Resource

from meshd.auth import TokenAuthenticator
from meshd.codec import EventType, Watchable
from meshd.constants import CLOSE_DISCONNECTED
from meshd.mesh.wire import Query, QueryKind

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.mesh.queries import Results

#: How long a call that asks the other nodes (``/api/channels``, ``/api/disconnect``) waits for their
#: answers, in seconds; nodes that have not answered by then are listed in ``missing``.
QUERY_TIMEOUT = 2.0
#: ``GET /api/history``: how many events without ``limit``, and the most with it.
HISTORY_DEFAULT_LIMIT = 100
HISTORY_LIMIT = 1000
#: The reason sent with close code 4006.
DISCONNECT_REASON = "disconnected by the server"
#: Event types by name, for the ``type`` field (an integer from 1024 up is an application's own).
EVENT_TYPES = {
    "NodeEvent": EventType.NodeEvent, "ClientEvent": EventType.ClientEvent, "ChannelEvent": EventType.ChannelEvent,
    "CacheEvent": EventType.CacheEvent, "ResourceEvent": EventType.ResourceEvent,
}
_REFUSED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


class ApiError(Exception):
    """An answer other than 200: HTTP ``status``, a machine ``code`` and a message naming the bad field."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", f"{field}: {message}")


def _missing(field: str) -> ApiError:
    return ApiError(400, "missing_field", f"{field}: required")


# -- the request: a body kept up to a bound ---------------------------------------


class ApiRequest(server.Request):
    """A request whose body is kept only up to the site's ``max_body_size``; past it, :attr:`too_large`."""

    too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        bound = self.channel.site.max_body_size if self.channel.site is not None else 0
        if length is not None and length > bound:
            self.too_large = True
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        if self.content.tell() + len(data) > self.channel.site.max_body_size:
            self.too_large = True
            self.content = BytesIO()  # what was kept is let go: the answer is 413 whatever it says
            return
        self.content.write(data)


# -- fields -------------------------------------------------------------------------


def _text_ok(text: str) -> bool:
    if text.isascii():
        return text.isprintable()
    return not any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in text)


class Fields:
    """Checks of request fields against the node's limits; each raises :class:`ApiError` naming the field."""

    def __init__(self, app: "Application") -> None:
        self.config = app.config

    def object(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the request body must be a JSON object")
        return body

    def channel(self, value: Any, field: str = "channel") -> str:
        if not isinstance(value, str):
            raise _bad(field, "expected a string")
        limit = self.config.max_channel_length
        if not value:
            raise _bad(field, "the channel name is empty")
        if len(value.encode("utf-8")) > limit:
            raise _bad(field, f"channel names are at most {limit} bytes")
        if not _text_ok(value):
            raise _bad(field, "channel names may not hold control or format characters")
        return value

    def watchable(self, value: Any, field: str = "watchable") -> Watchable:
        if not isinstance(value, dict):
            raise _bad(field, 'expected an object {"kind": ..., "id": ...}')
        parts = []
        limit = self.config.max_watchable_length
        for part in ("kind", "id"):
            name = f"{field}.{part}"
            if part not in value:
                raise _missing(name)
            text = value[part]
            if not isinstance(text, str) or not text:
                raise _bad(name, "expected a non-empty string")
            if len(text.encode("utf-8")) > limit:
                raise _bad(name, f"at most {limit} bytes")
            if not _text_ok(text):
                raise _bad(name, "may not hold control or format characters")
            parts.append(text)
        unknown = sorted(set(value) - {"kind", "id"})
        if unknown:
            raise _bad(f"{field}.{unknown[0]}", "unknown field")
        if "/" in parts[0]:
            raise _bad(f"{field}.kind", "may not hold a slash")
        return Watchable(parts[0], parts[1])

    def data(self, body: dict) -> bytes:
        """``data``: a string (sent as UTF-8) or ``{"b64": "..."}``; at most ``websocket.max_message_size`` bytes."""
        if "data" not in body:
            raise _missing("data")
        value = body["data"]
        if isinstance(value, str):
            try:
                payload = value.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad("data", "not valid Unicode (a lone surrogate)") from None
        elif isinstance(value, dict) and set(value) == {"b64"}:
            if not isinstance(value["b64"], str):
                raise _bad("data.b64", "expected a base64 string")
            try:
                payload = base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise _bad("data.b64", "not valid base64") from None
        else:
            raise _bad("data", 'expected a string or {"b64": "..."}')
        limit = self.config.max_message_size
        if len(payload) > limit:
            raise ApiError(
                413, "data_too_large", f"data: {len(payload)} bytes, over websocket.max_message_size ({limit})"
            )
        return payload

    def event_type(self, body: dict, default: int) -> int:
        if "type" not in body:
            return default
        value = body["type"]
        if isinstance(value, str):
            if value not in EVENT_TYPES:
                raise _bad("type", f"expected one of {', '.join(EVENT_TYPES)} or an integer 1024..65535")
            return EVENT_TYPES[value]
        if isinstance(value, bool) or not isinstance(value, int) or not (
            value in EVENT_TYPES.values() or EventType.UserFirst <= value <= 0xFFFF
        ):
            raise _bad("type", f"expected one of {', '.join(EVENT_TYPES)} or an integer 1024..65535")
        return value

    def only(self, body: dict, allowed: tuple[str, ...]) -> None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise _bad(unknown[0], f"unknown field (known: {', '.join(allowed)})")


# -- resources ----------------------------------------------------------------------


class Endpoint(Resource):
    """One API path: its handlers by method, the key check, the body, and the JSON answer."""

    isLeaf = True
    log = Logger()

    def __init__(self, api: "Api", handlers: Mapping[bytes, Callable[..., dict]], *, public: bool = False,
                 query: bool = False) -> None:
        super().__init__()
        self.api = api
        self.handlers = handlers
        self.public = public
        #: GET handlers that take the query string's arguments (``request.args``).
        self.query = query

    def render(self, request) -> bytes:
        try:
            if not self.public:
                self.api.authorize(request)
            handler = self.handlers.get(request.method)
            if handler is None:
                allowed = b", ".join(sorted(self.handlers))
                request.setHeader(b"allow", allowed)
                raise ApiError(405, "method_not_allowed",
                               f"{request.method.decode('ascii', 'replace')} is not allowed here (allowed: "
                               f"{allowed.decode('ascii')})")
            if request.method == b"POST":
                answer = handler(self.api.fields.object(self.api.body(request)))
            else:
                answer = handler(request.args) if self.query else handler()
        except ApiError as e:
            return error(request, e)
        except Exception:
            return self._failed(request, Failure())
        if isinstance(answer, Deferred):  # it waits for the other nodes
            gone: list = []
            request.notifyFinish().addErrback(gone.append)  # the caller hung up: nothing to write to

            def write(body: bytes) -> None:
                if not gone:
                    request.write(body)
                    request.finish()

            answer.addCallback(lambda result: _json(request, 200, result))
            answer.addErrback(lambda failure: self._failed(request, failure))
            answer.addCallback(write)
            return NOT_DONE_YET
        return _json(request, 200, answer)

    def _failed(self, request, failure: Failure) -> bytes:
        self.log.failure("The API failed to answer {method} {path}", failure, method=request.method,
                         path=request.path)
        return error(request, ApiError(500, "internal_error", "the node failed to answer this request"))


class NotFound(Resource):
    """Any other path: 404 (401 first without a valid key, so that paths are not probed)."""

    isLeaf = True

    def __init__(self, api: "Api") -> None:
        super().__init__()
        self.api = api

    def render(self, request) -> bytes:
        try:
            self.api.authorize(request)
        except ApiError as e:
            return error(request, e)
        path = request.path.decode("utf-8", "replace")
        return error(request, ApiError(404, "not_found", f"path: no such endpoint {path!r} (see /api/openapi.json)"))


class Root(Resource):
    """``/``: only ``/api/...`` exists; every other path is :class:`NotFound`."""

    def __init__(self, api: "Api") -> None:
        super().__init__()
        self.api = api
        self.not_found = NotFound(api)
        self.endpoints = {
            b"publish": Endpoint(api, {b"POST": api.publish}),
            b"broadcast": Endpoint(api, {b"POST": api.broadcast}),
            b"notify": Endpoint(api, {b"POST": api.notify}),
            b"distribute": Endpoint(api, {b"POST": api.distribute}),
            b"disconnect": Endpoint(api, {b"POST": api.disconnect}),
            b"info": Endpoint(api, {b"GET": api.info}),
            b"channels": Endpoint(api, {b"GET": api.channels}),
            b"history": Endpoint(api, {b"GET": api.history}, query=True),
            b"presence": Endpoint(api, {b"GET": api.presence}, query=True),
            b"openapi.json": Endpoint(api, {b"GET": lambda: OPENAPI}, public=True),
        }

    def getChild(self, path: bytes, request) -> Resource:
        if path == b"api" and len(request.postpath) == 1:
            endpoint = self.endpoints.get(request.postpath[0])
            if endpoint is not None:
                request.prepath.append(request.postpath.pop(0))
                return endpoint
        return self.not_found

    def render(self, request) -> bytes:
        return self.not_found.render(request)


class Api:
    """The handlers: each takes the request's JSON object (POST) or nothing (GET) and returns the answer."""

    def __init__(self, app: "Application", keys: Mapping[str, str], started: Optional[float] = None) -> None:
        self.app = app
        self.state = app.state
        self.fields = Fields(app)
        #: Checks the keys (``[api] keys``); a reload replaces it (see ``Application.serve_api``).
        self.keys = TokenAuthenticator(keys)
        #: When this API started serving, in the node clock's seconds (``uptime`` counts from it).
        self.started = started if started is not None else app.clock.seconds()

    # -- the request ----------------------------------------------------------------

    def authorize(self, request) -> str:
        """The name of the key the request carries; raise 401 without a valid one."""
        raw = request.getHeader(b"authorization")
        header = raw.decode("utf-8", "replace") if raw is not None else ""
        scheme, _, key = header.partition(" ")
        key = key.strip()
        name = self.keys.authenticate(key) if scheme.lower() == "bearer" and key else None
        if name is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="meshd"')
            raise ApiError(401, "unauthorized",
                           "Authorization: send 'Bearer KEY' with a key from [api] keys" if not header
                           else "Authorization: the key is not one of [api] keys")
        return name

    def body(self, request) -> Any:
        if getattr(request, "too_large", False):
            # The rest of a long body is not worth reading: close once answered.
            request.setHeader(b"connection", b"close")
            channel = request.channel
            request.notifyFinish().addBoth(lambda _: channel.loseConnection())
            raise ApiError(413, "body_too_large",
                           f"body: over [api] max_body_size ({request.channel.site.max_body_size} bytes)")
        raw = request.content.getvalue() if request.content is not None else b""
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, "bad_json", f"body: not valid JSON ({e})") from None

    # -- the endpoints --------------------------------------------------------------

    def publish(self, body: dict) -> dict:
        f = self.fields
        f.only(body, ("channel", "data"))
        if "channel" not in body:
            raise _missing("channel")
        channel = f.channel(body["channel"])
        data = f.data(body)
        return {"delivered": self.state.clients.broadcast_to_channel(None, channel, data)}

    def broadcast(self, body: dict) -> dict:
        f = self.fields
        f.only(body, ("channels", "data"))
        if "channels" not in body:
            raise _missing("channels")
        names = body["channels"]
        if not isinstance(names, list) or not names:
            raise _bad("channels", "expected a non-empty list of channel names")
        channels = list(dict.fromkeys(f.channel(name, f"channels[{i}]") for i, name in enumerate(names)))
        data = f.data(body)
        each = {channel: self.state.clients.broadcast_to_channel(None, channel, data) for channel in channels}
        return {"delivered": sum(each.values()), "channels": each}

    def notify(self, body: dict) -> dict:
        f = self.fields
        f.only(body, ("watchable", "data", "type"))
        if "watchable" not in body:
            raise _missing("watchable")
        watchable = f.watchable(body["watchable"])
        data = f.data(body)
        kind = f.event_type(body, EventType.ResourceEvent)
        return {"delivered": self.state.notify_event(kind, watchable, payload=data)}

    def distribute(self, body: dict) -> dict:
        f = self.fields
        f.only(body, ("channel", "watchable", "data", "type"))
        channel = f.channel(body["channel"]) if "channel" in body else None
        watchable = f.watchable(body["watchable"]) if "watchable" in body else None
        data = f.data(body)
        default = (EventType.ResourceEvent if watchable is not None
                   else EventType.ChannelEvent if channel is not None else EventType.NodeEvent)
        kind = f.event_type(body, default)
        event = self.state.event(kind, channel=channel, watchable=watchable, payload=data)
        return {"delivered": self.state.distribute_event(event)}

    def disconnect(self, body: dict) -> "Deferred[dict]":
        """Close the sessions with that id, or of that principal, on this node and every other."""
        self.fields.only(body, ("session", "principal"))
        given = [k for k in ("session", "principal") if k in body]
        if len(given) != 1:
            if not given:
                raise ApiError(400, "missing_field", "session or principal: required (one of them)")
            raise _bad("principal", "give session or principal, not both")
        session_id = principal = None
        if given[0] == "session":
            value = body["session"]
            try:
                session_id = UUID(value) if isinstance(value, str) else None
            except ValueError:
                session_id = None
            if session_id is None:
                raise _bad("session", "expected a session id (a UUID)")
        else:
            principal = body["principal"]
            if not isinstance(principal, str) or not principal:
                raise _bad("principal", "expected a non-empty string")
        closed = self.app.disconnect(principal=principal, session=session_id,
                                     code=CLOSE_DISCONNECTED, reason=DISCONNECT_REASON)
        if session_id is not None and closed:
            return succeed({"disconnected": 1, "sessions": [str(session_id)], "missing": []})  # ids are unique
        query = Query(kind=QueryKind.Disconnect, principal=principal, session=session_id,
                      code=CLOSE_DISCONNECTED, reason=DISCONNECT_REASON)

        def gathered(results: "Results | None") -> dict:
            ids = [str(s) for s in closed]
            if results is not None:
                ids += [str(s) for answers in results.answers.values() for a in answers for s in a.closed]
            return {"disconnected": len(ids), "sessions": ids, "missing": _missing_nodes(results)}

        return self._ask(query).addCallback(gathered)

    def _ask(self, query: "Query") -> "Deferred[Results | None]":
        """Ask the other nodes ``query`` (None at once without a mesh)."""
        mesh = self.app.mesh
        if mesh is None:
            return succeed(None)
        return mesh.ask(query, QUERY_TIMEOUT)

    def info(self) -> dict:
        return node_info(self.app, self.started)

    def presence(self, args: "dict[bytes, list[bytes]]") -> "Deferred[dict]":
        """Who is subscribed to a presence channel, on every node that answers."""
        values = _query(args, ("channel",))
        channel = self.fields.channel(values["channel"][-1])
        presence = self.app.presence
        if presence is None or presence.options(channel) is None:
            raise _bad("channel", "this channel has no presence ([[channels]] presence)")

        def listed(found) -> dict:
            entries, missing = found
            return {"channel": channel, "missing": [str(n) for n in missing], "sessions": [
                {"session": str(e.session), "node": str(e.node), "principal": e.principal, "info": e.info}
                for e in entries]}

        return presence.cluster(channel).addCallback(listed)

    def history(self, args: "dict[bytes, list[bytes]]") -> dict:
        """A history channel's events as this node keeps them: the latest ``limit`` (default 100)."""
        f = self.fields
        values = _query(args, ("channel", "limit"))
        channel = f.channel(values["channel"][-1])
        limit = HISTORY_DEFAULT_LIMIT
        if "limit" in values:
            text = values["limit"][-1]
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= HISTORY_LIMIT:
                raise _bad("limit", f"expected an integer from 1 to {HISTORY_LIMIT}")
            limit = int(text)
        history = self.app.history
        if history is None or history.options(channel) is None:
            raise _bad("channel", "this channel keeps no history ([[channels]] history_size)")
        entries, _, cut = history.read(channel, limit)
        return {"channel": channel, "events": [_event_json(e) for e in entries],
                "positions": [_position_json(p) for p in cut]}

    def channels(self) -> "Deferred[dict]":
        def counted(results: "Results | None") -> dict:
            answer = channel_counts(self.app)
            remote: dict[str, int] = {}
            if results is not None:
                for answers in results.answers.values():
                    for a in answers:
                        for count in a.channels:
                            remote[count.channel] = remote.get(count.channel, 0) + count.subscribers
            for row in answer["channels"]:
                row["cluster_subscribers"] = row["subscribers"] + remote.pop(row["channel"], 0)
            answer["missing"] = _missing_nodes(results)
            return answer

        return self._ask(Query(kind=QueryKind.Stats)).addCallback(counted)


def node_info(app: "Application", started: float) -> dict:
    """This node, its peers and links, and its counts (``GET /api/info``)."""
    from meshd import __version__

    registry = app.registry
    answer: dict = {
        "node": {
            "id": str(app.node_id),
            "name": app.config.node_name,
            "version": __version__,
            "uptime": max(0.0, app.clock.seconds() - started),
        },
        "sessions": len(registry.sessions),
        "members": len(registry.members),
        "channels": len(registry.channels),
        "mesh": None,
        "worker": None,
    }
    siblings = app.siblings
    if siblings is not None:
        answer["worker"] = {"index": siblings.index, "count": siblings.count, "host": str(siblings.host)}
    mesh = app.mesh
    if mesh is not None:
        answer["mesh"] = {
            "cluster": mesh.settings.cluster,
            "advertise": mesh.advertise,
            "peers": [
                {
                    "id": str(peer.node),
                    "name": peer.name,
                    "address": peer.address,
                    "link": peer.link.state if peer.link is not None else None,
                    "linked_once": peer.linked,
                }
                for peer in sorted(mesh.peers.values(), key=lambda p: str(p.node))
            ],
            "links": sorted(
                ({"peer": str(link.remote.node) if link.remote is not None else None,
                  "dialed": link.dialed, "state": link.state} for link in mesh.links),
                key=lambda link: (link["peer"] or "", link["state"]),
            ),
        }
    return answer

def channel_counts(app: "Application") -> dict:
    """Channels with local subscribers and the peers with interest in them (``GET /api/channels``)."""
    node = str(app.node_id)
    local = {name: len(members) for name, members in app.registry.channels.items()}
    interested: dict[str, list[str]] = {}
    mesh = app.mesh
    if mesh is not None:
        for peer in mesh.peers.values():
            for name in peer.interests:
                interested.setdefault(name, []).append(str(peer.node))
    rows = []
    for name in sorted(set(local) | set(interested)):
        peers = sorted(interested.get(name, ()))
        rows.append({
            "channel": name,
            "subscribers": local.get(name, 0),
            "peers": peers,
            "cluster": sorted(([node] if name in local else []) + peers),
        })
    return {"node": node, "channels": rows}


class ApiSite(server.Site):
    """The API listener's site: :class:`ApiRequest` bodies, and no access-log line per request."""

    requestFactory = ApiRequest

    def __init__(self, app: "Application", keys: Mapping[str, str], *, max_body_size: int = 1 << 20) -> None:
        self.max_body_size = max_body_size
        self.api = Api(app, keys)
        super().__init__(Root(self.api))

    def startFactory(self) -> None:
        super().startFactory()
        self.api.started = self.api.app.clock.seconds()

    def log(self, request) -> None:
        pass  # an access log would name the paths and addresses of every call; keys are never logged either way

    def logPrefix(self) -> str:
        return "ApiSite"


def _query(args: "dict[bytes, list[bytes]]", known: "tuple[str, ...]") -> "dict[str, list[str]]":
    """A query string's parameters; 400 naming an unknown one, or a missing ``channel``."""
    values = {k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs] for k, vs in args.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise _bad(unknown[0], f"unknown parameter (known: {', '.join(known)})")
    if "channel" not in values:
        raise _missing("channel")
    return values


def _event_json(entry) -> dict:
    """A kept event as the API shows it."""
    from meshd.codec import decode, event_type_name

    event = decode(entry.frame)
    payload = event.payload or b""
    try:
        data: Any = payload.decode("utf-8")
    except UnicodeDecodeError:
        data = {"b64": base64.b64encode(payload).decode("ascii")}
    return {"type": event_type_name(event.event_type) if event.event_type < 1024 else event.event_type,
            "data": data, "session": str(event.session) if event.session is not None else None,
            **_position_json(entry.position)}


def _position_json(position) -> dict:
    return {"node": str(position.node), "epoch": position.epoch, "seq": position.seq}


def _missing_nodes(results: "Results | None") -> list[str]:
    return [str(node) for node in results.missing] if results is not None else []


def error(request, e: ApiError) -> bytes:
    return _json(request, e.status, {"error": {"code": e.code, "message": e.message}})


def _json(request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


# -- the OpenAPI document --------------------------------------------------------------


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _answers(ok: Optional[str], *errors: int) -> dict:
    text = {400: "A bad JSON body or field (the message names it).", 401: "No key, or not one of [api] keys.",
            405: "Another method.", 413: "The body is over [api] max_body_size, or data over "
            "websocket.max_message_size."}
    answers: dict = {}
    if ok is not None:
        answers["200"] = {"description": "Done.", "content": {"application/json": {"schema": _ref(ok)}}}
    for status in errors:
        answers[str(status)] = {"description": text[status],
                                "content": {"application/json": {"schema": _ref("Error")}}}
    return answers


def _post(summary: str, request: str, ok: str) -> dict:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": _answers(ok, 400, 401, 405, 413),
    }}


def _get(summary: str, ok: str, *, public: bool = False) -> dict:
    operation = {"summary": summary, "responses": _answers(ok, 405) if public else _answers(ok, 401, 405)}
    if public:
        operation["security"] = []
    return {"get": operation}


_CHANNEL = {"type": "string", "minLength": 1}
_UUID = {"type": "string", "format": "uuid"}
_COUNT = {"type": "integer", "minimum": 0}
_MISSING = {"type": "array", "items": _UUID, "description": (
    "Other nodes whose part is not in the answer: not linked now, too old to be asked, or silent for 2 s.")}

#: The OpenAPI 3.1 document of this API, served at ``GET /api/openapi.json``.
OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {
        "title": "meshd server HTTP API",
        "version": "1",
        "description": "Publish, notify, distribute and disconnect from backend services; see docs/api.md.",
    },
    "components": {
        "securitySchemes": {"key": {"type": "http", "scheme": "bearer", "description": "A key from [api] keys."}},
        "schemas": {
            "Error": {
                "type": "object", "required": ["error"], "additionalProperties": False,
                "properties": {"error": {
                    "type": "object", "required": ["code", "message"], "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "enum": [
                            "bad_json", "missing_field", "invalid_field", "unauthorized", "not_found",
                            "method_not_allowed", "body_too_large", "data_too_large", "internal_error"]},
                        "message": {"type": "string"},
                    },
                }},
            },
            "Data": {
                "description": "The payload: a string (sent as its UTF-8 bytes) or base64 bytes.",
                "oneOf": [
                    {"type": "string"},
                    {"type": "object", "required": ["b64"], "additionalProperties": False,
                     "properties": {"b64": {"type": "string", "contentEncoding": "base64"}}},
                ],
            },
            "Watchable": {
                "type": "object", "required": ["kind", "id"], "additionalProperties": False,
                "properties": {"kind": {"type": "string", "minLength": 1, "pattern": "^[^/]*$"},
                               "id": {"type": "string", "minLength": 1}},
            },
            "EventType": {
                "description": "A built-in event type by name, or an application's own from 1024 up.",
                "oneOf": [
                    {"type": "string", "enum": list(EVENT_TYPES)},
                    {"type": "integer", "enum": sorted(EVENT_TYPES.values())},
                    {"type": "integer", "minimum": 1024, "maximum": 65535},
                ],
            },
            "Publish": {
                "type": "object", "required": ["channel", "data"], "additionalProperties": False,
                "properties": {"channel": _CHANNEL, "data": _ref("Data")},
            },
            "Broadcast": {
                "type": "object", "required": ["channels", "data"], "additionalProperties": False,
                "properties": {"channels": {"type": "array", "minItems": 1, "items": _CHANNEL}, "data": _ref("Data")},
            },
            "Notify": {
                "type": "object", "required": ["watchable", "data"], "additionalProperties": False,
                "properties": {"watchable": _ref("Watchable"), "data": _ref("Data"), "type": _ref("EventType")},
            },
            "Distribute": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"channel": _CHANNEL, "watchable": _ref("Watchable"), "data": _ref("Data"),
                               "type": _ref("EventType")},
            },
            "Disconnect": {
                "oneOf": [
                    {"type": "object", "required": ["session"], "additionalProperties": False,
                     "properties": {"session": _UUID}},
                    {"type": "object", "required": ["principal"], "additionalProperties": False,
                     "properties": {"principal": {"type": "string", "minLength": 1}}},
                ],
            },
            "Delivered": {
                "type": "object", "required": ["delivered"], "additionalProperties": False,
                "properties": {"delivered": {**_COUNT, "description": "Sessions reached on this node."}},
            },
            "BroadcastDelivered": {
                "type": "object", "required": ["delivered", "channels"], "additionalProperties": False,
                "properties": {"delivered": _COUNT,
                               "channels": {"type": "object", "additionalProperties": _COUNT}},
            },
            "Disconnected": {
                "type": "object", "required": ["disconnected", "sessions", "missing"], "additionalProperties": False,
                "properties": {
                    "disconnected": {**_COUNT, "description": "Sessions closed, on this node and the others."},
                    "sessions": {"type": "array", "items": _UUID, "description": "The ids of those sessions."},
                    "missing": _MISSING,
                },
            },
            "Info": {
                "type": "object", "additionalProperties": False,
                "required": ["node", "sessions", "members", "channels", "mesh", "worker"],
                "properties": {
                    "node": {
                        "type": "object", "required": ["id", "name", "version", "uptime"],
                        "additionalProperties": False,
                        "properties": {"id": _UUID, "name": {"type": "string"}, "version": {"type": "string"},
                                       "uptime": {"type": "number", "minimum": 0}},
                    },
                    "sessions": _COUNT, "members": _COUNT, "channels": _COUNT,
                    "worker": {"oneOf": [{"type": "null"}, {
                        "type": "object", "required": ["index", "count", "host"], "additionalProperties": False,
                        "properties": {"index": _COUNT, "count": _COUNT, "host": _UUID},
                    }]},
                    "mesh": {"oneOf": [{"type": "null"}, {
                        "type": "object", "required": ["cluster", "advertise", "peers", "links"],
                        "additionalProperties": False,
                        "properties": {
                            "cluster": {"type": "string"}, "advertise": {"type": "string"},
                            "peers": {"type": "array", "items": {
                                "type": "object", "required": ["id", "name", "address", "link", "linked_once"],
                                "additionalProperties": False,
                                "properties": {"id": _UUID, "name": {"type": "string"},
                                               "address": {"type": ["string", "null"]},
                                               "link": {"type": ["string", "null"]},
                                               "linked_once": {"type": "boolean"}}}},
                            "links": {"type": "array", "items": {
                                "type": "object", "required": ["peer", "dialed", "state"],
                                "additionalProperties": False,
                                "properties": {"peer": {"oneOf": [_UUID, {"type": "null"}]},
                                               "dialed": {"type": "boolean"}, "state": {"type": "string"}}}},
                        },
                    }]},
                },
            },
            "Channels": {
                "type": "object", "required": ["node", "channels", "missing"], "additionalProperties": False,
                "properties": {
                    "node": _UUID,
                    "missing": _MISSING,
                    "channels": {"type": "array", "items": {
                        "type": "object",
                        "required": ["channel", "subscribers", "cluster_subscribers", "peers", "cluster"],
                        "additionalProperties": False,
                        "properties": {
                            "channel": {"type": "string"},
                            "subscribers": {**_COUNT, "description": "Subscribers on this node."},
                            "cluster_subscribers": {**_COUNT, "description": (
                                "Subscribers on this node and on every node that answered (see missing).")},
                            "peers": {"type": "array", "items": _UUID,
                                      "description": "Other nodes with subscribers, from the interest they gossip."},
                            "cluster": {"type": "array", "items": _UUID,
                                        "description": "Every node with subscribers, this one included."},
                        },
                    }},
                },
            },
            "Position": {
                "type": "object", "required": ["node", "epoch", "seq"], "additionalProperties": False,
                "properties": {"node": _UUID, "epoch": _COUNT, "seq": _COUNT},
            },
            "History": {
                "type": "object", "required": ["channel", "events", "positions"], "additionalProperties": False,
                "properties": {
                    "channel": _CHANNEL,
                    "events": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False,
                        "required": ["type", "data", "session", "node", "epoch", "seq"],
                        "properties": {
                            "type": _ref("EventType"), "data": _ref("Data"),
                            "session": {"oneOf": [_UUID, {"type": "null"}]},
                            "node": _UUID, "epoch": _COUNT, "seq": _COUNT,
                        },
                    }},
                    "positions": {"type": "array", "items": _ref("Position"),
                                  "description": "Where the channel is now on this node (protocol.md)."},
                },
            },
            "Presence": {
                "type": "object", "required": ["channel", "sessions", "missing"], "additionalProperties": False,
                "properties": {
                    "channel": _CHANNEL,
                    "missing": _MISSING,
                    "sessions": {"type": "array", "items": {
                        "type": "object", "required": ["session", "node", "principal", "info"],
                        "additionalProperties": False,
                        "properties": {"session": _UUID, "node": _UUID,
                                       "principal": {"type": ["string", "null"]},
                                       "info": {"type": ["string", "null"]}},
                    }},
                },
            },
            "OpenAPI": {"type": "object", "required": ["openapi", "paths"]},
        },
    },
    "security": [{"key": []}],
    "paths": {
        "/api/publish": _post("Publish to a channel's subscribers on every node.", "Publish", "Delivered"),
        "/api/broadcast": _post("Publish one payload to several channels.", "Broadcast", "BroadcastDelivered"),
        "/api/notify": _post("Notify the watchers of a watchable (state.notify_event).", "Notify", "Delivered"),
        "/api/distribute": _post("Distribute an event to every node (state.distribute_event).", "Distribute",
                                 "Delivered"),
        "/api/disconnect": _post("Close sessions on every node (close code 4006).", "Disconnect", "Disconnected"),
        "/api/info": _get("This node, its peers and links, and its counts.", "Info"),
        "/api/channels": _get("Channels and their subscribers, here and in the cluster.", "Channels"),
        "/api/history": {"get": {
            **_get("A history channel's latest events, as this node keeps them.", "History")["get"],
            "parameters": [
                {"name": "channel", "in": "query", "required": True, "schema": _CHANNEL},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": HISTORY_LIMIT, "default": HISTORY_DEFAULT_LIMIT}},
            ],
            "responses": _answers("History", 400, 401, 405),
        }},
        "/api/presence": {"get": {
            **_get("Who is subscribed to a presence channel, on every node that answers.", "Presence")["get"],
            "parameters": [{"name": "channel", "in": "query", "required": True, "schema": _CHANNEL}],
            "responses": _answers("Presence", 400, 401, 405),
        }},
        "/api/openapi.json": _get("This document (no key needed).", "OpenAPI", public=True),
    },
}
