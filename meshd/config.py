# -*- test-case-name: tests.test_config -*-
"""Node configuration: a TOML file, overridden by command-line flags.

Every key is listed in ``docs/configuration.md``.  Any unknown key or bad
value is refused with a :class:`ConfigError` that names the file and key.
Without a file the node runs in *development mode*: it listens on loopback
only, allows every operation, and accepts any token.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional
from uuid import UUID

from meshd.limits import DEFAULT_EXEMPT, parse_networks
from meshd.permissions import ACTIONS, Rule

if TYPE_CHECKING:
    from meshd.channels import ChannelOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_LISTEN = "tcp:8765:interface=127.0.0.1"
#: Where `--demo` (or `[web] demo = true` without `[web] listen`) serves the demo page.
DEFAULT_WEB_LISTEN = "tcp:8766:interface=127.0.0.1"
#: A host runs at most this many workers (``[node] workers``).
MAX_WORKERS = 256
#: The browser origins a node in development mode accepts unless ``allowed_origins`` is set: pages
#: served from this machine (Autobahn matches ``scheme://host:port``, an IPv6 host without brackets).
LOOPBACK_ORIGINS = (
    "http://localhost:*", "https://localhost:*", "http://127.0.0.1:*", "https://127.0.0.1:*",
    "http://::1:*", "https://::1:*",
)


class ConfigError(Exception):
    """A configuration that the node refuses to start with."""


@dataclass(frozen=True)
class MeshSettings:
    """The ``[mesh]`` section: how this node links with the others of its cluster."""

    cluster: str
    listen: str
    advertise: str
    ca: Path
    cert: Path
    key: Path
    seeds: tuple[str, ...] = ()
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    queue_max_seconds: float = 30.0
    queue_max_bytes: int = 16 << 20
    max_frame_size: int = 1 << 20
    forward_watchers: bool = False
    reconnect_max_delay: float = 5.0
    forget_after: float = 600.0
    #: Refuse a peer whose certificate names no node id (``meshd://node/UUID``).
    require_node_id_in_cert: bool = True
    #: A connection that has not completed its LinkHello (TLS included) this long after it is up is closed.
    hello_timeout: float = 10.0
    #: A routed frame numbered more than this past the last one from its node is a violation (0: no check).
    max_sequence_gap: int = 1 << 24
    #: At most this many channels, and bytes of channel names, of interest per peer.
    max_peer_channels: int = 100_000
    max_peer_interest_bytes: int = 16 << 20


#: The JWT algorithms a node accepts, by the kind of key that verifies them (``none`` is never accepted).
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}  # and the shortest secret for each, in bytes
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class JWTSettings:
    """The ``[auth.jwt]`` section: how Hello tokens that are JWTs are verified.

    Exactly one of :attr:`secret`, :attr:`public_key` and :attr:`jwks_url` is set.
    """

    algorithms: tuple[str, ...]
    secret: Optional[str] = field(default=None, repr=False)
    #: A PEM public key file (resolved against the configuration file's folder).
    public_key: Optional[Path] = None
    jwks_url: Optional[str] = None
    #: When set, a token's ``aud`` must name one of these; when not, a token with an ``aud`` is refused.
    audience: Optional[tuple[str, ...]] = None
    issuer: Optional[str] = None
    leeway: float = 0.0
    #: A token whose ``kid`` the cached key set lacks refetches it at most this often.
    jwks_min_refetch: float = 30.0
    #: How long fetched keys are used before the next token fetches them again.
    jwks_cache_seconds: float = 3600.0


#: The largest request body the server HTTP API reads (``[api] max_body_size`` default), in bytes.
DEFAULT_API_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class ApiSettings:
    """The ``[api]`` section: the server HTTP API (docs/api.md) and the keys that may call it."""

    listen: str
    #: name -> key, plain or ``sha256:<hex digest>``; at least one (an API without keys is refused).
    keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: A longer request body is answered 413 without being kept.
    max_body_size: int = DEFAULT_API_MAX_BODY


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to (host, port); raise ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Config:
    source: Optional[Path] = None
    # [node]
    node_id: Optional[UUID] = None
    node_name: str = ""
    #: How long a stop spreads the closing of sessions over, in seconds (0: all at once).
    drain_seconds: float = 10.0
    #: How many worker processes serve this node's clients, sharing its listeners (1: the node's own process).
    workers: int = 1
    # [websocket]
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    max_message_size: int = 65536
    #: None: not configured (see :attr:`origins`).
    allowed_origins: Optional[tuple[str, ...]] = None
    auto_ping_interval: float = 30.0
    auto_ping_timeout: float = 10.0
    open_handshake_timeout: float = 10.0
    max_connections: int = 0
    max_handshake_size: int = 16384
    max_handshaking: int = 1024
    max_connections_per_address: int = 256
    exempt_addresses: tuple[str, ...] = DEFAULT_EXEMPT
    # [limits]
    hello_timeout: float = 10.0
    max_subscriptions: int = 1000
    max_watches: int = 1000
    max_channel_length: int = 256
    max_watchable_length: int = 256
    max_send_buffer: int = 1 << 20
    max_fragments: int = 256
    max_failed_hellos: int = 5
    address_failed_hellos: int = 20
    address_failed_hello_rate: float = 0.1
    #: None: not configured (see :attr:`requests_per_second`).
    request_rate: Optional[float] = None
    request_burst: int = 2000
    max_channels: int = 100_000
    #: Bytes of history channels' events a node keeps, all channels together (``limits.history_bytes``).
    max_history_bytes: int = 64 << 20
    # [auth]
    tokens: Mapping[str, str] = field(default_factory=dict)
    # [auth.jwt]
    jwt: Optional[JWTSettings] = None
    # [[rules]]
    rules: tuple[Rule, ...] = ()
    # [[channels]]
    channels: "tuple[ChannelOptions, ...]" = ()
    # [extensions]
    modules: tuple[str, ...] = ()
    # [metrics]
    metrics_listen: Optional[str] = None
    # [mesh]
    mesh: Optional[MeshSettings] = None
    # [api]
    api: Optional[ApiSettings] = None
    # [web]
    web_listen: Optional[str] = None
    demo: bool = False

    @property
    def web_endpoint(self) -> Optional[str]:
        """Where the web listener (the demo page, the browser client) listens, if anywhere."""
        if self.web_listen is not None:
            return self.web_listen
        return DEFAULT_WEB_LISTEN if self.demo else None

    @property
    def development(self) -> bool:
        """True when no configuration file was given."""
        return self.source is None

    @property
    def origins(self) -> tuple[str, ...]:
        """The browser origins accepted: ``allowed_origins`` if set, else loopback pages in
        development mode and any origin with a configuration file."""
        if self.allowed_origins is not None:
            return self.allowed_origins
        return LOOPBACK_ORIGINS if self.development else ("*",)

    @property
    def requests_per_second(self) -> float:
        """A session's request rate: ``request_rate`` if set, else 1000 with a configuration
        file and no limit (0) in development mode, where load generators run."""
        if self.request_rate is not None:
            return self.request_rate
        return 0.0 if self.development else 1000.0

    def override(self, **changes: Any) -> "Config":
        """Return a copy with command-line values applied; ``None`` means not given."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# -- value checkers: each returns the converted value or raises ValueError ------


