"""The server HTTP API: every call and its errors, events reaching clients, the OpenAPI document, the docs' curl examples."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from io import BytesIO
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from meshd.api import OPENAPI, ApiSite
from meshd.codec import EventType, Watchable
from meshd.config import ApiSettings, Config, ConfigError, parse
from meshd.permissions import Rule
from meshd.constants import CLOSE_DISCONNECTED

from .meshsupport import MeshTestCase
from .support import ROOT, env, payloads

API_DOC = ROOT / "docs" / "api.md"
KEY = "test-api-key-0123456789"
OTHER_KEY = "second-key-for-ops"
KEYS = {"backend": KEY, "ops": "sha256:" + hashlib.sha256(OTHER_KEY.encode()).hexdigest()}
TOKENS = {"alice": "alice-token", "bob": "bob-token"}
_EVERYONE = (Rule("*", anonymous=frozenset({"subscribe", "publish", "watch"})),)


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def check_against(document: dict, path: Optional[str], method: str, status: int, body: Any) -> None:
    """Raise unless ``body`` is what ``document`` says ``method path`` answers with ``status``.

    An unknown path (404, or 401 without a key) and a method the path does not have (405) are checked
    against the document's ``Error`` schema.
    """
    from jsonschema import Draft202012Validator

    if path is None or path not in document["paths"]:
        pointer = _pointer("components", "schemas", "Error")
        if status not in (401, 404):
            raise AssertionError(f"an unknown path answered {status}")
    elif method.lower() not in document["paths"][path]:
        pointer = _pointer("components", "schemas", "Error")
        if status not in (401, 405):
            raise AssertionError(f"{method} {path}, not in the document, answered {status}")
    else:
        responses = document["paths"][path][method.lower()]["responses"]
        if str(status) not in responses:
            raise AssertionError(f"{method} {path} answered {status}, not in the document ({', '.join(responses)})")
        pointer = _pointer("paths", path, method.lower(), "responses", str(status), "content", "application/json",
                           "schema")
    schema = {**document, "$ref": pointer}
    Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(body)


class _Chunked(FileBodyProducer):
    """A body sent chunked (no Content-Length)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(BytesIO(data))
        self.length = UNKNOWN_LENGTH


class ApiTestCase(MeshTestCase):
    """A node with its API on a loopback port; every answer is checked against the OpenAPI document."""

    async def start_api(self, config: Optional[Config] = None, *, app=None, max_body_size: int = 1 << 20) -> int:
        if app is None:
            app = await self.start_node(config or Config(tokens=TOKENS))
        site = ApiSite(app, KEYS, max_body_size=max_body_size)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.api_port = port.getHost().port
        return self.api_port

    async def call(self, method: str, path: str, body: Any = None, *, key: Optional[str] = KEY, raw: Optional[bytes] = None,
                   producer=None, port: Optional[int] = None, authorization: Optional[str] = None) -> tuple[int, Any, Any]:
        """``(status, JSON answer, headers)``, the answer checked against the OpenAPI document."""
        headers = Headers({b"content-type": [b"application/json"]})
        if authorization is not None:
            headers.addRawHeader(b"authorization", authorization.encode())
        elif key is not None:
            headers.addRawHeader(b"authorization", b"Bearer " + key.encode())
        if producer is None and (body is not None or raw is not None):
            producer = FileBodyProducer(BytesIO(raw if raw is not None else json.dumps(body).encode()))
        url = b"http://127.0.0.1:%d%s" % (port or self.api_port, path.encode())
        response = await Agent(reactor).request(method.encode(), url, headers, producer).addTimeout(10, reactor)
        text = await readBody(response).addTimeout(10, reactor)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"], text)
        answer = json.loads(text)
        route = path.partition("?")[0]
        check_against(OPENAPI, route if route in OPENAPI["paths"] else None, method, response.code, answer)
        return response.code, answer, response.headers

    async def error_of(self, status: int, code: str, method: str, path: str, body: Any = None, **kw) -> str:
        """Make the call, assert its status and error code; return the error's message."""
        got, answer, _ = await self.call(method, path, body, **kw)
        self.assertEqual((got, answer["error"]["code"]), (status, code), answer)
        return answer["error"]["message"]


