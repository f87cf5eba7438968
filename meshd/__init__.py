"""meshd: a clustered real-time event server.

Server-side code works with :class:`meshd.Application` (the node) and its
``state`` (the event scopes); see docs/extending.md.

The names below are imported when first used, so that ``import meshd.X``
loads only what ``X`` needs (``meshctl certs`` loads no WebSocket stack).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any


def _version() -> str:
    """The installed distribution's version; in a checkout that is not installed, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshd")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"))
        except OSError:
            found = None
        return found.group(1) if found else "0+unknown"


#: One source of truth: ``version`` in pyproject.toml, read from the installed metadata.
__version__ = _version()

_EXPORTS = {
    "Application": "meshd.app",
    "Config": "meshd.config",
    "ErrorCode": "meshd.codec",
    "Event": "meshd.events",
    "EventType": "meshd.codec",
    "NodeState": "meshd.state",
    "Opcode": "meshd.codec",
    "ProtocolError": "meshd.codec",
    "Request": "meshd.handlers",
    "Watchable": "meshd.codec",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from meshd.app import Application
    from meshd.codec import ErrorCode, EventType, Opcode, ProtocolError, Watchable
    from meshd.config import Config
    from meshd.events import Event
    from meshd.handlers import Request
    from meshd.state import NodeState


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meshd' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