def _int(minimum: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {v!r}")
        return v

    return check


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"expected a number of seconds >= 0, got {v!r}")
    return float(v)


def _rate(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError(f"expected a number per second > 0, got {v!r}")
    return float(v)


def _rate_or_off(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"expected a number per second >= 0 (0: no limit), got {v!r}")
    return float(v)


def _networks(v: Any) -> tuple[str, ...]:
    values = _texts(v)
    parse_networks(values)
    return values


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _texts(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"expected a list of strings, got {v!r}")
    return tuple(v)


def workers_value(v: Any) -> int:
    """A number of worker processes, or ``"auto"``: one per core this process may run on."""
    if v == "auto":
        return auto_workers()
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WORKERS:
        raise ValueError(f'must be an integer from 1 to {MAX_WORKERS}, or "auto"; got {v!r}')
    return v


def auto_workers() -> int:
    """One worker per core this process may run on (its CPU affinity), at most :data:`MAX_WORKERS`."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_WORKERS))


def _uuid(v: Any) -> UUID:
    try:
        return UUID(_text(v))
    except ValueError:
        raise ValueError(f"expected a UUID, got {v!r}") from None


def _endpoint(v: Any) -> str:
    check_endpoint(_text(v))
    return v


def _endpoints(v: Any) -> tuple[str, ...]:
    values = _texts(v)
    if not values:
        raise ValueError("expected at least one endpoint")
    for value in values:
        check_endpoint(value)
    return values


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _tokens(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ValueError(f"expected a table of principal = token, got {v!r}")
    for principal, token in v.items():
        if not isinstance(token, str) or not token:
            raise ValueError(f"token of {principal!r} must be a non-empty string")
        if token.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", token):
            raise ValueError(f"token of {principal!r} must be sha256: and 64 hex digits")
    return dict(v)


# (section, key) -> (Config attribute, checker)
_KEYS: dict[str, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "node": {"id": ("node_id", _uuid), "name": ("node_name", _text), "drain_seconds": ("drain_seconds", _seconds),
             "workers": ("workers", workers_value)},
    "websocket": {
        "listen": ("listen", _endpoints),
        "max_message_size": ("max_message_size", _int(256)),
        "allowed_origins": ("allowed_origins", _texts),
        "auto_ping_interval": ("auto_ping_interval", _seconds),
        "auto_ping_timeout": ("auto_ping_timeout", _seconds),
        "open_handshake_timeout": ("open_handshake_timeout", _seconds),
        "max_connections": ("max_connections", _int(0)),
        "max_handshake_size": ("max_handshake_size", _int(1024)),
        "max_handshaking": ("max_handshaking", _int(1)),
        "max_connections_per_address": ("max_connections_per_address", _int(0)),
        "exempt_addresses": ("exempt_addresses", _networks),
    },
    "limits": {
        "hello_timeout": ("hello_timeout", _seconds),
        "max_subscriptions": ("max_subscriptions", _int(1)),
        "max_watches": ("max_watches", _int(1)),
        "max_channel_length": ("max_channel_length", _int(1)),
        "max_watchable_length": ("max_watchable_length", _int(1)),
        "max_send_buffer": ("max_send_buffer", _int(1024)),
        "max_fragments": ("max_fragments", _int(1)),
        "max_failed_hellos": ("max_failed_hellos", _int(1)),
        "address_failed_hellos": ("address_failed_hellos", _int(1)),
        "address_failed_hello_rate": ("address_failed_hello_rate", _rate),
        "request_rate": ("request_rate", _rate_or_off),
        "request_burst": ("request_burst", _int(1)),
        "max_channels": ("max_channels", _int(1)),
        "history_bytes": ("max_history_bytes", _int(1024)),
    },
    "auth": {"tokens": ("tokens", _tokens)},
    "extensions": {"modules": ("modules", _texts)},
    "metrics": {"listen": ("metrics_listen", _endpoint)},
    "web": {"listen": ("web_listen", _endpoint), "demo": ("demo", _flag)},
}
_RULE_KEYS = ("match", "anonymous", "authenticated")


def key_of(attribute: str) -> str:
    """The file key (``section.key``) of a :class:`Config` attribute, for messages; the attribute if none."""
    for section, keys in _KEYS.items():
        for key, (name, _) in keys.items():
            if name == attribute:
                return f"{section}.{key}"
    return {"jwt": "auth.jwt", "rules": "rules", "channels": "channels", "mesh": "mesh", "api": "api"}.get(
        attribute, attribute)


def load(path: "str | Path") -> Config:
    """Read and check a TOML configuration file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path)


