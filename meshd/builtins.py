# -*- test-case-name: tests.test_handlers -*-
"""The built-in handlers: Hello, Refresh, Subscribe, Unsubscribe, Publish, Watch, Unwatch, Ping."""

from __future__ import annotations

import unicodedata
from typing import Optional

from twisted.internet.defer import Deferred, maybeDeferred

from meshd.auth import Identity
from meshd.codec import PROTOCOL_VERSION, ErrorCode, Opcode, ProtocolError, Watchable, batch_payload
from meshd.constants import CLOSE_HELLO_FAILURES
from meshd.handlers import Handlers, Request
from meshd.permissions import PUBLISH, SUBSCRIBE, WATCH


def install(handlers: Handlers) -> None:
    handlers._install(Opcode.Hello, hello, requires_hello=False)
    handlers._install(Opcode.Ping, ping, requires_hello=False)
    handlers._install(Opcode.Refresh, refresh)
    handlers._install(Opcode.Subscribe, subscribe)
    handlers._install(Opcode.Unsubscribe, unsubscribe)
    handlers._install(Opcode.Publish, publish)
    handlers._install(Opcode.Watch, watch)
    handlers._install(Opcode.Unwatch, unwatch)
    handlers._install(Opcode.History, history)
    handlers._install(Opcode.Presence, presence)
    handlers._install(Opcode.PresenceStats, presence_stats)


def hello(request: Request) -> Optional[Deferred]:
    session, message = request.session, request.message
    if session.helloed:
        raise ProtocolError(ErrorCode.AlreadyHello, "this session has said Hello already")
    if session.hello_pending:
        raise ProtocolError(ErrorCode.AlreadyHello, "a Hello is being processed already")
    if message.version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UnsupportedVersion,
            f"protocol version {message.version} is not supported; this node speaks {PROTOCOL_VERSION}",
        )
    if message.info is not None and len(message.info.encode("utf-8")) > MAX_INFO:
        raise ProtocolError(ErrorCode.InvalidArgument, f"info is at most {MAX_INFO} bytes")
    session.info = message.info
    if message.token is None:
        _welcome(request, None)
        return None
    limits = request.app.limits
    if not limits.may_try_token(session):
        # The token is not even checked: the address has no refused tokens left.
        _close_for_failures(request, "too many failed Hellos from this address", 0)
        return None
    session.lifecycle.hello_started()
    d = maybeDeferred(request.app.authenticator.authenticate, message.token)

    def authenticated(principal: "Optional[str | Identity]") -> None:
        if not principal:
            session.lifecycle.hello_refused()
            failed = limits.hello_failed(session)
            if failed >= limits.max_failed_hellos and session.is_open:
                request.fail(ErrorCode.AuthenticationFailed, "the token was not accepted")
                _close_for_failures(request, "too many failed Hellos", failed)
                return
            raise ProtocolError(ErrorCode.AuthenticationFailed, "the token was not accepted")
        if session.is_open:
            _welcome(request, principal)

    def failed(failure):
        session.lifecycle.hello_refused()
        return failure

    return d.addCallbacks(authenticated, failed)


def _close_for_failures(request: Request, reason: str, failed: int) -> None:
    """Close a session whose Hellos keep failing (limits.max_failed_hellos, limits.address_failed_hellos)."""
    session, limits = request.session, request.app.limits
    limits.log.warn(
        "Closing {session} ({peer}): {reason} ({failed} on this connection)",
        session=session.id, peer=session.peer, reason=reason, failed=failed,
    )
    session.lifecycle.close(CLOSE_HELLO_FAILURES, reason)


def _identity(proof: "str | Identity") -> Identity:
    """What an authenticator returned, as an Identity; raise TypeError for anything else."""
    if isinstance(proof, Identity):
        return proof
    if isinstance(proof, str):
        return Identity(proof)
    raise TypeError(f"the authenticator returned {type(proof).__name__}, not a str principal or an Identity")


def _welcome(request: Request, proof: "Optional[str | Identity]") -> None:
    session, app = request.session, request.app
    try:
        identity = _identity(proof) if proof is not None else None
    except TypeError:
        session.lifecycle.hello_refused()
        raise
    if identity is None:
        principal = None
        session.lifecycle.welcome(None, request.message.batch)
    else:
        principal = identity.principal
        session.lifecycle.welcome(principal, request.message.batch, identity.expires, identity.grants)
    app.registry.admit(session)
    request.reply(
        Opcode.Welcome,
        session=session.id,
        node=app.node_id,
        version=PROTOCOL_VERSION,
        principal=principal,
        max_message_size=app.config.max_message_size,
        batch=request.message.batch,
    )


