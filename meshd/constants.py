# -*- test-case-name: tests.test_websocket -*-
"""What clients and nodes agree on besides the FlatBuffers schema: the subprotocol and close codes.

Both :mod:`meshd.websocket` (the node) and :mod:`meshd.client` import these;
``docs/protocol.md`` section 9 lists what each close code means.
"""

#: The WebSocket subprotocol clients must offer.
SUBPROTOCOL = "meshd.v1"

#: The node is shutting down (a drain sends :data:`CLOSE_DRAINING` instead).
CLOSE_GOING_AWAY = 1000
#: A WebSocket protocol violation, the client's close frame included (bad code, reason not UTF-8, 1-byte body).
CLOSE_PROTOCOL_ERROR = 1002
#: A text message arrived on a binary subprotocol.
CLOSE_UNSUPPORTED_DATA = 1003
#: A message in more WebSocket frames than ``limits.max_fragments``.
CLOSE_POLICY_VIOLATION = 1008
#: A message (or frame) over ``websocket.max_message_size`` (sent by Autobahn).
CLOSE_MESSAGE_TOO_BIG = 1009
#: No Hello was welcomed within ``limits.hello_timeout``.
CLOSE_HELLO_TIMEOUT = 4001
#: The client does not read while frames for it pile up past ``limits.max_send_buffer``.
CLOSE_SLOW_CONSUMER = 4002
#: ``limits.max_failed_hellos`` Hellos with refused tokens on one connection, or none left to the
#: client's address (``limits.address_failed_hellos``).
CLOSE_HELLO_FAILURES = 4003
#: Requests kept coming faster than ``limits.request_rate`` until the session owed more than ``limits.request_burst``.
CLOSE_RATE_LIMITED = 4004
#: The session's token (a JWT's ``exp``, plus ``auth.jwt.leeway``) expired before a Refresh replaced it.
CLOSE_TOKEN_EXPIRED = 4005
#: The server HTTP API's ``POST /api/disconnect`` closed the session (docs/api.md).
CLOSE_DISCONNECTED = 4006
#: The node is draining before it stops (SIGTERM): reconnect, to another node if there is one.
CLOSE_DRAINING = 4007