def parse(data: Mapping[str, Any], path: Path) -> Config:
    values: dict[str, Any] = {"source": path}
    for section, body in data.items():
        if section == "rules":
            values["rules"] = _rules(body, path)
            continue
        if section == "channels":
            values["channels"] = _channels(body, path)
            continue
        if section == "mesh":
            values["mesh"] = _mesh(body, path)
            continue
        if section == "api":
            values["api"] = _api(body, path)
            continue
        keys = _KEYS.get(section)
        if keys is None:
            raise ConfigError(f"{path}: unknown section [{section}] (known: {', '.join([*_KEYS, 'rules', 'channels', 'mesh', 'api'])})")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {section}: expected a table")
        if section == "auth" and "jwt" in body:
            body = dict(body)
            values["jwt"] = _jwt(body.pop("jwt"), path)
        for key, value in body.items():
            if key not in keys:
                raise ConfigError(f"{path}: unknown key {section}.{key} (known: {', '.join(keys)})")
            attribute, check = keys[key]
            try:
                values[attribute] = check(value)
            except ValueError as e:
                raise ConfigError(f"{path}: {section}.{key}: {e}") from None
    return Config(**values)


def _rules(body: Any, path: Path) -> tuple[Rule, ...]:
    if not isinstance(body, list):
        raise ConfigError(f"{path}: rules: expected an array of tables, written [[rules]]")
    rules = []
    for i, rule in enumerate(body):
        where = f"{path}: rules[{i}]"
        if not isinstance(rule, dict):
            raise ConfigError(f"{where}: expected a table")
        for key in rule:
            if key not in _RULE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(_RULE_KEYS)})")
        if not isinstance(rule.get("match"), str) or not rule["match"]:
            raise ConfigError(f"{where}.match: expected a non-empty glob pattern")
        grants = {}
        for who in ("anonymous", "authenticated"):
            actions = rule.get(who, [])
            if not isinstance(actions, list) or any(a not in ACTIONS for a in actions):
                raise ConfigError(
                    f"{where}.{who}: expected a list of actions from {', '.join(ACTIONS)}, got {actions!r}"
                )
            grants[who] = frozenset(actions)
        rules.append(Rule(rule["match"], **grants))
    return tuple(rules)