def refresh(request: Request) -> Optional[Deferred]:
    """A new token for the session's principal: accepted, it replaces the old one's expiry and grants."""
    session, message, limits = request.session, request.message, request.app.limits
    if message.token is None:
        raise ProtocolError(ErrorCode.MissingField, "Refresh needs a token")
    if not session.authenticated:
        raise ProtocolError(ErrorCode.AuthenticationFailed, "an anonymous session has no token to refresh")
    if not limits.may_try_token(session):
        _close_for_failures(request, "too many failed Hellos from this address", 0)
        return None
    principal = session.principal
    d = maybeDeferred(request.app.authenticator.authenticate, message.token)

    def checked(proof: "Optional[str | Identity]") -> None:
        identity = _identity(proof) if proof else None
        if identity is None or identity.principal != principal:
            failed = limits.hello_failed(session)
            why = "the token was not accepted" if identity is None else "the token is for another principal"
            if failed >= limits.max_failed_hellos and session.is_open:
                request.fail(ErrorCode.AuthenticationFailed, why)
                _close_for_failures(request, "too many failed Hellos", failed)
                return
            raise ProtocolError(ErrorCode.AuthenticationFailed, why)
        session.lifecycle.refreshed(identity.expires, identity.grants)

    return d.addCallback(checked)


def ping(request: Request) -> None:
    request.reply(Opcode.Pong, payload=request.message.payload)


def subscribe(request: Request) -> Optional[Deferred]:
    session, app = request.session, request.app
    channel = _channel(request)
    _require(request, SUBSCRIBE, channel)
    if channel not in session.channels and len(session.channels) >= app.config.max_subscriptions:
        raise ProtocolError(
            ErrorCode.TooManySubscriptions,
            f"a session may hold {app.config.max_subscriptions} subscriptions",
        )
    registry = app.registry
    if channel not in registry.channels and len(registry.channels) >= app.config.max_channels:
        raise ProtocolError(
            ErrorCode.TooManySubscriptions,
            f"this node holds its limit of {app.config.max_channels} channels; no new channel can be made",
        )
    options = app.history.options(channel) if app.history is not None else None
    if options is None:
        registry.subscribe(session, channel)
        return
    # A history channel: the Ack says where the channel is now, and with `recover` and `positions`
    # the events missed since them come first (docs/recovery.md).  All in this turn: an event
    # published later reaches the session live, one published earlier is in the history.
    message = request.message
    positions = _positions(message.positions) if message.positions is not None else None
    # Recovering a channel the session holds already would replay what it has: answered as not recovered.
    wants = message.recover and positions is not None and options.recover and channel not in session.channels
    entries, recovered, cut = app.history.read(channel, positions=positions if wants else None)
    if wants and app.mesh is not None and (not recovered or not _names_every_node(app, positions)):
        from meshd.recovery import recover

        return recover(app, request, channel, positions)  # the peers may cover the rest
    if recovered:
        session.send_events([e.frame for e in entries])
    registry.subscribe(session, channel)
    if message.request_id:
        request.reply(Opcode.Ack, positions=app.positions_now(channel, cut), recovered=recovered)
    return None


def history(request: Request) -> Optional[bytes]:
    """The events a history channel holds here: the latest ``limit``, or those after ``positions``.

    Answered by an Ack whose payload holds them as a Batch frame's payload does, with the channel's
    positions now and, given ``positions``, whether nothing after them is missing (``recovered``).
    """
    app, message = request.app, request.message
    channel = _channel(request)
    _require(request, SUBSCRIBE, channel)
    if app.history is None or app.history.options(channel) is None:
        raise ProtocolError(ErrorCode.InvalidArgument, f"channel {channel!r} keeps no history ([[channels]])")
    limit = message.limit or HISTORY_LIMIT
    entries, recovered, cut = app.history.read(channel, min(limit, HISTORY_LIMIT), message.positions)
    request.reply(Opcode.Ack, payload=batch_payload([e.frame for e in entries]),
                  positions=app.positions_now(channel, cut),
                  recovered=recovered)
    return None


#: The most positions a Subscribe or History may give.
MAX_POSITIONS = 1024
#: The longest ``info`` a Hello may give, in bytes (UTF-8).
MAX_INFO = 256
#: The most events one History answer holds (its ``limit`` is capped there).
HISTORY_LIMIT = 1000


def presence(request: Request) -> Deferred:
    """Who is subscribed to a presence channel, on every node that answers (Ack: ``presence``)."""
    return _presence(request).addCallback(lambda entries: request.reply(Opcode.Ack, presence=entries))


def presence_stats(request: Request) -> Deferred:
    """How many sessions, and distinct principals, are subscribed to a presence channel."""
    def counted(entries) -> None:
        principals = {e.principal for e in entries if e.principal is not None}
        request.reply(Opcode.Ack, sessions=len(entries), principals=len(principals))

    return _presence(request).addCallback(counted)


