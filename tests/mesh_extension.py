"""Opcodes that let the process tests reach each event scope through meshctl call."""

from uuid import UUID

from meshd import EventType

LOCAL, DISTRIBUTE, NOTIFY = 1100, 1101, 1102


def setup(app) -> None:
    state = app.state

    def local(request):
        m = request.message
        state.clients.broadcast_to_channel(None, m.channel, m.payload or b"", local_only=True)

    def distribute(request):
        """Payload: the node id to exclude, or empty."""
        m = request.message
        exclude = UUID(m.payload.decode()) if m.payload else None
        state.distribute_event(state.event(EventType.NodeEvent, channel=m.channel, payload=b"distributed"), exclude)

    def notify(request):
        m = request.message
        state.notify_event(EventType.ResourceEvent, m.watchable, None, m.payload or b"")

    app.handlers.register(LOCAL, local)
    app.handlers.register(DISTRIBUTE, distribute)
    app.handlers.register(NOTIFY, notify)
