"""A meshd extension: a small in-memory document store with live updates.

Run a node with it (from the repository root)::

    PYTHONPATH=docs/examples twistd -n meshd --module documents

then, in two more terminals::

    meshctl watch document 42
    meshctl call 1024 'first draft' --watchable document 42    # Put
    meshctl call 1025 --watchable document 42                  # Get

What it shows:

- user opcode handlers (``app.handlers.register``), answering with an Ack
  payload or a :class:`meshd.ProtocolError`;
- ``state.notify_event``: only the watchers of a document hear about it;
- ``state.distribute_event``: a node-wide event to the ``documents.stats``
  channel, sent from a service that starts and stops with the node;
- checking permissions and bounding memory in a handler: writing a document
  needs the ``publish`` grant on ``document/ID`` (in development mode
  everything is granted), and the store holds a bounded number of documents.
"""

from __future__ import annotations

import json

from twisted.application.internet import TimerService

from meshd import Application, ErrorCode, EventType, Opcode, ProtocolError, Request

PUT = Opcode.UserFirst  # 1024: store the payload as the watchable's document
GET = Opcode.UserFirst + 1  # 1025: answer with the stored document
STATS_CHANNEL = "documents.stats"
MAX_DOCUMENTS = 10_000


class DocumentStore:
    def __init__(self, app: Application) -> None:
        self.app = app
        self.documents: dict[tuple[str, str], bytes] = {}

    def _key(self, request: Request) -> tuple[str, str]:
        watchable = request.message.watchable
        if watchable is None:
            raise ProtocolError(ErrorCode.MissingField, "give the document as the watchable")
        return (watchable.kind, watchable.id)

    def put(self, request: Request) -> bytes:
        key = self._key(request)
        session = request.session
        if not self.app.policy.allows("publish", f"{key[0]}/{key[1]}", session.authenticated):
            raise ProtocolError(ErrorCode.PermissionDenied, f"may not write {key[0]}/{key[1]}")
        if key not in self.documents and len(self.documents) >= MAX_DOCUMENTS:
            raise ProtocolError(ErrorCode.InvalidArgument, "the store is full")
        body = request.message.payload or b""
        self.documents[key] = body
        # Tell everyone watching this document, except the writer.
        request.state.notify_event(
            EventType.ResourceEvent, key, request.session.id, body, exclude_id=request.session.id
        )
        return b"stored"

    def get(self, request: Request) -> bytes:
        key = self._key(request)
        if key not in self.documents:
            raise ProtocolError(ErrorCode.InvalidArgument, f"no document {key[0]}/{key[1]}")
        return self.documents[key]

    def publish_stats(self) -> None:
        state = self.app.get_state()
        payload = json.dumps({"documents": len(self.documents)}).encode()
        state.distribute_event(state.event(EventType.CacheEvent, channel=STATS_CHANNEL, payload=payload))


def setup(app: Application) -> None:
    """Called by the node for ``--module documents`` (or ``[extensions] modules``)."""
    store = DocumentStore(app)
    app.handlers.register(PUT, store.put)
    app.handlers.register(GET, store.get)
    TimerService(5.0, store.publish_stats).setServiceParent(app)