_CHANNEL_KEYS = {
    "history_size": _int(0),
    "history_ttl": lambda v: _positive_seconds(v),
    "history_bytes": _int(1024),
    "recover": lambda v: _flag(v),
    "presence": lambda v: _flag(v),
    "join_leave": lambda v: _flag(v),
}


def _channels(body: Any, path: Path) -> "tuple[ChannelOptions, ...]":
    """``[[channels]]``: options by pattern, the first match deciding (meshd.channels)."""
    from meshd.channels import ChannelOptions

    if not isinstance(body, list):
        raise ConfigError(f"{path}: channels: expected an array of tables, written [[channels]]")
    entries = []
    for i, entry in enumerate(body):
        where = f"{path}: channels[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        if not isinstance(entry.get("match"), str) or not entry["match"]:
            raise ConfigError(f"{where}.match: expected a non-empty glob pattern")
        values = {}
        for key, value in entry.items():
            if key == "match":
                continue
            check = _CHANNEL_KEYS.get(key)
            if check is None:
                raise ConfigError(f"{where}.{key}: unknown key (known: match, {', '.join(_CHANNEL_KEYS)})")
            try:
                values[key] = check(value)
            except ValueError as e:
                raise ConfigError(f"{where}.{key}: {e}") from None
        options = ChannelOptions(entry["match"], **values)
        if options.recover and not options.history:
            raise ConfigError(f"{where}.recover: needs history (history_size > 0)")
        if options.join_leave and not options.presence:
            raise ConfigError(f"{where}.join_leave: needs presence = true")
        entries.append(options)
    return tuple(entries)


def _audience(v: Any) -> tuple[str, ...]:
    values = (v,) if isinstance(v, str) else _texts(v)
    if not values or not all(values):
        raise ValueError(f"expected a string or a list of non-empty strings, got {v!r}")
    return values


def _url(v: Any) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", _text(v)):
        raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
    return v


_JWT_KEYS: dict[str, Callable[[Any], Any]] = {
    "algorithms": _texts,
    "secret": _text,
    "public_key": _text,
    "jwks_url": _url,
    "audience": _audience,
    "issuer": _text,
    "leeway": _seconds,
    "jwks_min_refetch": _seconds,
    "jwks_cache_seconds": _seconds,
}


def _table(body: Any, path: Path, name: str, checks: "Mapping[str, Callable[[Any], Any]]") -> dict[str, Any]:
    """The values of the table ``name``, each converted by its check; errors name the file and the key."""
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: {name}: expected a table")
    values: dict[str, Any] = {}
    for key, value in body.items():
        check = checks.get(key)
        if check is None:
            raise ConfigError(f"{path}: unknown key {name}.{key} (known: {', '.join(checks)})")
        try:
            values[key] = check(value)
        except ValueError as e:
            raise ConfigError(f"{path}: {name}.{key}: {e}") from None
    return values


def _jwt(body: Any, path: Path) -> JWTSettings:
    """The ``[auth.jwt]`` table; errors name the file and the key (``auth.jwt.KEY``)."""
    values = _table(body, path, "auth.jwt", _JWT_KEYS)
    sources = [k for k in ("secret", "public_key", "jwks_url") if k in values]
    if len(sources) != 1:
        raise ConfigError(f"{path}: auth.jwt: set exactly one of secret, public_key and jwks_url")
    algorithms = values.get("algorithms")
    if not algorithms:
        raise ConfigError(f"{path}: auth.jwt.algorithms is required: a list such as [\"RS256\"]")
    allowed = list(HMAC_ALGORITHMS) if sources[0] == "secret" else list(PUBLIC_KEY_ALGORITHMS)
    for algorithm in algorithms:
        if algorithm not in allowed:
            raise ConfigError(
                f"{path}: auth.jwt.algorithms: {algorithm!r} cannot be verified with {sources[0]} "
                f"(allowed: {', '.join(allowed)})"
            )
    if "secret" in values:
        needed = max(HMAC_ALGORITHMS[a] for a in algorithms)
        if len(values["secret"].encode("utf-8")) < needed:
            raise ConfigError(f"{path}: auth.jwt.secret: must be at least {needed} bytes for {', '.join(algorithms)}")
    if "public_key" in values:
        values["public_key"] = (path.parent / values["public_key"]).resolve()
        from meshd.auth import load_public_key

        try:
            load_public_key(values["public_key"])
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: auth.jwt.public_key: {e}") from None
    return JWTSettings(**values)