class PublishTests(ApiTestCase):
    async def test_publish_reaches_the_channels_subscribers(self) -> None:
        """POST /api/publish reaches the channel's subscribers only, as a ChannelEvent from this node."""
        await self.start_api()
        a, b, c = await self.client(), await self.client(), await self.client()
        await a.subscribe("chat")
        await b.subscribe("chat")
        await c.subscribe("other")
        status, answer, _ = await self.call("POST", "/api/publish", {"channel": "chat", "data": "héllo"})
        self.assertEqual((status, answer), (200, {"delivered": 2}))
        await self.settle(a, b, c)
        for client in (a, b):
            self.assertEqual(payloads(client.received), ["héllo".encode()])
            event = client.received[0]
            self.assertEqual((event.event_type, event.channel, event.node), (EventType.ChannelEvent, "chat",
                                                                             self.app.node_id))
        self.assertEqual(c.received, [])

    async def test_publish_base64_data(self) -> None:
        """data {"b64": ...} is sent as the bytes it encodes."""
        await self.start_api()
        a = await self.client()
        await a.subscribe("bin")
        status, answer, _ = await self.call("POST", "/api/publish",
                                            {"channel": "bin", "data": {"b64": base64.b64encode(b"\x00\xff").decode()}})
        self.assertEqual((status, answer), (200, {"delivered": 1}))
        await self.settle(a)
        self.assertEqual(payloads(a.received), [b"\x00\xff"])

    async def test_publish_reaches_other_nodes(self) -> None:
        """A publish through one node's API reaches the subscribers on another node of the mesh."""
        first, second = await self.cluster_of(2)
        await self.start_api(app=first.app)
        far = await self.client_of(second)
        await far.subscribe("chat")
        await self.interest_settled([first, second], "chat", [second])
        status, answer, _ = await self.call("POST", "/api/publish", {"channel": "chat", "data": "across"})
        self.assertEqual((status, answer), (200, {"delivered": 0}))  # counts this node's sessions only
        await self.wait_for(lambda: payloads(far.received) == [b"across"], "the event on the other node", 10)

    async def test_broadcast_to_several_channels(self) -> None:
        """POST /api/broadcast reaches each listed channel's subscribers and counts them per channel."""
        await self.start_api()
        a, b = await self.client(), await self.client()
        await a.subscribe("chat")
        await a.subscribe("news")
        await b.subscribe("news")
        status, answer, _ = await self.call("POST", "/api/broadcast",
                                            {"channels": ["chat", "news", "chat", "empty"], "data": "all"})
        self.assertEqual((status, answer), (200, {"delivered": 3, "channels": {"chat": 1, "news": 2, "empty": 0}}))
        await self.settle(a, b)
        self.assertEqual(sorted(e.channel for e in a.received), ["chat", "news"])
        self.assertEqual([(e.channel, e.payload) for e in b.received], [("news", b"all")])


