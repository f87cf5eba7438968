# -*- test-case-name: tests.test_workers -*-
"""The workers of one host: their node ids, and the local links between them.

A host running ``[node] workers = N`` (see :mod:`meshd.workers`) is N nodes
of the mesh, one per process.  Each has its own node id, derived from the
host's: the host's certificate names the host's id, and a peer accepts a
node whose id is one of its workers' (:func:`certifies`), so one certificate
serves every worker of a host.

Workers of one host link with each other over Unix sockets in a directory
only the node's user can enter: no TLS, and no certificate to check.  The
other end of such a link is one of the host's workers (:attr:`Siblings.ids`),
and each pair is dialed by its higher-indexed worker only, so a link that
goes is dialed again by one side and no duplicate forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from uuid import UUID, uuid5

from meshd.config import MAX_WORKERS


def worker_node_id(host: UUID, index: int) -> UUID:
    """The node id of worker ``index`` of the host whose id is ``host``."""
    return uuid5(host, f"meshd-worker/{index}")


@lru_cache(maxsize=1024)
def _worker_ids(host: UUID) -> frozenset[UUID]:
    return frozenset(worker_node_id(host, i) for i in range(MAX_WORKERS))


def certifies(named: UUID, node: UUID) -> bool:
    """Whether a certificate naming ``named`` vouches for ``node``: the same id, or one of its workers'."""
    return node == named or node in _worker_ids(named)


def link_path(directory: "str | Path", index: int) -> Path:
    """Where worker ``index`` listens for its siblings' links."""
    return Path(directory) / f"link-{index}.sock"


@dataclass(frozen=True)
class Siblings:
    """What one worker knows of the workers of its host.

    ``host``: the host's node id (what its certificate names); ``index``:
    this worker's; ``count``: how many workers the host runs; ``directory``:
    where their sockets are.
    """

    host: UUID
    index: int
    count: int
    directory: Path
    ids: frozenset[UUID] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", frozenset(worker_node_id(self.host, i) for i in range(self.count)))

    @property
    def node_id(self) -> UUID:
        return worker_node_id(self.host, self.index)

    @property
    def listen(self) -> str:
        """The endpoint this worker's siblings dial it at."""
        return f"unix:{link_path(self.directory, self.index)}:mode=600"

    def dialed(self) -> "dict[UUID, str]":
        """The siblings this worker dials (those of lower index), by node id: ``unix:PATH`` addresses."""
        return {worker_node_id(self.host, i): f"unix:{link_path(self.directory, i)}" for i in range(self.index)}