def _address(v: Any) -> str:
    split_address(_text(v))
    return v


def _addresses(v: Any) -> tuple[str, ...]:
    return tuple(_address(a) for a in _texts(v))


def _positive_seconds(v: Any) -> float:
    seconds = _seconds(v)
    if seconds <= 0:
        raise ValueError(f"expected a number of seconds > 0, got {v!r}")
    return seconds


_MESH_KEYS: dict[str, Callable[[Any], Any]] = {
    "cluster": _text,
    "listen": _endpoint,
    "advertise": _address,
    "seeds": _addresses,
    "ca": _text,
    "cert": _text,
    "key": _text,
    "heartbeat_interval": _positive_seconds,
    "heartbeat_timeout": _positive_seconds,
    "queue_max_seconds": _seconds,
    "queue_max_bytes": _int(0),
    "max_frame_size": _int(4096),
    "forward_watchers": _flag,
    "reconnect_max_delay": _positive_seconds,
    "forget_after": _positive_seconds,
    "require_node_id_in_cert": _flag,
    "hello_timeout": _positive_seconds,
    "max_sequence_gap": _int(0),
    "max_peer_channels": _int(1),
    "max_peer_interest_bytes": _int(4096),
}


def _mesh(body: Any, path: Path) -> MeshSettings:
    values = _table(body, path, "mesh", _MESH_KEYS)
    for key in ("cluster", "listen", "ca", "cert", "key"):
        if key not in values:
            raise ConfigError(f"{path}: mesh.{key} is required in a [mesh] section")
    for key in ("ca", "cert", "key"):  # relative to the configuration file
        values[key] = (path.parent / values[key]).resolve()
    if "advertise" not in values:
        advertise = _advertised(values["listen"])
        if advertise is None:
            raise ConfigError(
                f"{path}: mesh.advertise is required: the address other nodes dial cannot be "
                f"told from listen = {values['listen']!r}"
            )
        values["advertise"] = advertise
    settings = MeshSettings(**values)
    if settings.heartbeat_timeout <= settings.heartbeat_interval:
        raise ConfigError(f"{path}: mesh.heartbeat_timeout must be longer than mesh.heartbeat_interval")
    return settings


def _api_keys(v: Any) -> Mapping[str, str]:
    try:
        return _tokens(v)
    except ValueError as e:
        raise ValueError(str(e).replace("token of", "key of")) from None


def _api(body: Any, path: Path) -> ApiSettings:
    """The ``[api]`` table; errors name the file and the key (``api.KEY``).

    ``keys`` is required, whatever ``listen`` is: the API can publish to any
    channel and disconnect any session, so it never answers without a key.
    """
    values = _table(body, path, "api", {"listen": _endpoint, "keys": _api_keys, "max_body_size": _int(1024)})
    if "listen" not in values:
        raise ConfigError(f"{path}: api.listen is required in an [api] section")
    if not values.get("keys"):
        raise ConfigError(f"{path}: api.keys is required: a table of name = key (plain or sha256:<hex>)")
    return ApiSettings(**values)


def _advertised(listen: str) -> Optional[str]:
    """``HOST:PORT`` from a ``tcp:PORT:interface=HOST`` endpoint with a specific interface."""
    parts = split_endpoint(listen)
    if parts[0].lower() not in ("tcp", "tcp6") or len(parts) < 2:
        return None
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = options.get("port") or next((p for p in parts[1:] if "=" not in p), None)
    interface = options.get("interface")
    if not port or not port.isdigit() or interface in (None, "0.0.0.0", "::"):
        return None
    return f"[{interface}]:{port}" if ":" in interface else f"{interface}:{port}"


# -- endpoints ------------------------------------------------------------------


def split_endpoint(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons, as Twisted does."""
    return [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", description)]


def check_endpoint(description: str) -> None:
    """Raise ValueError unless Twisted can build a server endpoint from ``description``."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a valid endpoint {description!r}: {e}") from None
    except Exception as e:  # an ssl: endpoint whose certificate or key cannot be read or used
        raise ValueError(f"{description!r}: cannot use its certificate or key: {e}") from None


def is_loopback(description: str) -> bool:
    """Whether a server endpoint string listens on loopback (or a UNIX socket) only."""
    parts = split_endpoint(description)
    kind = parts[0].lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    interface = options.get("interface")
    if interface is None:
        return False
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False