class NotifyAndDistributeTests(ApiTestCase):
    async def test_notify_reaches_watchers(self) -> None:
        """POST /api/notify reaches the watchers of the watchable with the given type, and nobody else."""
        await self.start_api()
        a, b = await self.client(), await self.client()
        await a.watch("document", "42")
        await b.watch("document", "7")
        status, answer, _ = await self.call("POST", "/api/notify", {
            "watchable": {"kind": "document", "id": "42"}, "data": "saved", "type": 1030})
        self.assertEqual((status, answer), (200, {"delivered": 1}))
        status, answer, _ = await self.call("POST", "/api/notify", {
            "watchable": {"kind": "document", "id": "42"}, "data": "again"})
        self.assertEqual(answer, {"delivered": 1})
        await self.settle(a, b)
        self.assertEqual([(e.event_type, e.watchable, e.payload) for e in a.received], [
            (1030, Watchable("document", "42"), b"saved"), (EventType.ResourceEvent, Watchable("document", "42"), b"again")])
        self.assertEqual(b.received, [])

    async def test_distribute_to_channel_and_watchers_once(self) -> None:
        """POST /api/distribute reaches a channel's subscribers and a watchable's watchers, each session once."""
        await self.start_api()
        both, sub, watcher, neither = [await self.client() for _ in range(4)]
        await both.subscribe("chat")
        await both.watch("document", "42")
        await sub.subscribe("chat")
        await watcher.watch("document", "42")
        status, answer, _ = await self.call("POST", "/api/distribute", {
            "channel": "chat", "watchable": {"kind": "document", "id": "42"}, "data": "x", "type": "CacheEvent"})
        self.assertEqual((status, answer), (200, {"delivered": 3}))
        await self.settle(both, sub, watcher, neither)
        for client in (both, sub, watcher):
            self.assertEqual([(e.event_type, e.payload) for e in client.received], [(EventType.CacheEvent, b"x")])
        self.assertEqual(neither.received, [])

    async def test_distribute_without_channel_or_watchable_reaches_everyone(self) -> None:
        """POST /api/distribute with only data reaches every welcomed session as a NodeEvent."""
        await self.start_api()
        clients = [await self.client() for _ in range(3)]
        status, answer, _ = await self.call("POST", "/api/distribute", {"data": {"b64": "AQI="}})
        self.assertEqual((status, answer), (200, {"delivered": 3}))
        await self.settle(*clients)
        for client in clients:
            self.assertEqual([(e.event_type, e.payload) for e in client.received], [(EventType.NodeEvent, b"\x01\x02")])


class DisconnectTests(ApiTestCase):
    async def test_disconnect_a_session(self) -> None:
        """POST /api/disconnect with a session id closes that session with 4006, and only it."""
        await self.start_api()
        a, b = await self.client("alice-token"), await self.client("alice-token")
        status, answer, _ = await self.call("POST", "/api/disconnect", {"session": str(a.session_id)})
        self.assertEqual((status, answer), (200, {"disconnected": 1, "sessions": [str(a.session_id)], "missing": []}))
        closed = await a.when_closed().addTimeout(10, reactor)
        self.assertEqual((closed.code, closed.reason), (CLOSE_DISCONNECTED, "disconnected by the server"))
        await self.settle(b)  # still open
        self.assertIsNone(b.closed_reason)

    async def test_disconnect_a_principal(self) -> None:
        """POST /api/disconnect with a principal closes every session of that principal on this node."""
        await self.start_api()
        a1, a2, bob = await self.client("alice-token"), await self.client("alice-token"), await self.client("bob-token")
        status, answer, _ = await self.call("POST", "/api/disconnect", {"principal": "alice"})
        self.assertEqual(status, 200)
        self.assertEqual((answer["disconnected"], sorted(answer["sessions"])),
                         (2, sorted([str(a1.session_id), str(a2.session_id)])))
        for client in (a1, a2):
            closed = await client.when_closed().addTimeout(10, reactor)
            self.assertEqual(closed.code, CLOSE_DISCONNECTED)
        await self.settle(bob)
        self.assertIsNone(bob.closed_reason)

    async def test_disconnect_nobody(self) -> None:
        """An unknown session or principal disconnects nothing and is not an error."""
        await self.start_api()
        for body in ({"session": "0b7d3c4e-5f01-4a2b-9c3d-8e7f6a5b4c3d"}, {"principal": "nobody"}):
            status, answer, _ = await self.call("POST", "/api/disconnect", body)
            self.assertEqual((status, answer), (200, {"disconnected": 0, "sessions": [], "missing": []}))

    async def test_disconnect_errors(self) -> None:
        """A bad session id, neither field or both are answered 400 naming the field."""
        await self.start_api()
        self.assertIn("session", await self.error_of(400, "invalid_field", "POST", "/api/disconnect",
                                                     {"session": "not-a-uuid"}))
        self.assertIn("session or principal", await self.error_of(400, "missing_field", "POST", "/api/disconnect", {}))
        self.assertIn("principal", await self.error_of(400, "invalid_field", "POST", "/api/disconnect",
                                                       {"session": "0b7d3c4e-5f01-4a2b-9c3d-8e7f6a5b4c3d",
                                                        "principal": "alice"}))


