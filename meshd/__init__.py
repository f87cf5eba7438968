"""meshd: a clustered real-time event server.

Server-side code works with :class:`meshd.Application` (the node) and its
``state`` (the event scopes); see docs/extending.md.
"""

from meshd.app import Application
from meshd.codec import ErrorCode, EventType, Opcode, ProtocolError, Watchable
from meshd.config import Config
from meshd.handlers import Request
from meshd.state import Event, NodeState

__version__ = "0.1.0"

__all__ = [
    "Application",
    "Config",
    "ErrorCode",
    "Event",
    "EventType",
    "NodeState",
    "Opcode",
    "ProtocolError",
    "Request",
    "Watchable",
]