def _presence(request: Request) -> Deferred:
    app = request.app
    channel = _channel(request)
    _require(request, SUBSCRIBE, channel)
    if app.presence is None or app.presence.options(channel) is None:
        raise ProtocolError(ErrorCode.InvalidArgument, f"channel {channel!r} has no presence ([[channels]] presence)")
    return app.presence.cluster(channel).addCallback(lambda found: found[0])


def unsubscribe(request: Request) -> None:
    channel = _channel(request)
    if request.app.history is not None:
        from meshd.recovery import cancel

        # A recovering Subscribe of the channel still under way subscribes nothing.
        cancel(request.app.history, request.session.id, channel)
    request.app.registry.unsubscribe(request.session, channel)


def _positions(positions: list) -> list:
    """A client's positions, one per (node, epoch) (its highest), at most :data:`MAX_POSITIONS`."""
    if len(positions) > MAX_POSITIONS:
        raise ProtocolError(ErrorCode.InvalidArgument, f"at most {MAX_POSITIONS} positions")
    highest: dict = {}
    for p in positions:
        key = (p.node, p.epoch)
        if key not in highest or p.seq > highest[key].seq:
            highest[key] = p
    return list(highest.values())


def _names_every_node(app, positions: list) -> bool:
    """Whether ``positions`` name every node linked now (else one may have published since, unseen)."""
    named = {p.node for p in positions}
    return all(node in named for node in app.mesh.linked())


def publish(request: Request) -> None:
    session, message = request.session, request.message
    channel = _channel(request)
    _require(request, PUBLISH, channel)
    state = request.state
    state.clients.broadcast_to_channel(
        state.node_id,
        channel,
        message.payload or b"",
        exclude=session.id if message.exclude_self else None,
        local_only=False,
        instance=session.id,
    )


def watch(request: Request) -> None:
    session, app = request.session, request.app
    watchable = _watchable(request)
    _require(request, WATCH, f"{watchable.kind}/{watchable.id}")
    if watchable not in session.watching and len(session.watching) >= app.config.max_watches:
        raise ProtocolError(
            ErrorCode.TooManyWatches, f"a session may hold {app.config.max_watches} watches"
        )
    app.registry.watch(session, watchable)


def unwatch(request: Request) -> None:
    request.app.registry.unwatch(request.session, _watchable(request))


# -- checks shared by the handlers ----------------------------------------------


def _require(request: Request, action: str, target: str) -> None:
    session = request.session
    if not request.app.policy.allows(action, target, session.authenticated, session.principal, session.grants):
        who = f"principal {session.principal!r}" if session.authenticated else "an anonymous session"
        raise ProtocolError(ErrorCode.PermissionDenied, f"{who} may not {action} {target!r}")


#: Unicode categories refused in names: controls, format characters (such as
#: zero-width and bidirectional marks), surrogates, private use, unassigned,
#: and line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _has_control_characters(text: str) -> bool:
    if text.isascii():  # the common case, checked in C: printable ASCII has none
        return not text.isprintable()
    return any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in text)


def _channel(request: Request) -> str:
    channel = request.message.channel
    if channel is None:
        raise ProtocolError(
            ErrorCode.MissingField, f"opcode {request.message.opcode} needs a channel"
        )
    limit = request.app.config.max_channel_length
    if not channel:
        raise ProtocolError(ErrorCode.InvalidChannel, "the channel name is empty")
    if len(channel.encode("utf-8")) > limit:
        raise ProtocolError(ErrorCode.InvalidChannel, f"channel names are at most {limit} bytes")
    if _has_control_characters(channel):
        raise ProtocolError(ErrorCode.InvalidChannel, "channel names may not hold control or format characters")
    return channel


def _watchable(request: Request) -> Watchable:
    watchable = request.message.watchable
    if watchable is None:
        raise ProtocolError(
            ErrorCode.MissingField, f"opcode {request.message.opcode} needs a watchable"
        )
    limit = request.app.config.max_watchable_length
    for part, value in (("kind", watchable.kind), ("id", watchable.id)):
        if not value:
            raise ProtocolError(ErrorCode.InvalidWatchable, f"the watchable's {part} is empty")
        if len(value.encode("utf-8")) > limit:
            raise ProtocolError(
                ErrorCode.InvalidWatchable, f"a watchable's {part} is at most {limit} bytes"
            )
        if _has_control_characters(value):
            raise ProtocolError(
                ErrorCode.InvalidWatchable, f"the watchable's {part} holds a control or format character"
            )
    if "/" in watchable.kind:
        # Permission rules match "KIND/ID": with a slash in the kind, ("a/b", "c") and ("a", "b/c")
        # would be one target.
        raise ProtocolError(ErrorCode.InvalidWatchable, "the watchable's kind may not hold a slash")
    return watchable
