"""Questions to the other nodes (Query, Answer): gathering, split answers, timeouts and lost links."""

from __future__ import annotations

from uuid import uuid4

from twisted.internet.task import Clock
from twisted.trial import unittest

from meshd.mesh.queries import Queries, Results
from meshd.mesh.wire import (
    Answer,
    ChannelCount,
    LinkHello,
    Query,
    QueryKind,
    decode,
    encode_answers,
    encode_hello,
    encode_query,
)


class _Peer:
    def __init__(self) -> None:
        self.node = uuid4()


class _Link:
    """The end of a link a query is sent on: what was sent on it."""

    def __init__(self) -> None:
        self.peer = _Peer()
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)


class QueriesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.queries = Queries(self.clock)
        self.links = [_Link(), _Link()]
        self.results: list[Results] = []

    def ask(self, unreachable=()) -> Query:
        self.queries.ask(self.links, unreachable, Query(kind=QueryKind.Stats), 2.0).addCallback(self.results.append)
        [sent] = {bytes(p) for link in self.links for p in link.sent}
        return decode(sent)

    def test_every_answer_gathered(self) -> None:
        """The query goes out once on each link with a fresh id; it fires when every node has answered."""
        far = uuid4()
        query = self.ask(unreachable=[far])
        self.assertEqual((query.kind, query.id), (QueryKind.Stats, 1))
        a, b = self.links
        self.queries.answered(a.peer.node, Answer(id=1, sessions=3))
        self.assertEqual(self.results, [])
        self.queries.answered(b.peer.node, Answer(id=1, sessions=4))
        [results] = self.results
        self.assertEqual({n: [x.sessions for x in answers] for n, answers in results.answers.items()},
                         {a.peer.node: [3], b.peer.node: [4]})
        self.assertEqual(results.missing, [far])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_split_answers(self) -> None:
        """An answer in several frames counts once its last (``more`` unset) arrives."""
        self.links = self.links[:1]
        self.ask()
        node = self.links[0].peer.node
        self.queries.answered(node, Answer(id=1, more=True, channels=(ChannelCount("a", 1),)))
        self.assertEqual(self.results, [])
        self.queries.answered(node, Answer(id=1, channels=(ChannelCount("b", 2),)))
        [results] = self.results
        self.assertEqual([c.channel for a in results.answers[node] for c in a.channels], ["a", "b"])

    def test_silence_and_lost_links_are_missing(self) -> None:
        """A node that loses its link, or does not finish answering in time, is missing, with none of
        its answer kept."""
        self.ask()
        a, b = self.links
        self.queries.answered(a.peer.node, Answer(id=1, more=True, sessions=1))
        self.queries.lost(b.peer.node)
        self.assertEqual(self.results, [])
        self.clock.advance(2.0)
        [results] = self.results
        self.assertEqual(results.answers, {})
        self.assertEqual(results.missing, sorted([a.peer.node, b.peer.node], key=str))

    def test_late_and_foreign_answers_dropped(self) -> None:
        self.links = self.links[:1]
        self.ask()
        self.queries.answered(uuid4(), Answer(id=1))  # not asked
        self.queries.answered(self.links[0].peer.node, Answer(id=9))  # another query
        self.assertEqual(self.results, [])
        self.clock.advance(2.0)
        self.queries.answered(self.links[0].peer.node, Answer(id=1))  # too late
        self.assertEqual(len(self.results), 1)

    def test_nobody_to_ask(self) -> None:
        far = uuid4()
        self.links = []
        self.queries.ask([], [far], Query(), 2.0).addCallback(self.results.append)
        self.assertEqual(self.results[0].missing, [far])

    def test_stop_fires_what_it_has(self) -> None:
        self.ask()
        self.queries.cancel_all()
        self.assertEqual(len(self.results[0].missing), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class WireTests(unittest.TestCase):
    def test_query_round_trip(self) -> None:
        query = Query(id=7, kind=QueryKind.Disconnect, principal="alice", session=uuid4(), code=4006, reason="bye")
        self.assertEqual(decode(encode_query(query)), query)

    def test_answers_split_within_the_budget(self) -> None:
        """Many channels and closed sessions are split into frames of at most the budget, in order."""
        channels = [(f"channel-{i:04d}", i) for i in range(500)]
        closed = [uuid4() for _ in range(300)]
        frames = encode_answers(3, 4096, 12, channels, closed)
        self.assertGreater(len(frames), 3)
        self.assertTrue(all(len(f) <= 4096 + 512 for f in frames))
        answers = [decode(f) for f in frames]
        self.assertEqual([a.more for a in answers], [True] * (len(frames) - 1) + [False])
        self.assertEqual({a.id for a in answers} | {a.sessions for a in answers}, {3, 12})
        self.assertEqual([(c.channel, c.subscribers) for a in answers for c in a.channels], channels)
        self.assertEqual([s for a in answers for s in a.closed], closed)

    def test_features_in_the_hello(self) -> None:
        hello = LinkHello(node=uuid4(), cluster="c", version=1, features=("query",), name="edge-1")
        self.assertEqual(decode(encode_hello(hello)), hello)
        self.assertEqual(decode(encode_hello(LinkHello(node=uuid4(), cluster="c"))).features, ())
