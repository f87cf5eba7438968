# -*- test-case-name: tests.test_checks -*-
"""Every log event of a node process carries the node's id and name.

``twistd meshd`` runs one node per process, so :func:`meshd.tap.makeService`
installs :class:`NodeFields` on the global log publisher: each event then has
``node_id`` and ``node_name`` fields, which structured observers (such as
``twisted.logger.jsonFileLogObserver``) write out with it.  Nodes run
in-process (tests, embedding) do not install it.
"""

from __future__ import annotations

from typing import Any, Optional
from uuid import UUID

from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from zope.interface import implementer


@implementer(ILogObserver)
class NodeFields:
    """Adds ``node_id`` and ``node_name`` to each event, unless it has them already.

    The publisher hands the same event to each of its observers in turn, so
    this must come before the observers that write events out: twistd adds
    its own when it starts logging, after :meth:`install` has run.
    """

    def __init__(self, node_id: UUID, node_name: str = "") -> None:
        self.node_id = str(node_id)
        self.node_name = node_name

    def __call__(self, event: dict[str, Any]) -> None:
        event.setdefault("node_id", self.node_id)
        event.setdefault("node_name", self.node_name)

    def install(self, publisher: Optional[LogPublisher] = None) -> "NodeFields":
        """Stamp every event ``publisher`` (the global one by default) publishes from now on."""
        # Observers are called in the order they were added; before twistd
        # starts logging, the only one is the buffer that keeps early events
        # (the same dicts, so they get the fields too) until it hands them on.
        (globalLogPublisher if publisher is None else publisher).addObserver(self)
        return self

    def uninstall(self, publisher: Optional[LogPublisher] = None) -> None:
        (globalLogPublisher if publisher is None else publisher).removeObserver(self)
