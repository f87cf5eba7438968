"""What each connection costs a node: session ids from a pool of random bytes, the address-key cache,
and what an idle connection's protocol keeps."""

from __future__ import annotations

from uuid import UUID

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial import unittest

from meshd import limits, session
from meshd.limits import Limits


class SessionIdTests(unittest.SynchronousTestCase):
    def test_random_version_4(self) -> None:
        """Session ids are distinct version-4 UUIDs, also across a refill of the pool."""
        ids = [session.new_session_id() for _ in range(3 * session._ID_POOL // 16)]
        self.assertEqual(len(set(ids)), len(ids))
        for value in ids:
            self.assertIsInstance(value, UUID)
            self.assertEqual((value.version, value.variant), (4, "specified in RFC 4122"))

    def test_new_pool_after_fork(self) -> None:
        """A forked child starts a pool of its own, so it hands out none of the ids its parent will."""
        before = session._ids
        session._new_pool_in_child()
        self.addCleanup(setattr, session, "_ids", before)
        self.assertIsNot(session._ids, before)


class AddressCacheTests(unittest.SynchronousTestCase):
    def test_same_keys_as_address_key(self) -> None:
        """address_of gives what address_key gives, remembered per host, for IPv4, IPv6, exempt and UNIX peers."""
        node = Limits(Clock())
        peers = [IPv4Address("TCP", "192.0.2.7", 1), IPv4Address("TCP", "192.0.2.7", 2),
                 IPv4Address("TCP", "127.0.0.2", 3), IPv6Address("TCP", "2001:db8::1", 4), UNIXAddress(b"/tmp/s")]
        self.assertEqual([node.address_of(p) for p in peers],
                         ["192.0.2.7", "192.0.2.7", None, "2001:db8::/64", None])
        self.assertEqual(len(node._keys), 3)

    def test_bounded(self) -> None:
        """The cache starts over past ADDRESS_CACHE hosts."""
        self.patch(limits, "ADDRESS_CACHE", 4)
        node = Limits(Clock())
        for i in range(6):
            node.address_of(IPv4Address("TCP", f"192.0.2.{i}", 1))
        self.assertLessEqual(len(node._keys), 4)