class ReadTests(ApiTestCase):
    async def test_info_without_mesh(self) -> None:
        """GET /api/info gives the node's id, name, version, uptime and counts; mesh is null without one."""
        from meshd import __version__

        await self.start_api(Config(tokens=TOKENS, node_name="edge-1"))
        a = await self.client()
        await a.subscribe("chat")
        await self.client(hello=False)
        status, answer, _ = await self.call("GET", "/api/info")
        self.assertEqual(status, 200)
        self.assertEqual(answer["node"]["id"], str(self.app.node_id))
        self.assertEqual((answer["node"]["name"], answer["node"]["version"]), ("edge-1", __version__))
        self.assertEqual((answer["sessions"], answer["members"], answer["channels"], answer["mesh"]), (2, 1, 1, None))

    async def test_info_and_channels_with_a_mesh(self) -> None:
        """With a mesh, /api/info lists the peers and their open links, /api/channels the peers with interest."""
        first, second = await self.cluster_of(2)
        await self.start_api(app=first.app)
        here, there = await self.client_of(first), await self.client_of(second)
        await here.subscribe("both")
        await here.subscribe("here")
        await there.subscribe("both")
        await there.subscribe("there")
        await self.interest_settled([first, second], "there", [second])
        await self.interest_settled([first, second], "both", [first, second])
        status, answer, _ = await self.call("GET", "/api/info")
        self.assertEqual(status, 200)
        peers = answer["mesh"]["peers"]
        self.assertEqual([(p["id"], p["name"], p["link"], p["linked_once"]) for p in peers],
                         [(str(second.app.node_id), "n1", "open", True)])
        self.assertEqual(answer["mesh"]["cluster"], "test")
        status, answer, _ = await self.call("GET", "/api/channels")
        self.assertEqual(status, 200)
        me, peer = str(first.app.node_id), str(second.app.node_id)
        self.assertEqual(answer, {"node": me, "missing": [], "channels": [
            {"channel": "both", "subscribers": 1, "cluster_subscribers": 2, "peers": [peer],
             "cluster": sorted([me, peer])},
            {"channel": "here", "subscribers": 1, "cluster_subscribers": 1, "peers": [], "cluster": [me]},
            {"channel": "there", "subscribers": 0, "cluster_subscribers": 1, "peers": [peer], "cluster": [peer]},
        ]})

    async def test_cluster_counts_and_missing_nodes(self) -> None:
        """/api/channels adds up the subscribers of every node that answers; a node that is away is
        listed as missing and its subscribers are not counted."""
        first, second, third = await self.cluster_of(3)
        await self.start_api(app=first.app)
        clients = [await self.client_of(node) for node in (first, second, second, third)]
        for client in clients:
            await client.subscribe("room")
        await self.interest_settled([first, second, third], "room", [first, second, third])
        status, answer, _ = await self.call("GET", "/api/channels")
        self.assertEqual(status, 200)
        self.assertEqual([(r["channel"], r["subscribers"], r["cluster_subscribers"]) for r in answer["channels"]],
                         [("room", 1, 4)])
        self.assertEqual(answer["missing"], [])
        await third.app.stopService()
        await self.wait_for(lambda: first.mesh.peers[third.app.node_id].link is None, "the link with the third to go")
        status, answer, _ = await self.call("GET", "/api/channels")
        self.assertEqual([(r["channel"], r["cluster_subscribers"]) for r in answer["channels"]], [("room", 3)])
        self.assertEqual(answer["missing"], [str(third.app.node_id)])

    async def test_disconnect_a_principal_everywhere(self) -> None:
        """POST /api/disconnect closes a principal's sessions on every node, and says which."""
        first = await self.start_mesh_node(self.settings(0), tokens=TOKENS)
        second = await self.start_mesh_node(self.settings(1, [first.address]), tokens=TOKENS)
        await self.wait_for(lambda: first.links() == second.links() == 1, "the link")
        await self.start_api(app=first.app)
        here = await self.client_of(first, "alice-token")
        there = [await self.client_of(second, "alice-token"), await self.client_of(second, "alice-token")]
        bob = await self.client_of(second, "bob-token")
        status, answer, _ = await self.call("POST", "/api/disconnect", {"principal": "alice"})
        self.assertEqual(status, 200)
        self.assertEqual(answer["disconnected"], 3)
        self.assertEqual(sorted(answer["sessions"]), sorted(str(c.session_id) for c in [here, *there]))
        self.assertEqual(answer["missing"], [])
        for client in (here, *there):
            closed = await client.when_closed().addTimeout(10, reactor)
            self.assertEqual(closed.code, CLOSE_DISCONNECTED)
        await self.settle(bob)
        self.assertIsNone(bob.closed_reason)
        status, answer, _ = await self.call("POST", "/api/disconnect", {"session": str(bob.session_id)})
        self.assertEqual((status, answer), (200, {"disconnected": 1, "sessions": [str(bob.session_id)], "missing": []}))
        closed = await bob.when_closed().addTimeout(10, reactor)
        self.assertEqual(closed.code, CLOSE_DISCONNECTED)

    async def test_channels_counts_local_subscribers(self) -> None:
        """GET /api/channels counts each channel's subscribers on this node."""
        await self.start_api()
        a, b = await self.client(), await self.client()
        await a.subscribe("x")
        await b.subscribe("x")
        await b.subscribe("y")
        status, answer, _ = await self.call("GET", "/api/channels")
        me = str(self.app.node_id)
        self.assertEqual((status, answer["channels"]), (200, [
            {"channel": "x", "subscribers": 2, "cluster_subscribers": 2, "peers": [], "cluster": [me]},
            {"channel": "y", "subscribers": 1, "cluster_subscribers": 1, "peers": [], "cluster": [me]}]))

    async def test_history(self) -> None:
        """GET /api/history gives a history channel's latest events with their positions; errors name the field."""
        from meshd.channels import ChannelOptions

        await self.start_api(Config(source=Path("test.toml"), tokens=TOKENS, rules=_EVERYONE,
                                    channels=(ChannelOptions("chat.*", history_size=10),)))
        client = await self.client()
        for data in (b"one", b"\xff\x00"):
            await client.publish("chat.a", data)
        status, answer, _ = await self.call("GET", "/api/history?channel=chat.a&limit=5")
        self.assertEqual(status, 200)
        self.assertEqual([e["data"] for e in answer["events"]], ["one", {"b64": "/wA="}])
        node = str(self.app.node_id)
        self.assertEqual({e["node"] for e in answer["events"]}, {node})
        self.assertEqual([p["node"] for p in answer["positions"]], [node])
        self.assertEqual(answer["positions"][0]["seq"], answer["events"][-1]["seq"])
        status, answer, _ = await self.call("GET", "/api/history?channel=chat.a&limit=1")
        self.assertEqual([e["data"] for e in answer["events"]], [{"b64": "/wA="}])
        self.assertIn("no history", await self.error_of(400, "invalid_field", "GET", "/api/history?channel=plain"))
        self.assertIn("limit", await self.error_of(400, "invalid_field", "GET", "/api/history?channel=chat.a&limit=0"))
        self.assertIn("channel", await self.error_of(400, "missing_field", "GET", "/api/history"))
        self.assertIn("since", await self.error_of(400, "invalid_field", "GET", "/api/history?channel=chat.a&since=1"))

    async def test_presence(self) -> None:
        """GET /api/presence lists a presence channel's sessions; a channel without presence is a 400."""
        from meshd.channels import ChannelOptions

        await self.start_api(Config(source=Path("test.toml"), tokens=TOKENS, rules=_EVERYONE,
                                    channels=(ChannelOptions("room.*", presence=True),)))
        alice, anonymous = await self.client("alice-token"), await self.client()
        for client in (alice, anonymous):
            await client.subscribe("room.1")
        status, answer, _ = await self.call("GET", "/api/presence?channel=room.1")
        self.assertEqual(status, 200)
        self.assertEqual(sorted((s["session"], s["principal"]) for s in answer["sessions"]),
                         sorted([(str(alice.session_id), "alice"), (str(anonymous.session_id), None)]))
        self.assertEqual(answer["missing"], [])
        self.assertIn("no presence", await self.error_of(400, "invalid_field", "GET", "/api/presence?channel=x"))
        self.assertIn("channel", await self.error_of(400, "missing_field", "GET", "/api/presence"))

    async def test_openapi_document(self) -> None:
        """GET /api/openapi.json needs no key and is a valid OpenAPI 3.1 document naming every endpoint."""
        from openapi_spec_validator import validate

        await self.start_api()
        status, document, _ = await self.call("GET", "/api/openapi.json", key=None)
        self.assertEqual(status, 200)
        validate(document)
        self.assertEqual(document["openapi"], "3.1.0")
        self.assertEqual(sorted(document["paths"]), sorted(
            f"/api/{name}" for name in ("publish", "broadcast", "notify", "distribute", "disconnect", "info",
                                        "channels", "history", "presence", "openapi.json")))
        self.assertEqual(document, json.loads(json.dumps(OPENAPI)))


