# -*- test-case-name: tests.test_websocket -*-
"""What clients and nodes agree on besides the FlatBuffers schema: the subprotocol and close codes.

Both :mod:`meshd.websocket` (the node) and :mod:`meshd.client` import these;
``docs/protocol.md`` section 9 lists what each close code means.
"""

#: The WebSocket subprotocol clients must offer.
SUBPROTOCOL = "meshd.v1"

#: The node is shutting down.
CLOSE_GOING_AWAY = 1000
#: A text message arrived on a binary subprotocol.
CLOSE_UNSUPPORTED_DATA = 1003
#: No Hello was welcomed within ``limits.hello_timeout``.
CLOSE_HELLO_TIMEOUT = 4001
#: The client does not read while frames for it pile up past ``limits.max_send_buffer``.
CLOSE_SLOW_CONSUMER = 4002