class ErrorTests(ApiTestCase):
    async def test_no_key_and_bad_key(self) -> None:
        """No key, a wrong key, or another scheme is 401 with WWW-Authenticate; a sha256: key is accepted."""
        await self.start_api()
        for kw in ({"key": None}, {"key": "wrong"}, {"authorization": f"Basic {KEY}"}, {"authorization": "Bearer"}):
            status, answer, headers = await self.call("POST", "/api/publish", {"channel": "c", "data": "d"}, **kw)
            self.assertEqual((status, answer["error"]["code"]), (401, "unauthorized"), kw)
            self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="meshd"'])
            self.assertNotIn(KEY, answer["error"]["message"])
        status, _, _ = await self.call("GET", "/api/info", key=OTHER_KEY)
        self.assertEqual(status, 200)
        self.assertEqual(await self.error_of(401, "unauthorized", "GET", "/api/info", key=KEYS["ops"]),
                         "Authorization: the key is not one of [api] keys")  # the digest is not the key

    async def test_bad_json(self) -> None:
        """A body that is not JSON, or not a JSON object, is 400 bad_json."""
        await self.start_api()
        for raw in (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'):
            message = await self.error_of(400, "bad_json", "POST", "/api/publish", raw=raw)
            self.assertTrue(message.startswith(("body:", "the request body")), message)

    async def test_missing_fields_are_named(self) -> None:
        """Each endpoint names its missing required field."""
        await self.start_api()
        for path, body, field in [
            ("/api/publish", {"data": "d"}, "channel"),
            ("/api/publish", {"channel": "c"}, "data"),
            ("/api/broadcast", {"data": "d"}, "channels"),
            ("/api/notify", {"data": "d"}, "watchable"),
            ("/api/notify", {"watchable": {"kind": "k"}, "data": "d"}, "watchable.id"),
            ("/api/distribute", {"channel": "c"}, "data"),
        ]:
            message = await self.error_of(400, "missing_field", "POST", path, body)
            self.assertEqual(message, f"{field}: required", path)

    async def test_invalid_fields_are_named(self) -> None:
        """Wrong types, bad values and unknown fields are 400 naming the field."""
        await self.start_api(Config(tokens=TOKENS, max_channel_length=8))
        for path, body, field in [
            ("/api/publish", {"channel": 5, "data": "d"}, "channel"),
            ("/api/publish", {"channel": "", "data": "d"}, "channel"),
            ("/api/publish", {"channel": "much-too-long", "data": "d"}, "channel"),
            ("/api/publish", {"channel": "a\nb", "data": "d"}, "channel"),
            ("/api/publish", {"channel": "c", "data": 5}, "data"),
            ("/api/publish", {"channel": "c", "data": {"b64": "!!"}}, "data.b64"),
            ("/api/publish", {"channel": "c", "data": "d", "extra": 1}, "extra"),
            ("/api/broadcast", {"channels": [], "data": "d"}, "channels"),
            ("/api/broadcast", {"channels": ["ok", 3], "data": "d"}, "channels[1]"),
            ("/api/notify", {"watchable": {"kind": "a/b", "id": "1"}, "data": "d"}, "watchable.kind"),
            ("/api/notify", {"watchable": "doc/1", "data": "d"}, "watchable"),
            ("/api/notify", {"watchable": {"kind": "k", "id": "1"}, "data": "d", "type": 7}, "type"),
            ("/api/notify", {"watchable": {"kind": "k", "id": "1"}, "data": "d", "type": "Nope"}, "type"),
            ("/api/distribute", {"data": "d", "type": True}, "type"),
            ("/api/disconnect", {"principal": ""}, "principal"),
        ]:
            message = await self.error_of(400, "invalid_field", "POST", path, body)
            self.assertTrue(message.startswith(f"{field}: "), (path, body, message))

    async def test_body_too_large(self) -> None:
        """A body over max_body_size is 413, whether sent with a Content-Length or chunked."""
        await self.start_api(max_body_size=1024)
        big = json.dumps({"channel": "c", "data": "x" * 2000}).encode()
        for kw in ({"raw": big}, {"producer": _Chunked(big)}):
            status, answer, headers = await self.call("POST", "/api/publish", **kw)
            self.assertEqual((status, answer["error"]["code"]), (413, "body_too_large"))
            self.assertIn("body: over [api] max_body_size (1024 bytes)", answer["error"]["message"])
        status, _, _ = await self.call("POST", "/api/publish", {"channel": "c", "data": "x" * 900})
        self.assertEqual(status, 200)

    async def test_data_over_max_message_size(self) -> None:
        """data over websocket.max_message_size is 413 data_too_large naming data."""
        await self.start_api(Config(tokens=TOKENS, max_message_size=256))
        message = await self.error_of(413, "data_too_large", "POST", "/api/publish", {"channel": "c", "data": "x" * 257})
        self.assertTrue(message.startswith("data: 257 bytes"), message)

    async def test_wrong_method(self) -> None:
        """Another method is 405 with an Allow header, after the key check."""
        await self.start_api()
        for method, path, allowed in [("GET", "/api/publish", b"POST"), ("POST", "/api/info", b"GET"),
                                      ("DELETE", "/api/channels", b"GET"), ("PUT", "/api/openapi.json", b"GET")]:
            status, answer, headers = await self.call(method, path, {} if method != "GET" else None)
            self.assertEqual((status, answer["error"]["code"]), (405, "method_not_allowed"), path)
            self.assertEqual(headers.getRawHeaders(b"allow"), [allowed])
        status, _, _ = await self.call("GET", "/api/publish", key=None)
        self.assertEqual(status, 401)

    async def test_unknown_path(self) -> None:
        """An unknown path is 404 naming it with a key, 401 without one."""
        await self.start_api()
        for path in ("/", "/api", "/api/", "/api/nope", "/api/publish/extra", "/other"):
            message = await self.error_of(404, "not_found", "GET", path)
            self.assertIn(repr(path), message)
        await self.error_of(401, "unauthorized", "GET", "/api/nope", key=None)

    async def test_no_key_in_the_log(self) -> None:
        """Calls with right and wrong keys write neither key, nor an access-log line, to the log."""
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.start_api()
        await self.call("POST", "/api/publish", {"channel": "c", "data": "d"})
        await self.call("POST", "/api/publish", {"channel": "c", "data": "d"}, key=OTHER_KEY)
        await self.call("GET", "/api/info", key="wrong-" + KEY)
        await self.call("GET", "/api/nope")
        text = "\n".join(formatEvent(e) or "" for e in events) + repr(events)
        for secret in (KEY, OTHER_KEY):
            self.assertNotIn(secret, text)
        self.assertNotIn("/api/publish", text)


class CurlExampleTests(ApiTestCase):
    def examples(self) -> list[str]:
        text = API_DOC.read_text()
        return [line for block in re.findall(r"```sh\n(.*?)```", text, re.S) for line in block.splitlines()
                if line.startswith("curl ")]

    async def test_every_curl_example_runs(self) -> None:
        """Each curl example in docs/api.md answers 200 from a node (the port substituted, the key in $MESHD_API_KEY)."""
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        examples = self.examples()
        self.assertEqual(len(examples), 10)
        from meshd.channels import ChannelOptions

        await self.start_api(Config(source=Path("test.toml"), tokens=TOKENS, rules=_EVERYONE,
                                    channels=(ChannelOptions("chat", history_size=10, presence=True),)))
        listener = await self.client("alice-token")
        await listener.subscribe("chat")
        await listener.watch("document", "42")
        environment = {**env(), "MESHD_API_KEY": KEY}
        seen = set()
        for example in examples:
            command = example.replace("127.0.0.1:8780", f"127.0.0.1:{self.api_port}")
            self.assertNotEqual(command, example)
            out, err, code = await getProcessOutputAndValue(
                "/bin/sh", ["-c", command + " -w '\\n%{http_code}'"], env=environment).addTimeout(30, reactor)
            body, _, status = out.decode().rpartition("\n")
            self.assertEqual((code, status), (0, "200"), (example, out, err))
            path = re.search(r"/api/[\w.]+", command).group(0)  # without its query
            method = "POST" if " -d " in command else "GET"
            check_against(OPENAPI, path, method, 200, json.loads(body))
            seen.add(path)
        self.assertEqual(seen, set(OPENAPI["paths"]))
        closed = await listener.when_closed().addTimeout(10, reactor)  # the disconnect example names alice
        self.assertEqual(closed.code, CLOSE_DISCONNECTED)


class ConfigTests(unittest.SynchronousTestCase):
    def test_api_section(self) -> None:
        """[api] gives ApiSettings with its listen, keys and max_body_size."""
        config = parse({"api": {"listen": "tcp:0:interface=127.0.0.1", "keys": {"backend": KEY},
                                "max_body_size": 4096}}, Path("node.toml"))
        self.assertEqual(config.api, ApiSettings("tcp:0:interface=127.0.0.1", {"backend": KEY}, 4096))
        self.assertNotIn(KEY, repr(config))

    def test_the_docs_example_section(self) -> None:
        """The [api] example in docs/api.md is a valid configuration."""
        from meshd.config import tomllib  # tomli before Python 3.11

        example = re.search(r"```toml\n(.*?)```", API_DOC.read_text(), re.S).group(1)
        config = parse(tomllib.loads(example), Path("node.toml"))
        self.assertEqual(sorted(config.api.keys), ["backend", "ops"])

    def test_api_errors_name_file_and_key(self) -> None:
        """A bad [api] section is refused naming the file and the api.KEY."""
        for body, expected in [
            ({"listen": "tcp:0"}, "node.toml: api.keys is required"),
            ({"listen": "tcp:0:interface=127.0.0.1", "keys": {}}, "node.toml: api.keys is required"),
            ({"keys": {"a": "b"}}, "node.toml: api.listen is required"),
            ({"listen": "nope:1", "keys": {"a": "b"}}, "node.toml: api.listen: "),
            ({"listen": "tcp:0", "keys": {"a": "sha256:xyz"}}, "node.toml: api.keys: "),
            ({"listen": "tcp:0", "keys": {"a": 5}}, "node.toml: api.keys: "),
            ({"listen": "tcp:0", "keys": {"a": "b"}, "max_body_size": 10}, "node.toml: api.max_body_size: "),
            ({"listen": "tcp:0", "keys": {"a": "b"}, "port": 1}, "node.toml: unknown key api.port"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                parse({"api": body}, Path("node.toml"))
            self.assertTrue(str(caught.exception).startswith(expected), str(caught.exception))

    def test_make_service_serves_the_api(self) -> None:
        """twistd meshd with an [api] section adds the API listener to the node."""
        from meshd import tap

        path = Path(self.mktemp())
        path.write_text('[websocket]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                        f'[api]\nlisten = "tcp:0:interface=127.0.0.1"\nkeys = {{ backend = "{KEY}" }}\n')
        options = tap.Options()
        options.parseOptions(["--config", str(path)])
        app = tap.makeService(options)
        self.addCleanup(tap.uninstall_process_hooks)
        self.assertIn("api:tcp:0:interface=127.0.0.1", [s.name for s in app])
